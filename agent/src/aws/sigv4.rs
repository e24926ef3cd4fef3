//! AWS Signature Version 4 for the agent's requests (header signing, signed payload).
//!
//! Pure: the time, the credentials and the request come in, the headers to add go out. HMAC and
//! SHA-256 are aws-lc-rs's (the TLS stack's crypto, already in the binary). Tested against AWS's
//! published Signature Version 4 test suite.
//!
//! Invariants: every header the request carries is signed (`host` included); the payload hash
//! is always computed (never `UNSIGNED-PAYLOAD`); the secret key only ever enters the HMAC.

use aws_lc_rs::{digest, hmac};

use super::creds::Credentials;

/// Lower-case hex of the SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(digest::digest(&digest::SHA256, data).as_ref())
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> Vec<u8> {
    let k = hmac::Key::new(hmac::HMAC_SHA256, key);
    hmac::sign(&k, data).as_ref().to_vec()
}

/// Percent-encodes everything but RFC 3986's unreserved characters (SigV4's `UriEncode`);
/// `/` is kept when `keep_slash` (paths).
pub fn uri_encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'.' | b'_' | b'~')
            || (keep_slash && b == b'/')
        {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// What is signed. `path` is the request path (not yet encoded) and `query` its decoded
/// parameters; `headers` are every header sent except those `sign` returns.
pub struct Signable<'a> {
    pub method: &'a str,
    pub host: &'a str,
    pub path: &'a str,
    pub query: &'a [(&'a str, &'a str)],
    pub headers: &'a [(&'a str, &'a str)],
    pub body: &'a [u8],
}

/// The credential scope: `20150830/us-east-1/service/aws4_request`.
pub struct Scope<'a> {
    pub region: &'a str,
    pub service: &'a str,
    /// `YYYYMMDDTHHMMSSZ`.
    pub amz_date: &'a str,
}

impl Scope<'_> {
    fn date(&self) -> &str {
        self.amz_date.get(..8).unwrap_or(self.amz_date)
    }

    fn scope(&self) -> String {
        format!(
            "{}/{}/{}/aws4_request",
            self.date(),
            self.region,
            self.service
        )
    }
}

/// `YYYYMMDDTHHMMSSZ` of epoch milliseconds.
pub fn amz_date(epoch_ms: u64) -> String {
    let iso = crate::clock::rfc3339(epoch_ms);
    let mut s: String = iso
        .chars()
        .take(19)
        .filter(|c| *c != '-' && *c != ':')
        .collect();
    s.push('Z');
    s
}

fn canonical_headers(req: &Signable<'_>, extra: &[(&str, &str)]) -> (String, String) {
    let mut all: Vec<(String, String)> = Vec::with_capacity(req.headers.len() + extra.len() + 1);
    all.push(("host".into(), req.host.to_string()));
    for (k, v) in req.headers.iter().chain(extra) {
        // Trim, and fold runs of spaces into one (the suite's get-header-value-trim).
        let v = v.split_whitespace().collect::<Vec<_>>().join(" ");
        all.push((k.to_ascii_lowercase(), v));
    }
    all.sort_by(|a, b| a.0.cmp(&b.0));
    let mut canon = String::new();
    let mut names: Vec<&str> = Vec::new();
    for (i, (k, v)) in all.iter().enumerate() {
        if i > 0 && all[i - 1].0 == *k {
            // A repeated header: its values joined by commas, in the order sent.
            canon.pop();
            canon.push(',');
        } else {
            canon.push_str(k);
            canon.push(':');
            names.push(k);
        }
        canon.push_str(v);
        canon.push('\n');
    }
    (canon, names.join(";"))
}

fn canonical_query(query: &[(&str, &str)]) -> String {
    let mut q: Vec<(String, String)> = query
        .iter()
        .map(|(k, v)| (uri_encode(k, false), uri_encode(v, false)))
        .collect();
    q.sort();
    q.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// The canonical request and the list of signed headers (exposed for the tests' vectors).
pub fn canonical_request(req: &Signable<'_>, extra: &[(&str, &str)]) -> (String, String) {
    let (headers, signed) = canonical_headers(req, extra);
    let path = if req.path.is_empty() { "/" } else { req.path };
    let creq = format!(
        "{}\n{}\n{}\n{}\n{}\n{}",
        req.method.to_ascii_uppercase(),
        uri_encode(path, true),
        canonical_query(req.query),
        headers,
        signed,
        sha256_hex(req.body)
    );
    (creq, signed)
}

/// The headers to add to `req`: `X-Amz-Date`, `X-Amz-Security-Token` (with a session token)
/// and `Authorization`.
pub fn sign(req: &Signable<'_>, creds: &Credentials, scope: &Scope<'_>) -> Vec<(String, String)> {
    let mut extra: Vec<(&str, &str)> = vec![("x-amz-date", scope.amz_date)];
    if let Some(t) = creds.session_token() {
        extra.push(("x-amz-security-token", t));
    }
    let (creq, signed) = canonical_request(req, &extra);
    let to_sign = format!(
        "AWS4-HMAC-SHA256\n{}\n{}\n{}",
        scope.amz_date,
        scope.scope(),
        sha256_hex(creq.as_bytes())
    );
    let mut key = hmac_sha256(
        format!("AWS4{}", creds.secret_key()).as_bytes(),
        scope.date().as_bytes(),
    );
    for part in [scope.region, scope.service, "aws4_request"] {
        key = hmac_sha256(&key, part.as_bytes());
    }
    let signature = hex(&hmac_sha256(&key, to_sign.as_bytes()));
    let auth = format!(
        "AWS4-HMAC-SHA256 Credential={}/{}, SignedHeaders={signed}, Signature={signature}",
        creds.access_key_id(),
        scope.scope()
    );
    let mut out: Vec<(String, String)> = extra
        .iter()
        .map(|(k, v)| (header_case(k), v.to_string()))
        .collect();
    out.push(("Authorization".into(), auth));
    out
}

fn header_case(k: &str) -> String {
    match k {
        "x-amz-date" => "X-Amz-Date".into(),
        "x-amz-security-token" => "X-Amz-Security-Token".into(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    //! Vectors from AWS's Signature Version 4 test suite
    //! (docs.aws.amazon.com/general/latest/gr/signature-v4-test-suite.html): credentials
    //! AKIDEXAMPLE / wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY, us-east-1, service "service",
    //! 2015-08-30T12:36:00Z, host example.amazonaws.com.
    use super::*;

    const DATE: &str = "20150830T123600Z";

    fn suite_creds(token: Option<&str>) -> Credentials {
        Credentials::new(
            "AKIDEXAMPLE",
            "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            token.map(str::to_string),
            None,
        )
    }

    fn authz(
        method: &str,
        path: &str,
        query: &[(&str, &str)],
        headers: &[(&str, &str)],
        body: &str,
        token: Option<&str>,
    ) -> String {
        let req = Signable {
            method,
            host: "example.amazonaws.com",
            path,
            query,
            headers,
            body: body.as_bytes(),
        };
        let scope = Scope {
            region: "us-east-1",
            service: "service",
            amz_date: DATE,
        };
        let out = sign(&req, &suite_creds(token), &scope);
        assert_eq!(out[0], ("X-Amz-Date".to_string(), DATE.to_string()));
        out.into_iter()
            .find(|(k, _)| k == "Authorization")
            .map(|(_, v)| v)
            .unwrap_or_default()
    }

    fn expect(signed: &str, sig: &str) -> String {
        format!("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, SignedHeaders={signed}, Signature={sig}")
    }

    #[test]
    fn get_vanilla() {
        assert_eq!(
            authz("GET", "/", &[], &[], "", None),
            expect(
                "host;x-amz-date",
                "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"
            )
        );
    }

    #[test]
    fn query_parameters_are_sorted_and_encoded() {
        assert_eq!(
            authz(
                "GET",
                "/",
                &[("Param2", "value2"), ("Param1", "value1")],
                &[],
                "",
                None
            ),
            expect(
                "host;x-amz-date",
                "b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500"
            )
        );
        assert_eq!(
            authz(
                "POST",
                "/",
                &[("@#$%^", ""), ("+", "/,?><`\";:\\|][{}")],
                &[],
                "",
                None
            ),
            expect(
                "host;x-amz-date",
                "66c82657c86e26fb25238d0e69f011edc4c6df5ae71119d7cb98ed9b87393c1e"
            )
        );
        assert_eq!(
            authz("GET", "/", &[("ሴ", "bar")], &[], "", None),
            expect(
                "host;x-amz-date",
                "2cdec8eed098649ff3a119c94853b13c643bcf08f8b0a1d91e12c9027818dd04"
            )
        );
    }

    #[test]
    fn paths_keep_unreserved_characters_and_encode_utf8() {
        let unreserved = "/-._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
        assert_eq!(
            authz("GET", unreserved, &[], &[], "", None),
            expect(
                "host;x-amz-date",
                "07ef7494c76fa4850883e2b006601f940f8a34d404d0cfa977f52a65bbf5f24f"
            )
        );
        assert_eq!(
            authz("GET", "/ሴ", &[], &[], "", None),
            expect(
                "host;x-amz-date",
                "8318018e0b0f223aa2bbf98705b62bb787dc9c0e678f255a891fd03141be5d85"
            )
        );
    }

    #[test]
    fn header_names_are_lowercased_values_trimmed_and_repeats_joined() {
        assert_eq!(
            authz("POST", "/", &[], &[("My-Header1", "value1")], "", None),
            expect(
                "host;my-header1;x-amz-date",
                "c5410059b04c1ee005303aed430f6e6645f61f4dc9e1461ec8f8916fdf18852c"
            )
        );
        assert_eq!(
            authz(
                "GET",
                "/",
                &[],
                &[("My-Header1", " value1"), ("My-Header2", " \"a   b   c\"")],
                "",
                None
            ),
            expect(
                "host;my-header1;my-header2;x-amz-date",
                "acc3ed3afb60bb290fc8d2dd0098b9911fcaa05412b367055dee359757a9c736"
            )
        );
        assert_eq!(
            authz(
                "GET",
                "/",
                &[],
                &[
                    ("My-Header1", "value2"),
                    ("My-Header1", "value2"),
                    ("My-Header1", "value1")
                ],
                "",
                None
            ),
            expect(
                "host;my-header1;x-amz-date",
                "c9d5ea9f3f72853aea855b47ea873832890dbdd183b4468f858259531a5138ea"
            )
        );
    }

    #[test]
    fn a_form_body_is_hashed_and_signed() {
        assert_eq!(
            authz(
                "POST",
                "/",
                &[],
                &[("Content-Type", "application/x-www-form-urlencoded")],
                "Param1=value1",
                None
            ),
            expect(
                "content-type;host;x-amz-date",
                "ff11897932ad3f4e8b18135d722051e5ac45fc38421b1da7b9d196a0fe09473a"
            )
        );
    }

    #[test]
    fn a_session_token_is_sent_and_signed() {
        let token = "AQoDYXdzEPT//////////wEXAMPLEtc764bNrC9SAPBSM22wDOk4x4HIZ8j4FZTwdQWLWsKWHGBuFqwAeMicRXmxfpSPfIeoIYRqTflfKD8YUuwthAx7mSEI/qkPpKPi/kMcGdQrmGdeehM4IC1NtBmUpp2wUE8phUZampKsburEDy0KPkyQDYwT7WZ0wq5VSXDvp75YU9HFvlRd8Tx6q6fE8YQcHNVXAkiY9q6d+xo0rKwT38xVqr7ZD0u0iPPkUL64lIZbqBAz+scqKmlzm8FDrypNC9Yjc8fPOLn9FX9KSYvKTr4rvx3iSIlTJabIQwj2ICCR/oLxBA==";
        assert_eq!(
            authz("POST", "/", &[], &[], "", Some(token)),
            expect(
                "host;x-amz-date;x-amz-security-token",
                "85d96828115b5dc0cfc3bd16ad9e210dd772bbebba041836c64533a82be05ead"
            )
        );
    }

    #[test]
    fn a_put_metric_data_request_signs_its_form_body() {
        // The shape the sink sends: the canonical request names the form body's hash and the
        // content type; a change to either changes the signature.
        let body = "Action=PutMetricData&Version=2010-08-01&Namespace=PM2%2FCodeBox&MetricData.member.1.MetricName=ServiceStatus";
        let req = Signable {
            method: "POST",
            host: "monitoring.us-east-1.amazonaws.com",
            path: "/",
            query: &[],
            headers: &[(
                "Content-Type",
                "application/x-www-form-urlencoded; charset=utf-8",
            )],
            body: body.as_bytes(),
        };
        let (creq, signed) = canonical_request(&req, &[("x-amz-date", DATE)]);
        assert_eq!(signed, "content-type;host;x-amz-date");
        assert_eq!(
            creq,
            format!(
                "POST\n/\n\ncontent-type:application/x-www-form-urlencoded; charset=utf-8\nhost:monitoring.us-east-1.amazonaws.com\nx-amz-date:{DATE}\n\ncontent-type;host;x-amz-date\n{}",
                sha256_hex(body.as_bytes())
            )
        );
        let scope = Scope {
            region: "us-east-1",
            service: "monitoring",
            amz_date: DATE,
        };
        let a = sign(&req, &suite_creds(None), &scope);
        let other = Signable {
            body: b"Action=PutMetricData",
            ..req
        };
        assert_ne!(a, sign(&other, &suite_creds(None), &scope));
        assert!(a[1].1.starts_with("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/monitoring/aws4_request, SignedHeaders=content-type;host;x-amz-date, Signature="));
    }

    #[test]
    fn amz_date_is_basic_iso8601() {
        assert_eq!(amz_date(1_440_938_160_000), DATE);
        assert_eq!(
            sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
