//! `pmguard fleet render --format shell` end to end: the rendered bootstrap, run twice inside a
//! Debian root booted with systemd-nspawn (tests/e2e/nspawn.sh), with the package (a .tar.gz of
//! this build's `pmguard` and `pmguard-agent`) served over HTTP on the machine's 127.0.0.1.
//! The first run downloads, checks the hash, unpacks and installs: the agent is active. The
//! second downloads nothing and installs nothing. A package whose hash differs is refused.
//! Needs root and the cached root from `tests/e2e/nspawn.sh prepare` (bash .ci/run does it).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

const PMGUARD: &str = env!("CARGO_BIN_EXE_pmguard");
const PORT: u16 = 8088;

#[path = "common/machine.rs"]
mod machine;

use machine::{sh as nspawn, Machine};

fn ok(o: Output, what: &str) -> String {
    assert!(
        o.status.success(),
        "{what} failed ({}):\n{}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The package: stripped copies of this build's binaries in a .tar.gz, and its SHA-256.
fn package(dir: &Path) -> (PathBuf, String) {
    // The layout of dist/build's tarball: pmguard-<version>-x86_64-linux/bin/...
    let top = format!("pmguard-{}-x86_64-linux", env!("CARGO_PKG_VERSION"));
    let stage = dir.join("stage").join(&top).join("bin");
    std::fs::create_dir_all(&stage).unwrap();
    for bin in ["pmguard", "pmguard-agent"] {
        let src = Path::new(PMGUARD).with_file_name(bin);
        assert!(
            src.exists(),
            "{} is missing: run `cargo test --workspace`",
            src.display()
        );
        let st = Command::new("strip")
            .arg("-o")
            .arg(stage.join(bin))
            .arg(&src)
            .status()
            .unwrap();
        assert!(st.success(), "strip {}", src.display());
    }
    let pkg = dir.join("pmguard.tar.gz");
    let st = Command::new("tar")
        .arg("-czf")
        .arg(&pkg)
        .arg("-C")
        .arg(dir.join("stage"))
        .arg(&top)
        .status()
        .unwrap();
    assert!(st.success());
    let out = Command::new("sha256sum").arg(&pkg).output().unwrap();
    let sha = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    (pkg, sha)
}

fn render(config: &Path, sha: &str, dest: &Path) {
    let out = Command::new(PMGUARD)
        .args(["fleet", "render", "--config"])
        .arg(config)
        .args([
            "--package-url",
            &format!("http://127.0.0.1:{PORT}/pmguard.tar.gz"),
            "--sha256",
            sha,
            "--user",
            "ubuntu",
            "--format",
            "shell",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(dest, out.stdout).unwrap();
}

#[test]
fn the_rendered_bootstrap_run_twice_leaves_an_active_agent() {
    assert_eq!(
        nix::unistd::geteuid().as_raw(),
        0,
        "the end-to-end test boots a container: run it as root (CI does)"
    );
    let dir = tempfile::tempdir().unwrap();
    let (pkg, sha) = package(dir.path());
    let config = dir.path().join("pmguard.toml");
    std::fs::write(
        &config,
        "[agent]\ninterval = \"1s\"\n\n[[apps]]\nname = \"codebox\"\nhealth_url = \"http://127.0.0.1:5000/health\"\n",
    )
    .unwrap();
    let script = dir.path().join("bootstrap.sh");
    render(&config, &sha, &script);
    let bad_script = dir.path().join("bad.sh");
    render(&config, &"0".repeat(64), &bad_script);
    // A static file server on the machine's loopback that logs every request.
    let server = dir.path().join("serve.js");
    std::fs::write(
        &server,
        format!(
            "const fs = require('fs');\nrequire('http').createServer((q, r) => {{\n  fs.appendFileSync('/srv/requests.log', q.url + '\\n');\n  const f = '/srv/pkg' + q.url;\n  if (!fs.existsSync(f) || !fs.statSync(f).isFile()) {{ r.writeHead(404); r.end(); return; }}\n  r.writeHead(200);\n  fs.createReadStream(f).pipe(r);\n}}).listen({PORT}, '127.0.0.1');\n"
        ),
    )
    .unwrap();

    ok(nspawn(&["prepare"]), "prepare");
    let m = Machine(format!("pmb{}", std::process::id()));
    ok(nspawn(&["boot", &m.0]), "boot");
    ok(nspawn(&["setup-app", &m.0]), "setup-app");
    m.copy_in(&pkg, "/srv/pkg/pmguard.tar.gz");
    m.copy_in(&server, "/srv/serve.js");
    m.copy_in(&script, "/root/bootstrap.sh");
    m.copy_in(&bad_script, "/root/bad.sh");
    m.run(&[
        "systemd-run",
        "--unit=pkgserve",
        "/usr/bin/node",
        "/srv/serve.js",
    ]);
    m.wait("the package server", Duration::from_secs(20), |m| {
        m.exec(&[
            "curl",
            "-fsS",
            "-o",
            "/dev/null",
            "-I",
            &format!("http://127.0.0.1:{PORT}/ready"),
        ])
        .status
        .code()
            == Some(22)
    });

    // A package that does not have the announced hash is refused before anything is installed.
    let bad = m.exec(&["sh", "/root/bad.sh"]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("does not have SHA-256"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    assert!(!m
        .exec(&["test", "-e", "/usr/local/lib/pmguard/pmguard"])
        .status
        .success());

    let first = m.run(&["sh", "/root/bootstrap.sh"]);
    assert!(
        first.contains("create /etc/pmguard/pmguard.toml"),
        "{first}"
    );
    m.wait("the agent active", Duration::from_secs(30), |m| {
        m.exec(&["systemctl", "is-active", "--quiet", "pmguard-agent.service"])
            .status
            .success()
    });
    let second = m.run(&["sh", "/root/bootstrap.sh"]);
    assert!(second.starts_with("Nothing to do."), "{second}");
    let requests = m.run(&["cat", "/srv/requests.log"]);
    assert_eq!(
        requests.matches("/pmguard.tar.gz").count(),
        2,
        "the bad run and the first run download; the second does not: {requests}"
    );
    assert!(m
        .exec(&["systemctl", "is-active", "--quiet", "pmguard-agent.service"])
        .status
        .success());
}
