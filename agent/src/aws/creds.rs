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
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
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
            profile: env("AWS_PROFILE").unwrap_or_else(|| "default".into()),
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

    /// The profile's static keys; an error for a profile this client cannot use.
    pub fn credentials(&self) -> Result<Option<Credentials>, CredsError> {
        if let Some((key, path)) = self.get("aws_access_key_id") {
            let Some((secret, _)) = self.get("aws_secret_access_key") else {
                return Err(CredsError::Incomplete {
                    profile: self.profile.clone(),
                    path: path.display().to_string(),
                });
            };
            let token = self.get("aws_session_token").map(|(t, _)| t.to_string());
            return Ok(Some(Credentials::new(key, secret, token, None)));
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
        Ok(None)
    }
}

fn setting<'a>(p: &'a Profiles, profile: &str, key: &str) -> Option<&'a str> {
    p.get(profile)?.get(key).map(String::as_str)
}

/// The environment's keys, if both are set.
fn from_env(env: &dyn Fn(&str) -> Option<String>) -> Option<Credentials> {
    let key = env("AWS_ACCESS_KEY_ID").filter(|k| !k.is_empty())?;
    let secret = env("AWS_SECRET_ACCESS_KEY").filter(|k| !k.is_empty())?;
    Some(Credentials::new(
        &key,
        &secret,
        env("AWS_SESSION_TOKEN"),
        None,
    ))
}

/// The ECS/container credentials endpoint, when the environment names one: the relative URI at
/// 169.254.170.2, or a full URI that must be loopback.
fn container_url(env: &dyn Fn(&str) -> Option<String>) -> Option<Result<Url, CredsError>> {
    let bad = |why: String| CredsError::Fetch {
        source_name: "container",
        why,
    };
    if let Some(rel) = env("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI").filter(|s| !s.is_empty()) {
        return Some(Url::parse(&format!("http://169.254.170.2{rel}")).map_err(bad));
    }
    let full = env("AWS_CONTAINER_CREDENTIALS_FULL_URI").filter(|s| !s.is_empty())?;
    Some(match Url::parse(&full) {
        Ok(u) if u.is_loopback() => Ok(u),
        Ok(u) => Err(bad(format!(
            "AWS_CONTAINER_CREDENTIALS_FULL_URI {} is not a loopback address; only loopback is allowed",
            u.redacted()
        ))),
        Err(e) => Err(bad(e)),
    })
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
        Some(p) => Some(
            std::fs::read_to_string(&p)
                .map_err(|e| {
                    err(format!(
                        "cannot read AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE {p}: {e}"
                    ))
                })?
                .trim()
                .to_string(),
        ),
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
            budget: Duration::from_secs(3),
        }
    }

    /// Credentials for the next request: the cached ones until 5 minutes before they expire.
    pub fn get(&mut self) -> Result<Credentials, CredsError> {
        self.get_within(Duration::from_secs(3))
    }

    /// As `get`, a fetch from a metadata endpoint taking at most `left`.
    pub fn get_within(&mut self, left: Duration) -> Result<Credentials, CredsError> {
        self.budget = left;
        if let Some(c) = &self.cached {
            if !c.stale(clock::wall_ms()) {
                return Ok(c.clone());
            }
        }
        let c = self.resolve()?;
        self.cached = Some(c.clone());
        Ok(c)
    }

    /// Forgets the cached credentials (after AWS said they expired).
    pub fn invalidate(&mut self) {
        self.cached = None;
    }

    fn resolve(&mut self) -> Result<Credentials, CredsError> {
        let env = &*self.env;
        if let Some(c) = from_env(env) {
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

    fn env_of(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k: &str| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
    }

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
        assert!(e.contains("loopback") && !e.contains("secret"), "{e}");
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
}
