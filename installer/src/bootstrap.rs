//! `pmguard fleet render`: the bootstrap a new instance runs, for the engines fleets already use:
//! EC2 user-data (`#cloud-config`), an SSM Command document (schemaVersion 2.2), or a plain
//! shell script. Pure: values in, text out.
//!
//! Invariants:
//! - One shell script is the whole procedure; the other formats carry it unchanged (cloud-init
//!   writes it to a root-only file and runs it; the SSM document runs its lines).
//! - The script downloads the package, checks its SHA-256 before anything else touches it,
//!   installs it, and runs `pmguard install`, which converges: running it twice is safe (a
//!   package already installed with the same hash is not downloaded again).
//! - Every value that reaches the script is validated here and single-quoted; a config given as a
//!   file is validated and embedded under a quoted here-document delimiter it cannot contain.
//! - cloud-config and the SSM document are JSON built from typed structs (JSON is YAML, so the
//!   cloud-config needs no YAML writer).

use std::fmt::Write as _;
use std::path::Path;

use pmguard_agent::config::Config;
use serde::Serialize;

/// Where the bootstrap keeps its state on the instance (root-only).
pub const STATE_DIR: &str = "/var/lib/pmguard-bootstrap";
const CONFIG_EOF: &str = "PMGUARD_CONFIG_EOF";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    CloudInit,
    SsmDocument,
    Shell,
}

/// Where the instance gets its config.
#[derive(Debug, Clone, PartialEq)]
pub enum ConfigSource {
    /// `install --config ssm:NAME`: the box reads the current parameter at every run.
    Parameter(String),
    /// The file's text, embedded in the script.
    Inline(String),
}

/// Everything the bootstrap needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Bootstrap {
    pub package_url: String,
    pub sha256: String,
    pub user: String,
    pub config: ConfigSource,
}

/// What is wrong with the config the bootstrap carries (or names), every problem at once.
fn config_problems(config: &ConfigSource) -> Vec<String> {
    let mut problems = Vec::new();
    match config {
        ConfigSource::Parameter(name) => {
            if let Err(e) = crate::aws::ssm::check_name(name) {
                problems.push(e.to_string());
            }
        }
        ConfigSource::Inline(text) => {
            if let Err(e) = Config::parse(Path::new("pmguard.toml"), text) {
                problems.push(e.to_string());
            }
            if text.lines().any(|l| l.trim() == CONFIG_EOF) {
                problems.push(format!("the config may not contain a line `{CONFIG_EOF}`"));
            }
            // YAML (cloud-init) refuses C0/C1 control characters even inside a string.
            if let Some((n, _)) = text
                .lines()
                .enumerate()
                .find(|(_, l)| l.chars().any(|c| c.is_control() && c != '\t' && c != '\r'))
            {
                problems.push(format!(
                    "pmguard.toml:{}: a control character (user-data must be plain text): remove it",
                    n + 1
                ));
            }
        }
    }
    problems
}

impl Bootstrap {
    /// Validates every value that goes into the script.
    pub fn new(
        package_url: &str,
        sha256: &str,
        user: &str,
        config: ConfigSource,
    ) -> Result<Bootstrap, crate::Error> {
        let mut problems = Vec::new();
        let scheme_ok = package_url.starts_with("https://") || package_url.starts_with("http://");
        let name = package_file(package_url);
        if !scheme_ok
            || package_url
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
            || !(name.ends_with(".deb") || name.ends_with(".tar.gz"))
        {
            problems.push(format!(
                "--package-url `{package_url}` must be an http(s) URL of a .deb or .tar.gz"
            ));
        }
        if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            problems.push(format!(
                "--sha256 `{sha256}` must be 64 hex digits (`sha256sum PACKAGE` prints it)"
            ));
        }
        let user_ok = user
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
            && user.len() <= 32
            && user
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if !user_ok {
            problems.push(format!(
                "--user `{user}` must be a Linux account name (the user of `pm2 startup`)"
            ));
        }
        problems.extend(config_problems(&config));
        if !problems.is_empty() {
            return Err(crate::Error::Invalid { problems });
        }
        Ok(Bootstrap {
            package_url: package_url.to_string(),
            sha256: sha256.to_ascii_lowercase(),
            user: user.to_string(),
            config,
        })
    }

    pub fn render(&self, format: Format) -> String {
        match format {
            Format::Shell => self.shell(),
            Format::CloudInit => self.cloud_init(),
            Format::SsmDocument => self.ssm_document(),
        }
    }

    /// The procedure, as a POSIX shell script.
    pub fn shell(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "#!/bin/sh");
        let _ = writeln!(
            s,
            "# pmguard bootstrap, rendered by `pmguard fleet render`. Safe to run again."
        );
        let _ = writeln!(s, "set -eu");
        // pmguard install creates /etc/pmguard and friends: a strict umask here would make them
        // unreadable to the agent's user. The bootstrap's own files sit in a 0700 directory.
        let _ = writeln!(s, "umask 022");
        let _ = writeln!(s, "url={}", quote(&self.package_url));
        let _ = writeln!(s, "sha256={}", quote(&self.sha256));
        let _ = writeln!(s, "state={STATE_DIR}");
        // A fixed name, never the URL's: nothing of the URL reaches the script unquoted.
        let pkg = if package_file(&self.package_url).ends_with(".deb") {
            "pmguard.deb"
        } else {
            "pmguard.tar.gz"
        };
        let _ = writeln!(s, "pkg=\"$state/{pkg}\"");
        s.push_str(
            r#"mkdir -p -m 0700 "$state"
chmod 0700 "$state"
case "$pkg" in
  *.deb) pmguard=/usr/bin/pmguard ;;
  *) pmguard=/usr/local/lib/pmguard/bin/pmguard ;;
esac
# Installed already (this hash) and still there: nothing to download.
if [ "$(cat "$state/installed.sha256" 2>/dev/null || true)" != "$sha256" ] || [ ! -x "$pmguard" ]; then
  rm -f "$pkg.part"
  if command -v curl >/dev/null 2>&1; then
    curl -fsSL --retry 5 --retry-connrefused -o "$pkg.part" "$url"
  else
    wget -q -t 5 -O "$pkg.part" "$url"
  fi
  echo "$sha256  $pkg.part" | sha256sum -c --quiet - || { echo "pmguard bootstrap: $url does not have SHA-256 $sha256; nothing installed" >&2; rm -f "$pkg.part"; exit 1; }
  mv "$pkg.part" "$pkg"
  case "$pkg" in
    *.deb) dpkg -i "$pkg" ;;
    *) mkdir -p /usr/local/lib/pmguard && tar -xzf "$pkg" -C /usr/local/lib/pmguard --no-same-owner --strip-components=1 ;;
  esac
  echo "$sha256" > "$state/installed.sha256"
fi
"#,
        );
        let config_arg = match &self.config {
            ConfigSource::Parameter(name) => quote(&format!("{}{name}", crate::aws::ssm::SCHEME)),
            ConfigSource::Inline(text) => {
                let _ = writeln!(s, "cat > \"$state/pmguard.toml\" <<'{CONFIG_EOF}'");
                s.push_str(text);
                if !text.ends_with('\n') {
                    s.push('\n');
                }
                let _ = writeln!(s, "{CONFIG_EOF}");
                "\"$state/pmguard.toml\"".to_string()
            }
        };
        let _ = writeln!(
            s,
            "\"$pmguard\" install --config {config_arg} --user {}",
            quote(&self.user)
        );
        s
    }

    /// EC2 user-data: cloud-init writes the script (root only) and runs it once per boot of a
    /// new instance.
    pub fn cloud_init(&self) -> String {
        #[derive(Serialize)]
        struct CloudConfig {
            write_files: Vec<WriteFile>,
            runcmd: Vec<Vec<String>>,
        }
        #[derive(Serialize)]
        struct WriteFile {
            path: String,
            permissions: &'static str,
            owner: &'static str,
            content: String,
        }
        let path = format!("{STATE_DIR}/bootstrap.sh");
        let doc = CloudConfig {
            write_files: vec![WriteFile {
                path: path.clone(),
                permissions: "0700",
                owner: "root:root",
                content: self.shell(),
            }],
            runcmd: vec![vec!["sh".into(), path]],
        };
        format!(
            "#cloud-config\n{}\n",
            serde_json::to_string_pretty(&doc).unwrap_or_default()
        )
    }

    /// An SSM Command document (schemaVersion 2.2) that runs the script on Linux instances, for
    /// Run Command or a State Manager association (re-running converges the box).
    pub fn ssm_document(&self) -> String {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Document {
            schema_version: &'static str,
            description: &'static str,
            main_steps: Vec<Step>,
        }
        #[derive(Serialize)]
        struct Step {
            action: &'static str,
            name: &'static str,
            precondition: Precondition,
            inputs: Inputs,
        }
        #[derive(Serialize)]
        struct Precondition {
            #[serde(rename = "StringEquals")]
            string_equals: [&'static str; 2],
        }
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Inputs {
            timeout_seconds: &'static str,
            run_command: Vec<String>,
        }
        let doc = Document {
            schema_version: "2.2",
            description:
                "Install or update pmguard and converge the box on its config (safe to run again).",
            main_steps: vec![Step {
                action: "aws:runShellScript",
                name: "pmguardInstall",
                precondition: Precondition {
                    string_equals: ["platformType", "Linux"],
                },
                inputs: Inputs {
                    timeout_seconds: "900",
                    run_command: self.shell().lines().map(str::to_string).collect(),
                },
            }],
        };
        let mut out = serde_json::to_string_pretty(&doc).unwrap_or_default();
        out.push('\n');
        out
    }
}

/// The file name the package is saved under (the URL's last path segment, without a query).
fn package_file(url: &str) -> &str {
    let path = url.split(['?', '#']).next().unwrap_or("");
    path.rsplit('/').next().unwrap_or("")
}

/// Single-quotes a value for sh.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    fn from_parameter() -> Bootstrap {
        Bootstrap::new(
            "https://downloads.example.com/pmguard_0.1.0_amd64.deb",
            SHA,
            "ubuntu",
            ConfigSource::Parameter("/pmguard/web/config".into()),
        )
        .unwrap()
    }

    #[test]
    fn every_format_snapshot() {
        let b = from_parameter();
        insta::assert_snapshot!("bootstrap_shell", b.render(Format::Shell));
        insta::assert_snapshot!("bootstrap_cloud_init", b.render(Format::CloudInit));
        insta::assert_snapshot!("bootstrap_ssm_document", b.render(Format::SsmDocument));
    }

    #[test]
    fn the_ssm_document_runs_the_same_script() {
        let b = from_parameter();
        let doc: serde_json::Value = serde_json::from_str(&b.ssm_document()).unwrap();
        assert_eq!(doc["schemaVersion"], "2.2");
        assert_eq!(doc["mainSteps"][0]["action"], "aws:runShellScript");
        let lines: Vec<String> = doc["mainSteps"][0]["inputs"]["runCommand"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l.as_str().unwrap().to_string())
            .collect();
        assert_eq!(lines.join("\n") + "\n", b.shell());
        let ci = b.cloud_init();
        let body: serde_json::Value =
            serde_json::from_str(ci.strip_prefix("#cloud-config\n").unwrap()).unwrap();
        assert_eq!(body["write_files"][0]["content"], b.shell());
    }

    #[test]
    fn an_inline_config_is_validated_and_embedded_verbatim() {
        let text = "[[apps]]\nname = \"it's\"\n";
        let b = Bootstrap::new(
            "http://127.0.0.1:8000/pmguard.tar.gz?x=1",
            SHA,
            "app_user",
            ConfigSource::Inline(text.into()),
        )
        .unwrap();
        let s = b.shell();
        assert!(
            s.contains(&format!("<<'{CONFIG_EOF}'\n{text}{CONFIG_EOF}\n")),
            "{s}"
        );
        assert!(s.contains("pkg=\"$state/pmguard.tar.gz\""), "{s}");
        let e = Bootstrap::new(
            "http://127.0.0.1:8000/pmguard.tar.gz",
            SHA,
            "u",
            ConfigSource::Inline("[[apps]]\nname = 1\n".into()),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("pmguard.toml:2"), "{e}");
    }

    #[test]
    fn values_that_could_break_the_script_are_refused() {
        let bad = |url: &str, sha: &str, user: &str| {
            Bootstrap::new(url, sha, user, ConfigSource::Parameter("/p".into()))
                .unwrap_err()
                .to_string()
        };
        assert!(bad("ftp://x/p.deb", SHA, "u").contains("--package-url"));
        assert!(bad("https://x/p.rpm", SHA, "u").contains("--package-url"));
        assert!(bad("https://x/a b.deb", SHA, "u").contains("--package-url"));
        assert!(bad("https://x/p.deb", "abc", "u").contains("--sha256"));
        assert!(bad("https://x/p.deb", SHA, "root; rm -rf /").contains("--user"));
        assert_eq!(quote("a'b"), "'a'\\''b'");
    }

    #[test]
    fn control_characters_in_an_inline_config_are_refused() {
        let text = "# note \u{9b}\n[[apps]]\nname = \"web\"\n";
        let e = Bootstrap::new(
            "https://x/p.deb",
            SHA,
            "u",
            ConfigSource::Inline(text.into()),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("pmguard.toml:1: a control character"), "{e}");
    }

    #[test]
    fn nothing_of_the_url_reaches_the_script_unquoted() {
        // A file name built to run commands when expanded in double quotes.
        let url = "https://x/`touch${IFS}.pwned`$(id)\";reboot;\".deb";
        let b = Bootstrap::new(url, SHA, "u", ConfigSource::Parameter("/p".into())).unwrap();
        let s = b.shell();
        assert!(s.contains("pkg=\"$state/pmguard.deb\""), "{s}");
        // The URL appears once, single-quoted.
        assert_eq!(s.matches("touch${IFS}").count(), 1, "{s}");
        assert!(s.contains(&format!("url={}", quote(url))), "{s}");
    }
}
