//! Where the sink's AWS credentials come from, in the SDK's order: the environment, the shared
//! files' static keys, the ECS container endpoint, EC2's IMDSv2.
//!
//! Invariants:
//! - A secret key or session token never reaches a log line: `Credentials` has no field access
//!   and its `Debug` prints the access key id only.
//! - A profile that needs what this client does not do (assume role, SSO, credential_process,
//!   web identity) is an error naming the profile and the fix, never a silent fall-through to
//!   another identity.
//! - Temporary credentials are cached and fetched again 5 minutes before their `Expiration`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::imds::Imds;
use crate::clock;
use crate::net::{self, Limits, Request, Url};

/// A key pair and its optional session token.
#[derive(Clone, PartialEq)]
pub struct Credentials {
    access_key_id: String,
    secret_key: String,
    session_token: Option<String>,
    /// Epoch ms; `None` for keys that do not expire.
    expires_ms: Option<u64>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("expires_ms", &self.expires_ms)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    pub fn new(
        access_key_id: &str,
        secret_key: &str,
        session_token: Option<String>,
        expires_ms: Option<u64>,
    ) -> Credentials {
        Credentials {
            access_key_id: access_key_id.to_string(),
            secret_key: secret_key.to_string(),
            session_token: session_token.filter(|t| !t.is_empty()),
            expires_ms,
        }
    }

    pub fn access_key_id(&self) -> &str {
        &self.access_key_id
    }

    pub(crate) fn secret_key(&self) -> &str {
        &self.secret_key
    }

    pub fn session_token(&self) -> Option<&str> {
        self.session_token.as_deref()
    }

    /// Whether these should be fetched again at `now_ms` (5 minutes ahead of expiry).
    pub fn stale(&self, now_ms: u64) -> bool {
        self.expires_ms.is_some_and(|e| now_ms + 300_000 >= e)
    }

    /// Whether these can no longer sign at `now_ms` (10 s of margin for the request).
    pub fn expired(&self, now_ms: u64) -> bool {
        self.expires_ms.is_some_and(|e| now_ms + 10_000 >= e)
    }
}

/// Why no credentials were found.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CredsError {
    #[error("no AWS credentials: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, put static keys in the profile, or run on EC2 with an instance profile")]
    None,
    #[error("AWS profile {profile:?} in {path} uses {what}, which pmguard-agent does not support; give the instance an instance profile (IAM role) or put static keys (aws_access_key_id, aws_secret_access_key) in that profile")]
    Unsupported {
        profile: String,
        path: String,
        what: String,
    },
    #[error("AWS profile {profile:?} in {path} has no aws_secret_access_key; add it")]
    Incomplete { profile: String, path: String },
    #[error("AWS_PROFILE={profile:?} names no profile in {config} or {credentials}; fix the name or add the profile")]
    NoProfile {
        profile: String,
        config: String,
        credentials: String,
    },
    #[error("{set} is set but {missing} is not; set both (or neither)")]
    HalfEnv {
        set: &'static str,
        missing: &'static str,
    },
    #[error("{source_name} credentials: {why}")]
    Fetch {
        source_name: &'static str,
        why: String,
    },
}

/// The shared config and credentials files, parsed: profile name -> key -> value.
pub type Profiles = BTreeMap<String, BTreeMap<String, String>>;

/// Parses an AWS shared file. In the config file a section is `[profile NAME]` (or `[default]`);
/// in the credentials file it is `[NAME]`. Comments start with `#` or `;`.
pub fn parse_profiles(text: &str, config_file: bool) -> Profiles {
    let mut out = Profiles::new();
    let mut current: Option<String> = None;
    for raw in text.lines() {
        let line = raw.trim();
        // An indented line is a sub-setting of the key above (`s3 =\n    region = ...`):
        // not a setting of the profile.
        let indented = raw.starts_with([' ', '\t']);
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') || indented {
            continue;
        }
        if let Some(section) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let section = section.trim();
            let name = match section.strip_prefix("profile ") {
                Some(n) if config_file => Some(n.trim()),
                None if !config_file || section == "default" => Some(section),
                _ => None,
            };
            current = name.map(str::to_string);
            if let Some(n) = &current {
                out.entry(n.clone()).or_default();
            }
            continue;
        }
        if let (Some(p), Some((k, v))) = (&current, line.split_once('=')) {
            let v = v.split(" #").next().unwrap_or("").trim();
            out.entry(p.clone())
                .or_default()
                .insert(k.trim().to_ascii_lowercase(), v.to_string());
        }
    }
    out
}

/// The shared files as the SDK finds them (AWS_CONFIG_FILE, AWS_SHARED_CREDENTIALS_FILE, else
/// ~/.aws/), and the selected profile (AWS_PROFILE, else "default").
pub struct SharedFiles {
    pub profile: String,
    /// Whether AWS_PROFILE chose the profile (a missing one is then an error, not "no keys").
    pub explicit: bool,
    pub config_path: PathBuf,
    pub credentials_path: PathBuf,
    pub config: Profiles,
    pub credentials: Profiles,
}

impl SharedFiles {
    pub fn load(env: &dyn Fn(&str) -> Option<String>) -> SharedFiles {
        let home = env("HOME").unwrap_or_default();
        let path = |var: &str, file: &str| {
            env(var).map_or_else(|| Path::new(&home).join(".aws").join(file), PathBuf::from)
        };
        let config_path = path("AWS_CONFIG_FILE", "config");
        let credentials_path = path("AWS_SHARED_CREDENTIALS_FILE", "credentials");
        let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
        SharedFiles {
            profile: env("AWS_PROFILE")
                .filter(|p| !p.is_empty())
                .unwrap_or_else(|| "default".into()),
            explicit: env("AWS_PROFILE").is_some_and(|p| !p.is_empty()),
            config: parse_profiles(&read(&config_path), true),
            credentials: parse_profiles(&read(&credentials_path), false),
            config_path,
            credentials_path,
        }
    }

    /// A setting of the selected profile: the credentials file first, then the config file.
    fn get(&self, key: &str) -> Option<(&str, &Path)> {
        if let Some(v) = setting(&self.credentials, &self.profile, key) {
            return Some((v, &self.credentials_path));
        }
        setting(&self.config, &self.profile, key).map(|v| (v, self.config_path.as_path()))
    }

    pub fn region(&self) -> Option<String> {
        self.get("region").map(|(v, _)| v.to_string())
    }

    /// The profile's static keys; an error for a profile this client cannot use (a role or
    /// SSO profile is refused even with static keys: they are the role's source, not its
    /// identity), and for an AWS_PROFILE that names no profile.
    pub fn credentials(&self) -> Result<Option<Credentials>, CredsError> {
        if self.explicit
            && !self.config.contains_key(&self.profile)
            && !self.credentials.contains_key(&self.profile)
        {
            return Err(CredsError::NoProfile {
                profile: self.profile.clone(),
                config: self.config_path.display().to_string(),
                credentials: self.credentials_path.display().to_string(),
            });
        }
        const UNSUPPORTED: &[(&str, &str)] = &[
            ("role_arn", "role_arn (assume role)"),
            ("sso_session", "sso_session (IAM Identity Center)"),
            ("sso_start_url", "sso_start_url (IAM Identity Center)"),
            ("credential_process", "credential_process"),
            (
                "web_identity_token_file",
                "web_identity_token_file (web identity)",
            ),
        ];
        for (key, what) in UNSUPPORTED {
            if let Some((_, path)) = self.get(key) {
                return Err(CredsError::Unsupported {
                    profile: self.profile.clone(),
                    path: path.display().to_string(),
                    what: (*what).to_string(),
                });
            }
        }
        let Some((key, path)) = self.get("aws_access_key_id") else {
            return Ok(None);
        };
        let Some((secret, _)) = self.get("aws_secret_access_key") else {
            return Err(CredsError::Incomplete {
                profile: self.profile.clone(),
                path: path.display().to_string(),
            });
        };
        let token = self.get("aws_session_token").map(|(t, _)| t.to_string());
        Ok(Some(Credentials::new(key, secret, token, None)))
    }
}

fn setting<'a>(p: &'a Profiles, profile: &str, key: &str) -> Option<&'a str> {
    p.get(profile)?.get(key).map(String::as_str)
}

/// The environment's keys when both are set; an error when only one is (never a silent
/// fall-through to another identity).
fn from_env(env: &dyn Fn(&str) -> Option<String>) -> Result<Option<Credentials>, CredsError> {
    const ID: &str = "AWS_ACCESS_KEY_ID";
    const SECRET: &str = "AWS_SECRET_ACCESS_KEY";
    let key = env(ID).filter(|k| !k.is_empty());
    let secret = env(SECRET).filter(|k| !k.is_empty());
    match (key, secret) {
        (Some(key), Some(secret)) => Ok(Some(Credentials::new(
            &key,
            &secret,
            env("AWS_SESSION_TOKEN"),
            None,
        ))),
        (None, None) => Ok(None),
        (Some(_), None) => Err(CredsError::HalfEnv {
            set: ID,
            missing: SECRET,
        }),
        (None, Some(_)) => Err(CredsError::HalfEnv {
            set: SECRET,
            missing: ID,
        }),
    }
}

/// The ECS/container credentials endpoint, when the environment names one: the relative URI
/// (a path, starting with `/`) at 169.254.170.2, or a full URI that is https, loopback, or the
/// EKS Pod Identity agent (169.254.170.23, fd00:ec2::23).
fn container_url(env: &dyn Fn(&str) -> Option<String>) -> Option<Result<Url, CredsError>> {
    let bad = |why: String| CredsError::Fetch {
        source_name: "container",
        why,
    };
    if let Some(rel) = env("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI").filter(|s| !s.is_empty()) {
        if !rel.starts_with('/') {
            return Some(Err(bad(
                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI must be a path starting with `/`".into(),
            )));
        }
        return Some(Url::parse(&format!("http://169.254.170.2{rel}")).map_err(bad));
    }
    let full = env("AWS_CONTAINER_CREDENTIALS_FULL_URI").filter(|s| !s.is_empty())?;
    const POD_IDENTITY: [&str; 2] = ["169.254.170.23", "fd00:ec2::23"];
    let allowed = |u: &Url| {
        u.https
            || u.is_loopback()
            || u.host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| POD_IDENTITY.iter().any(|p| p.parse() == Ok(ip)))
    };
    Some(match Url::parse(&full) {
        Ok(u) if allowed(&u) => Ok(u),
        Ok(u) => Err(bad(format!(
            "AWS_CONTAINER_CREDENTIALS_FULL_URI {} is plain http to a host that is neither loopback nor the EKS Pod Identity agent (169.254.170.23, fd00:ec2::23); use https",
            u.redacted()
        ))),
        Err(e) => Err(bad(e)),
    })
}

/// The container authorization token from `path`: a regular file (a FIFO or device would
/// block the sink), at most 16 KiB, one line. Opened non-blocking; symlinks are followed
/// (Kubernetes projects the token through one).
fn read_token_file(path: &str) -> Result<String, String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    const MAX: u64 = 16 * 1024;
    let what = "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE";
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(path)
        .map_err(|e| format!("cannot read {what} {path}: {e}"))?;
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot read {what} {path}: {e}"))?;
    if !meta.is_file() || meta.len() > MAX {
        return Err(format!(
            "{what} {path} must be a regular file of at most 16 KiB"
        ));
    }
    let mut text = String::new();
    file.take(MAX)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read {what} {path}: {e}"))?;
    let token = text.trim();
    if token.contains(['\r', '\n']) {
        return Err(format!("{what} {path} must hold one line"));
    }
    Ok(token.to_string())
}

/// Reads the AccessKeyId/SecretAccessKey/Token/Expiration document ECS and IMDS both serve.
pub fn parse_credentials_doc(body: &[u8]) -> Result<Credentials, String> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let s = |k: &str| v.get(k).and_then(|x| x.as_str()).filter(|x| !x.is_empty());
    if let Some(code) = s("Code").filter(|c| *c != "Success") {
        return Err(format!("the metadata service answered Code {code}"));
    }
    let (Some(key), Some(secret)) = (s("AccessKeyId"), s("SecretAccessKey")) else {
        return Err("the document has no AccessKeyId/SecretAccessKey".into());
    };
    let expires = match s("Expiration") {
        Some(e) => Some(clock::parse_rfc3339(e).ok_or("unreadable Expiration")?),
        None => None,
    };
    Ok(Credentials::new(
        key,
        secret,
        s("Token").map(str::to_string),
        expires,
    ))
}

fn fetch_container(
    url: &Url,
    env: &dyn Fn(&str) -> Option<String>,
    budget: Duration,
) -> Result<Credentials, CredsError> {
    let err = |why: String| CredsError::Fetch {
        source_name: "container",
        why,
    };
    let token = match env("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE").filter(|s| !s.is_empty()) {
        Some(p) => Some(read_token_file(&p).map_err(err)?),
        None => env("AWS_CONTAINER_AUTHORIZATION_TOKEN"),
    };
    let mut headers: Vec<(&str, &str)> = vec![("Accept", "application/json")];
    if let Some(t) = &token {
        headers.push(("Authorization", t));
    }
    let limits = Limits {
        connect: std::time::Duration::from_secs(1),
        total: budget.min(Duration::from_secs(3)),
        max_body: 64 * 1024,
    };
    let reply = net::send(
        &Request {
            method: "GET",
            url,
            headers: &headers,
            body: b"",
        },
        &limits,
    )
    .and_then(net::Reply::whole)
    .map_err(|e| err(e.to_string()))?;
    if reply.status != 200 {
        return Err(err(format!("HTTP {}", reply.status)));
    }
    parse_credentials_doc(&reply.body).map_err(err)
}

/// Reads one environment variable (injected so tests need not touch the process's).
pub type Env = Box<dyn Fn(&str) -> Option<String> + Send>;

/// The chain, with its cache. Lives on the sink thread.
pub struct Provider {
    env: Env,
    imds: Option<Imds>,
    cached: Option<Credentials>,
    /// Inside the refresh window, no new fetch before this (wall ms): a refresh that failed,
    /// or returned credentials as close to expiry, is not repeated on every request.
    retry_at: u64,
    /// How long a fetch from a metadata endpoint may take (the caller's time left).
    budget: Duration,
}

impl Provider {
    /// `env` reads an environment variable (injected so tests need not touch the process's).
    pub fn new(env: Env, imds: Option<Imds>) -> Provider {
        Provider {
            env,
            imds,
            cached: None,
            retry_at: 0,
            budget: Duration::from_secs(3),
        }
    }

    /// Credentials for the next request: the cached ones until 5 minutes before they expire.
    pub fn get(&mut self) -> Result<Credentials, CredsError> {
        self.get_within(Duration::from_secs(3), 0)
    }

    /// As `get`, a fetch from a metadata endpoint taking at most `left`. Expiry times are AWS's
    /// (the endpoints' clock): they are judged on our clock moved `skew_ms` to AWS's, so a clock
    /// hours off neither refetches before every request nor signs with expired keys.
    pub fn get_within(&mut self, left: Duration, skew_ms: i64) -> Result<Credentials, CredsError> {
        self.budget = left;
        let local = clock::wall_ms();
        let now = local.saturating_add_signed(skew_ms);
        if let Some(c) = &self.cached {
            if !c.stale(now) || (local < self.retry_at && !c.expired(now)) {
                return Ok(c.clone());
            }
        }
        // A refresh in the window is tried once a minute at most; the cached credentials serve
        // while they are still valid, whatever the refresh says.
        self.retry_at = local + 60_000;
        match self.resolve() {
            Ok(c) => {
                self.cached = Some(c.clone());
                Ok(c)
            }
            Err(e) => match &self.cached {
                Some(c) if !c.expired(now) => Ok(c.clone()),
                _ => Err(e),
            },
        }
    }

    /// Forgets the cached credentials (after AWS said they expired).
    pub fn invalidate(&mut self) {
        self.cached = None;
        self.retry_at = 0;
    }

    fn resolve(&mut self) -> Result<Credentials, CredsError> {
        let env = &*self.env;
        if let Some(c) = from_env(env)? {
            return Ok(c);
        }
        if let Some(c) = SharedFiles::load(env).credentials()? {
            return Ok(c);
        }
        if env("AWS_WEB_IDENTITY_TOKEN_FILE").is_some_and(|s| !s.is_empty()) {
            return Err(CredsError::Unsupported {
                profile: "(environment)".into(),
                path: "AWS_WEB_IDENTITY_TOKEN_FILE".into(),
                what: "web identity".into(),
            });
        }
        if let Some(url) = container_url(env) {
            return fetch_container(&url?, env, self.budget);
        }
        match &mut self.imds {
            Some(imds) => imds
                .role_credentials(self.budget)
                .map_err(|why| CredsError::Fetch {
                    source_name: "EC2 instance profile (IMDSv2)",
                    why,
                }),
            None => Err(CredsError::None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::aws::test_env::of as env_of;

    #[test]
    fn debug_never_prints_the_secret_or_the_token() {
        let c = Credentials::new("AKID", "s3cr3t", Some("t0k3n".into()), None);
        let shown = format!("{c:?}");
        assert!(shown.contains("AKID"), "{shown}");
        assert!(
            !shown.contains("s3cr3t") && !shown.contains("t0k3n"),
            "{shown}"
        );
    }

    #[test]
    fn config_sections_need_the_profile_prefix_credentials_sections_do_not() {
        let config = "[default]\nregion = eu-west-1\n[profile web]\nregion=us-west-2 # ours\n[web]\nregion = nope\n";
        let p = parse_profiles(config, true);
        assert_eq!(p["default"]["region"], "eu-west-1");
        assert_eq!(p["web"]["region"], "us-west-2");
        let creds =
            "# keys\n[web]\naws_access_key_id = AKIDWEB\n; comment\naws_secret_access_key = sec\n";
        let p = parse_profiles(creds, false);
        assert_eq!(p["web"]["aws_access_key_id"], "AKIDWEB");
    }

    #[test]
    fn a_profile_with_static_keys_gives_them_and_its_region() {
        let dir = tempfile::tempdir().unwrap();
        let (cfg, cr) = (dir.path().join("config"), dir.path().join("credentials"));
        std::fs::write(&cfg, "[profile web]\nregion = eu-central-1\n").unwrap();
        std::fs::write(&cr, "[web]\naws_access_key_id = AKIDWEB\naws_secret_access_key = sec\naws_session_token = tok\n").unwrap();
        let env = env_of(&[
            ("AWS_PROFILE", "web"),
            ("AWS_CONFIG_FILE", cfg.to_str().unwrap()),
            ("AWS_SHARED_CREDENTIALS_FILE", cr.to_str().unwrap()),
        ]);
        let files = SharedFiles::load(&env);
        assert_eq!(files.region().as_deref(), Some("eu-central-1"));
        let c = files.credentials().unwrap().unwrap();
        assert_eq!(
            (c.access_key_id(), c.secret_key(), c.session_token()),
            ("AKIDWEB", "sec", Some("tok"))
        );
    }

    #[test]
    fn a_role_profile_is_refused_with_the_profile_and_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("config");
        std::fs::write(
            &cfg,
            "[profile ops]\nrole_arn = arn:aws:iam::1:role/x\nsource_profile = default\n",
        )
        .unwrap();
        let env = env_of(&[
            ("AWS_PROFILE", "ops"),
            ("AWS_CONFIG_FILE", cfg.to_str().unwrap()),
            ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null"),
        ]);
        let e = SharedFiles::load(&env).credentials().unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("\"ops\"")
                && text.contains("role_arn")
                && text.contains("instance profile")
                && text.contains(cfg.to_str().unwrap()),
            "{text}"
        );
        // The whole chain stops there: it never goes on to IMDS or another identity.
        let mut p = Provider::new(Box::new(env), None);
        assert!(matches!(p.get(), Err(CredsError::Unsupported { .. })));
    }

    #[test]
    fn environment_keys_come_first() {
        let mut p = Provider::new(
            Box::new(env_of(&[
                ("AWS_ACCESS_KEY_ID", "AKENV"),
                ("AWS_SECRET_ACCESS_KEY", "s"),
                ("AWS_PROFILE", "absent"),
            ])),
            None,
        );
        assert_eq!(p.get().unwrap().access_key_id(), "AKENV");
        let mut none = Provider::new(
            Box::new(env_of(&[
                ("AWS_CONFIG_FILE", "/dev/null"),
                ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null"),
            ])),
            None,
        );
        assert_eq!(none.get(), Err(CredsError::None));
    }

    #[test]
    fn a_container_full_uri_must_be_loopback() {
        let e = container_url(&env_of(&[(
            "AWS_CONTAINER_CREDENTIALS_FULL_URI",
            "http://10.1.2.3/creds?x=secret",
        )]))
        .unwrap()
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("loopback") && e.contains("use https") && !e.contains("secret"),
            "{e}"
        );
        for ok in [
            "http://169.254.170.23/v1/credentials",
            "http://[fd00:ec2::23]/v1/credentials",
            "https://creds.internal.example/v1",
        ] {
            let env = env_of(&[("AWS_CONTAINER_CREDENTIALS_FULL_URI", ok)]);
            assert!(container_url(&env).unwrap().is_ok(), "{ok}");
        }
        let rel = env_of(&[(
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
            ".attacker.example/x",
        )]);
        let e = container_url(&rel).unwrap().unwrap_err().to_string();
        assert!(e.contains("starting with `/`"), "{e}");
        assert!(container_url(&env_of(&[(
            "AWS_CONTAINER_CREDENTIALS_FULL_URI",
            "http://127.0.0.1:9/c"
        )]))
        .unwrap()
        .is_ok());
        let rel = container_url(&env_of(&[(
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
            "/v2/credentials/abc",
        )]))
        .unwrap()
        .unwrap();
        assert_eq!(
            (rel.host.as_str(), rel.target.as_str()),
            ("169.254.170.2", "/v2/credentials/abc")
        );
    }

    #[test]
    fn credential_documents_carry_their_expiry() {
        let doc = br#"{"Code":"Success","AccessKeyId":"ASIA1","SecretAccessKey":"s","Token":"t","Expiration":"2026-11-30T18:00:00Z"}"#;
        let c = parse_credentials_doc(doc).unwrap();
        assert_eq!(c.expires_ms, Some(1_796_061_600_000));
        assert!(!c.stale(1_796_061_600_000 - 301_000));
        assert!(c.stale(1_796_061_600_000 - 299_000));
        assert!(parse_credentials_doc(br#"{"Code":"Failure"}"#).is_err());
        assert!(parse_credentials_doc(b"<html>").is_err());
    }

    /// A loopback stand-in for the container credentials endpoint (what ECS/EKS serve cannot
    /// be run here): answers `max` requests with `doc`, then refuses connections.
    fn creds_server(
        doc: String,
        max: usize,
    ) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let uri = format!("http://127.0.0.1:{}/creds", l.local_addr().unwrap().port());
        let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let h = hits.clone();
        std::thread::spawn(move || {
            for s in l.incoming().take(max) {
                let mut s = s.unwrap();
                let _ = s.read(&mut [0u8; 4096]);
                h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let _ = write!(
                    s,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{doc}",
                    doc.len()
                );
            }
        });
        (uri, hits)
    }

    fn doc(key: &str, exp_ms: u64) -> String {
        format!(
            r#"{{"AccessKeyId":"{key}","SecretAccessKey":"s","Token":"t","Expiration":"{}"}}"#,
            clock::rfc3339(exp_ms)
        )
    }

    fn provider(vars: &[(&str, &str)]) -> Provider {
        let mut all = vec![
            ("AWS_CONFIG_FILE", "/dev/null"),
            ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null"),
        ];
        all.extend_from_slice(vars);
        Provider::new(Box::new(env_of(&all)), None)
    }

    #[test]
    fn a_missing_profile_or_half_set_keys_are_errors_not_another_identity() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("config");
        std::fs::write(&cfg, "[profile prod]\nregion = eu-west-1\n").unwrap();
        let (uri, hits) = creds_server(doc("ASIA_CONTAINER", clock::wall_ms() + 3_600_000), 10);
        let env = env_of(&[
            ("AWS_PROFILE", "prdo"),
            ("AWS_CONFIG_FILE", cfg.to_str().unwrap()),
            ("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials"),
            ("AWS_CONTAINER_CREDENTIALS_FULL_URI", &uri),
        ]);
        let e = Provider::new(Box::new(env), None)
            .get()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("\"prdo\"")
                && e.contains(cfg.to_str().unwrap())
                && e.contains("/nonexistent/credentials"),
            "{e}"
        );
        for (set, missing) in [
            ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"),
            ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"),
        ] {
            let e = provider(&[(set, "x"), ("AWS_CONTAINER_CREDENTIALS_FULL_URI", &uri)]).get();
            assert_eq!(e, Err(CredsError::HalfEnv { set, missing }));
        }
        assert_eq!(
            hits.load(std::sync::atomic::Ordering::SeqCst),
            0,
            "fell through to the container"
        );
    }

    #[test]
    fn a_role_profile_with_static_keys_is_refused_and_sub_settings_are_not_settings() {
        let dir = tempfile::tempdir().unwrap();
        let (cfg, cr) = (dir.path().join("config"), dir.path().join("credentials"));
        std::fs::write(
            &cfg,
            "[profile ops]\nrole_arn = arn:aws:iam::1:role/ops\nsource_profile = ops\n",
        )
        .unwrap();
        std::fs::write(
            &cr,
            "[ops]\naws_access_key_id = AKIA_USER\naws_secret_access_key = sec\n",
        )
        .unwrap();
        let env = env_of(&[
            ("AWS_PROFILE", "ops"),
            ("AWS_CONFIG_FILE", cfg.to_str().unwrap()),
            ("AWS_SHARED_CREDENTIALS_FILE", cr.to_str().unwrap()),
        ]);
        assert!(matches!(
            SharedFiles::load(&env).credentials(),
            Err(CredsError::Unsupported { .. })
        ));
        let p = parse_profiles(
            "[default]\nregion = eu-west-1\ns3 =\n    region = us-gov-west-1\n",
            true,
        );
        assert_eq!(p["default"]["region"], "eu-west-1");
    }

    #[test]
    fn a_token_file_that_is_a_fifo_or_has_two_lines_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        assert!(std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success());
        let e = read_token_file(fifo.to_str().unwrap()).unwrap_err();
        assert!(e.contains("regular file"), "{e}");
        let two = dir.path().join("two");
        std::fs::write(&two, "tok\r\nX-Evil: 1\n").unwrap();
        assert!(read_token_file(two.to_str().unwrap())
            .unwrap_err()
            .contains("one line"));
        let big = dir.path().join("big");
        std::fs::write(&big, "a".repeat(17 * 1024)).unwrap();
        assert!(read_token_file(big.to_str().unwrap()).is_err());
        let ok = dir.path().join("ok");
        std::fs::write(&ok, "token-1\n").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&ok, &link).unwrap();
        assert_eq!(read_token_file(link.to_str().unwrap()).unwrap(), "token-1");
    }

    #[test]
    fn expiry_is_judged_on_aws_time_so_a_fast_clock_does_not_refetch_every_request() {
        // This clock is 3 hours ahead of AWS's: credentials valid one more hour by AWS's clock
        // look two hours expired by ours.
        let skew = -3 * 3_600_000;
        let (uri, hits) = creds_server(doc("ASIA_1H", clock::wall_ms() - 2 * 3_600_000), 10);
        let mut p = provider(&[("AWS_CONTAINER_CREDENTIALS_FULL_URI", &uri)]);
        for _ in 0..5 {
            let c = p.get_within(Duration::from_secs(3), skew).unwrap();
            assert_eq!(c.access_key_id(), "ASIA_1H");
        }
        assert_eq!(
            hits.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "fetched once, not before every request"
        );
    }

    #[test]
    fn valid_credentials_outlive_a_failed_refresh_and_refreshes_are_spaced() {
        // Valid 4 more minutes: inside the 5-minute refresh window.
        let exp = clock::wall_ms() + 240_000;
        let (uri, hits) = creds_server(doc("ASIA_4MIN", exp), 1);
        let mut p = provider(&[("AWS_CONTAINER_CREDENTIALS_FULL_URI", &uri)]);
        assert_eq!(p.get().unwrap().access_key_id(), "ASIA_4MIN");
        for _ in 0..4 {
            assert_eq!(p.get().unwrap().access_key_id(), "ASIA_4MIN");
        }
        assert_eq!(
            hits.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "one fetch, then spaced"
        );
        // Past the back-off the endpoint is gone: the still-valid credentials serve.
        p.retry_at = 0;
        assert_eq!(p.get().unwrap().access_key_id(), "ASIA_4MIN");
        p.invalidate();
        assert!(matches!(p.get(), Err(CredsError::Fetch { .. })));
    }
}
