//! TLS for https probes: the client configuration (system roots, a `ca_file`, or no
//! verification), and the server certificate's expiry.
//!
//! rustls is the one TLS stack in the binary (the AWS SDK links it with aws-lc-rs). A probe drives
//! rustls's `ClientConnection` itself over its non-blocking socket (`flight`), so a slow
//! handshake waits in the watch loop's poll(2) like any other read: it never delays another app.
//!
//! Invariants: with `tls_verify = true` (the default) a certificate that does not chain to the
//! roots, does not name the URL's host, or is out of its validity period fails the probe; with
//! `tls_verify = false` any certificate is accepted but the handshake's signatures are still
//! checked. Either way the end-entity certificate's `notAfter` is recorded for `cert_days`.

use std::path::Path;
use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::config::target::TlsSettings;
use crate::net::tls::{provider, system_roots};
use crate::sync::lock;

/// The `notAfter` (seconds since the epoch) of the last end-entity certificate a probe saw.
pub type Seen = Arc<Mutex<Option<i64>>>;

/// An https probe's TLS: its configuration (or why there is none) and the server name.
#[derive(Debug)]
pub struct Tls {
    pub config: Result<Arc<ClientConfig>, String>,
    pub name: Result<ServerName<'static>, String>,
    pub seen: Seen,
}

impl Tls {
    pub fn new(settings: &TlsSettings, host: &str) -> Tls {
        let seen = Seen::default();
        let name = ServerName::try_from(host.to_string())
            .map_err(|e| format!("`{host}` is not a TLS server name: {e}"));
        Tls {
            config: client_config(settings, seen.clone()),
            name,
            seen,
        }
    }
}

fn client_config(settings: &TlsSettings, seen: Seen) -> Result<Arc<ClientConfig>, String> {
    let provider = provider();
    let inner = if settings.verify {
        let roots = match &settings.ca_file {
            Some(path) => Arc::new(roots_from(path)?),
            None => system_roots()?,
        };
        let v = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .map_err(|e| format!("cannot build the certificate verifier: {e}"))?;
        Some(v as Arc<dyn ServerCertVerifier>)
    } else {
        None
    };
    let verifier = Arc::new(Recording {
        inner,
        provider: provider.clone(),
        seen,
    });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    // No resumption: a resumed session skips verification, so a certificate renewed (or
    // broken) in place would go unseen and its expiry stale. A full handshake per check is
    // cheap at health-check rates.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// The largest `ca_file` read: a bundle of every public root is ~250 KB.
const MAX_CA_FILE: u64 = 1 << 20;

/// The roots in a PEM file. Read without blocking (a FIFO or device is refused, never waited
/// on) and capped, since this runs when an app's prober is built.
pub fn roots_from(path: &Path) -> Result<RootCertStore, String> {
    let shown = path.display();
    let bytes = match crate::sys::files::read_capped(path, MAX_CA_FILE) {
        Ok(Some(b)) if (b.len() as u64) < MAX_CA_FILE => b,
        Ok(Some(_)) => return Err(format!("ca_file {shown}: larger than 1 MiB")),
        Ok(None) => return Err(format!("ca_file {shown}: no such file")),
        Err(e) => return Err(format!("ca_file {shown}: {e}")),
    };
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("ca_file {shown}: {e}"))?;
    let mut roots = RootCertStore::empty();
    let (_, bad) = roots.add_parsable_certificates(certs);
    if roots.is_empty() {
        return Err(format!(
            "ca_file {shown}: no usable certificate ({bad} unparsable)"
        ));
    }
    Ok(roots)
}

/// Verifies through `inner` (none: accepts any certificate) and records the end-entity
/// certificate's expiry, whether or not it verifies: an expired certificate is still reported
/// with its (negative) days.
#[derive(Debug)]
struct Recording {
    inner: Option<Arc<dyn ServerCertVerifier>>,
    provider: Arc<CryptoProvider>,
    seen: Seen,
}

impl ServerCertVerifier for Recording {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        *lock(&self.seen) = not_after(end_entity);
        match &self.inner {
            Some(v) => {
                v.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            }
            None => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Whole days from `now` (seconds since the epoch) to `not_after`, rounded down: 0 on the last
/// day, negative once expired.
pub fn days_left(not_after: i64, now: i64) -> i64 {
    (not_after - now).div_euclid(86_400)
}

/// The certificate's `notAfter`, in seconds since the epoch: read straight from the DER
/// (Certificate -> TBSCertificate -> validity), as webpki does not expose it.
pub fn not_after(der: &[u8]) -> Option<i64> {
    let (cert, _) = tlv(der, 0x30)?;
    let (mut tbs, _) = tlv(cert, 0x30)?;
    if tbs.first() == Some(&0xa0) {
        tbs = skip(tbs)?; // [0] version
    }
    let tbs = skip(skip(skip(tbs)?)?)?; // serialNumber, signature, issuer
    let (validity, _) = tlv(tbs, 0x30)?;
    let after = skip(validity)?; // notBefore
    let tag = *after.first()?;
    let (time, _) = tlv(after, tag)?;
    parse_time(tag, time)
}

/// One DER element with this tag: (its content, what follows it).
fn tlv(b: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    if *b.first()? != tag {
        return None;
    }
    let first = *b.get(1)?;
    let (len, head) = if first < 0x80 {
        (usize::from(first), 2)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let len = b
            .get(2..2 + n)?
            .iter()
            .fold(0usize, |a, &x| (a << 8) | usize::from(x));
        (len, 2 + n)
    };
    let end = head.checked_add(len)?;
    Some((b.get(head..end)?, b.get(end..)?))
}

fn skip(b: &[u8]) -> Option<&[u8]> {
    tlv(b, *b.first()?).map(|(_, rest)| rest)
}

/// UTCTime (`YYMMDDHHMMSSZ`, 1950-2049) or GeneralizedTime (`YYYYMMDDHHMMSSZ`).
fn parse_time(tag: u8, t: &[u8]) -> Option<i64> {
    let t = std::str::from_utf8(t).ok()?.strip_suffix('Z')?;
    let (year, rest) = match (tag, t.len()) {
        (0x17, 12) => {
            let yy: i64 = t.get(..2)?.parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, t.get(2..)?)
        }
        (0x18, 14) => (t.get(..4)?.parse().ok()?, t.get(4..)?),
        _ => return None,
    };
    let n = |i: usize| -> Option<i64> { rest.get(i..i + 2)?.parse().ok() };
    let (month, day, h, m, s) = (n(0)?, n(2)?, n(4)?, n(6)?, n(8)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    Some(crate::clock::days_from_civil(year, month, day) * 86_400 + h * 3600 + m * 60 + s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_asn1_time_forms_parse() {
        assert_eq!(parse_time(0x17, b"700101000000Z"), Some(0));
        assert_eq!(parse_time(0x17, b"491231235959Z"), Some(2_524_607_999));
        assert_eq!(parse_time(0x18, b"20380119031407Z"), Some(2_147_483_647));
        assert_eq!(parse_time(0x17, b"701301000000Z"), None);
        assert_eq!(parse_time(0x18, b"2038011903140Z"), None);
    }

    #[test]
    fn days_left_rounds_down_and_goes_negative() {
        assert_eq!(days_left(86_400 * 10, 0), 10);
        assert_eq!(days_left(86_400 * 10, 1), 9);
        assert_eq!(days_left(0, 1), -1);
    }

    #[test]
    fn junk_is_no_certificate() {
        assert_eq!(not_after(b""), None);
        assert_eq!(not_after(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
        assert_eq!(not_after(&[0x30, 0x03, 0x30, 0x01, 0x02]), None);
    }
}
