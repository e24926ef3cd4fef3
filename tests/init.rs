//! `pmguard init` against a real PM2 daemon (private PM2_HOME): a fork app on a loopback port, a
//! cluster app sharing one port, an app with no port and an app on the wildcard address. The
//! config it writes names each app, proposes a health_url only where a port was found, and passes
//! `pmguard-agent validate`.

#[path = "../agent/tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::{free_port, wait_until, Pm2Sandbox};

const PMGUARD: &str = env!("CARGO_BIN_EXE_pmguard");

fn agent_bin() -> PathBuf {
    Path::new(PMGUARD).with_file_name("pmguard-agent")
}

fn init(pm2_home: &Path, output: &Path) -> Output {
    Command::new(PMGUARD)
        .args(["init", "--user", "root", "--pm2-home"])
        .arg(pm2_home)
        .arg("--output")
        .arg(output)
        .output()
        .unwrap()
}

/// The `[[apps]]` block of `name` (from its table header to the next one).
fn block<'a>(config: &'a str, name: &str) -> &'a str {
    let key = format!("name = \"{name}\"\n");
    let at = config
        .find(&key)
        .unwrap_or_else(|| panic!("no app {name} in:\n{config}"));
    let start = config[..at].rfind("[[apps]]").unwrap();
    let end = config[at..]
        .find("[[apps]]")
        .map_or(config.len(), |e| at + e);
    &config[start..end]
}

#[test]
fn init_proposes_a_health_url_per_listening_app_and_its_config_validates() {
    let pm2 = Pm2Sandbox::new();
    let (fork_port, cluster_port, wild_port) = (free_port(), free_port(), free_port());
    pm2.start_app("api", fork_port, &[]);
    pm2.start_app("web", cluster_port, &["-i", "2"]);
    pm2.start_app_env("public", wild_port, &[], &[("HOST", "0.0.0.0")]);
    let dir = tempfile::tempdir().unwrap();
    let idle = dir.path().join("idle.js");
    std::fs::write(&idle, "setInterval(() => {}, 1000);\n").unwrap();
    let out = pm2.pm2(&["start", idle.to_str().unwrap(), "--name", "worker"]);
    assert!(out.status.success(), "{out:?}");
    wait_until(Duration::from_secs(20), "worker online", || {
        pm2.jlist()
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "worker" && e["pm2_env"]["status"] == "online" && e["pid"] != 0)
    });

    let path = dir.path().join("etc/pmguard/pmguard.toml");
    let out = init(pm2.home(), &path);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let config = std::fs::read_to_string(&path).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o640
    );

    let api = block(&config, "api");
    assert!(api.contains("# PM2: fork mode, 1 instance."), "{api}");
    assert!(
        api.contains(&format!("\nhealth_url = \"http://127.0.0.1:{fork_port}/\"")),
        "{api}"
    );
    let web = block(&config, "web");
    assert!(web.contains("# PM2: cluster mode, 2 instances."), "{web}");
    assert!(
        web.contains(&format!(
            "\nhealth_url = \"http://127.0.0.1:{cluster_port}/\""
        )),
        "{web}"
    );
    let public = block(&config, "public");
    assert!(
        public.contains(&format!("Listens on 0.0.0.0:{wild_port}")),
        "{public}"
    );
    assert!(
        public.contains(&format!("\nhealth_url = \"http://127.0.0.1:{wild_port}/\"")),
        "{public}"
    );
    let worker = block(&config, "worker");
    assert!(worker.contains("No listening TCP port found"), "{worker}");
    assert!(
        worker.contains("\n# health_url = ") && !worker.contains("\nhealth_url"),
        "{worker}"
    );
    // The apps' environment never reaches the file (PORT, HOST are in it).
    assert!(
        !config.contains("HOST") && !config.contains("PORT="),
        "{config}"
    );

    let v = Command::new(agent_bin())
        .args(["validate", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        v.status.success(),
        "{}{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );
    assert!(String::from_utf8_lossy(&v.stdout).contains("valid, 4 app(s)"));

    // An existing file is kept unless --force.
    let again = init(pm2.home(), &path);
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
}

#[test]
fn init_without_a_pm2_daemon_says_so_and_how_to_fix_it() {
    let pm2 = Pm2Sandbox::new();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pmguard.toml");
    let out = init(pm2.home(), &path);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no PM2 daemon answers for user `root`"),
        "{err}"
    );
    assert!(err.contains("rpc.sock"), "{err}");
    assert!(err.contains("help: start the apps as root"), "{err}");
    assert!(!path.exists());
    // init asked the socket only: it started no daemon.
    assert!(pm2.daemon_pid().is_none());
}
