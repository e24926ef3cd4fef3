//! Every rendered file through the real tool that will read it, failing on any warning:
//! systemd-analyze (verify, security), logrotate -d, crontab -n, parliament (IAM lint).
//! The tools are installed by .ci/run; a missing tool fails the test with the package to install.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use pmguard_agent::config::Config;
use pmguard_installer::iam;
use pmguard_installer::layout::Layout;
use pmguard_installer::render::{
    self, DesiredFile, Settings, CRON_PATH, IAM_ADMIN_PATH, IAM_PATH, LOGROTATE_PATH, UNIT_PATH,
};
use pmguard_installer::users;

const FULL: &str = "[agent]\ninterval = \"10s\"\n\n[[apps]]\nname = \"codebox\"\nhealth_url = \"http://localhost:5000/api-health\"\n\n[[apps]]\nname = \"worker\"\n\n[aws]\nregion = \"us-east-1\"\nsns_topic = \"pmguard-alerts\"\nalarm_email = \"ops@example.com\"\n";
const LOCAL: &str = "[[apps]]\nname = \"codebox\"\nhealth_url = \"http://127.0.0.1:5000/health\"\n";

fn tool(name: &str, package: &str) -> String {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .unwrap();
    assert!(
        found.status.success(),
        "`{name}` is missing: install {package} (bash .ci/run does)"
    );
    String::from_utf8(found.stdout).unwrap().trim().to_string()
}

/// Renders for a user that exists on this host (logrotate checks `su`/`create` owners).
fn render_for_host(config: &str) -> Vec<DesiredFile> {
    render_as(config, users::lookup(Path::new("/"), "nobody").unwrap())
}

/// Renders for the seed's `ubuntu` account (systemd flags `nobody` as unsafe, rightly).
fn render_for_ubuntu(config: &str) -> Vec<DesiredFile> {
    let account = users::Account {
        user: "ubuntu".into(),
        uid: 1000,
        group: "ubuntu".into(),
        gid: 1000,
        home: "/home/ubuntu".into(),
    };
    render_as(config, account)
}

fn render_as(config: &str, account: users::Account) -> Vec<DesiredFile> {
    render_in(config, account, Layout::Single)
}

fn render_in(config: &str, account: users::Account, layout: Layout) -> Vec<DesiredFile> {
    let c = Config::parse(Path::new("/etc/pmguard/pmguard.toml"), config).unwrap();
    render::render(
        &c,
        &Settings {
            account,
            config_text: config.into(),
            agent_binary: Some(b"#!/bin/sh\n".to_vec()),
            // PM2 not under systemd yet: pmguard-pm2.service is rendered and verified too.
            pm2: pmguard_installer::pm2unit::Supervision::Ours {
                pm2_bin: "/usr/local/bin/pm2".into(),
                path_env: "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
            },
            layout,
        },
    )
    .unwrap()
}

/// `alice`'s instance: the template unit and her drop-in.
fn render_for_alice(config: &str) -> Vec<DesiredFile> {
    let account = users::Account {
        user: "alice".into(),
        uid: 1001,
        group: "alice".into(),
        gid: 1001,
        home: "/home/alice".into(),
    };
    render_in(config, account, Layout::instance("alice").unwrap())
}

/// A staging root with the rendered files, the host's systemd units and /bin/kill.
fn staged(config: &str) -> (tempfile::TempDir, Vec<DesiredFile>) {
    staged_files(render_for_ubuntu(config))
}

fn staged_files(files: Vec<DesiredFile>) -> (tempfile::TempDir, Vec<DesiredFile>) {
    let root = tempfile::tempdir().unwrap();
    for f in &files {
        let p = render::under(root.path(), &f.path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, &f.content).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(f.mode)).unwrap();
    }
    let units = root.path().join("usr/lib/systemd");
    std::fs::create_dir_all(&units).unwrap();
    assert!(Command::new("cp")
        .args(["-a", "/usr/lib/systemd/system"])
        .arg(&units)
        .status()
        .unwrap()
        .success());
    std::fs::create_dir_all(root.path().join("bin")).unwrap();
    std::fs::copy("/bin/kill", root.path().join("bin/kill")).unwrap();
    // The pm2 that pmguard-pm2.service runs (verify checks that ExecStart= is executable).
    std::fs::create_dir_all(root.path().join("usr/local/bin")).unwrap();
    std::fs::write(root.path().join("usr/local/bin/pm2"), "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(
        root.path().join("usr/local/bin/pm2"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    (root, files)
}

fn file<'a>(files: &'a [DesiredFile], path: &str) -> &'a DesiredFile {
    files.iter().find(|f| f.path == Path::new(path)).unwrap()
}

#[test]
fn unit_verifies_without_a_single_warning() {
    let sa = tool("systemd-analyze", "systemd");
    for config in [FULL, LOCAL] {
        let (root, _) = staged(config);
        for unit in [UNIT_PATH, pmguard_installer::pm2unit::PM2_UNIT_PATH] {
            let out = Command::new(&sa)
                .arg("verify")
                .arg(format!("--root={}", root.path().display()))
                .arg("--man=no")
                .arg(render::under(root.path(), Path::new(unit)))
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.success() && stderr.trim().is_empty(),
                "systemd-analyze verify {unit}: {stderr}"
            );
        }
    }
}

#[test]
fn instance_unit_with_its_drop_in_verifies_without_a_single_warning() {
    let sa = tool("systemd-analyze", "systemd");
    for config in [FULL, LOCAL] {
        let (root, files) = staged_files(render_for_alice(config));
        assert!(files
            .iter()
            .any(|f| f.path == Path::new(render::TEMPLATE_PATH)));
        // The instance is loaded from the template plus pmguard-agent@alice.service.d/.
        let instance = root
            .path()
            .join("etc/systemd/system/pmguard-agent@alice.service");
        std::fs::copy(
            render::under(root.path(), Path::new(render::TEMPLATE_PATH)),
            &instance,
        )
        .unwrap();
        for unit in [
            instance.clone(),
            render::under(
                root.path(),
                Path::new("/etc/systemd/system/pmguard-pm2-alice.service"),
            ),
        ] {
            let out = Command::new(&sa)
                .arg("verify")
                .arg(format!("--root={}", root.path().display()))
                .arg("--man=no")
                .arg(&unit)
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.success() && stderr.trim().is_empty(),
                "systemd-analyze verify {}: {stderr}",
                unit.display()
            );
        }
        std::fs::remove_file(&instance).unwrap();
        let level = exposure(&sa, root.path(), "pmguard-agent@alice.service");
        assert!(level <= 1.5, "exposure {level}");
        eprintln!("pmguard-agent@alice.service exposure: {level}");
    }
}

/// `systemd-analyze security --offline` of `unit` under `root`, failing above 1.5.
fn exposure(sa: &str, root: &Path, unit: &str) -> f64 {
    let out = Command::new(sa)
        .args(["security", "--offline=true", "--threshold=15", "--no-pager"])
        .arg(format!("--root={}", root.display()))
        .arg(unit)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{unit}: exposure above 1.5:\n{text}");
    text.lines()
        .find_map(|l| l.split(&format!("{unit}: ")).nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{text}"))
}

#[test]
fn unit_exposure_is_at_most_1_5() {
    let sa = tool("systemd-analyze", "systemd");
    for config in [FULL, LOCAL] {
        let (root, _) = staged(config);
        let out = Command::new(&sa)
            .args(["security", "--offline=true", "--threshold=15", "--no-pager"])
            .arg(format!("--root={}", root.path().display()))
            .arg("pmguard-agent.service")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "exposure above 1.5:\n{text}");
        let level: f64 = text
            .lines()
            .find_map(|l| l.split("pmguard-agent.service: ").nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
        assert!(level <= 1.5, "exposure {level}");
        eprintln!("pmguard-agent.service exposure: {level}");
    }
}

/// The single-user layout's files and an instance's (`pmguard-agent@nobody.service`), each with
/// the path of its `what` file.
fn both_layouts(single: &str, instance: &str) -> [(Vec<DesiredFile>, String); 2] {
    let nobody = users::lookup(Path::new("/"), "nobody").unwrap();
    [
        (render_for_host(FULL), single.to_string()),
        (
            render_in(FULL, nobody, Layout::instance("nobody").unwrap()),
            instance.to_string(),
        ),
    ]
}

#[test]
fn logrotate_reads_it_without_error() {
    for (files, path) in both_layouts(LOGROTATE_PATH, "/etc/logrotate.d/pmguard-nobody") {
        logrotate_reads(&files, &path);
    }
}

fn logrotate_reads(files: &[DesiredFile], path: &str) {
    let lr = tool("logrotate", "logrotate");
    let root = tempfile::tempdir().unwrap();
    let f = file(files, path);
    let p = render::under(root.path(), &f.path);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, &f.content).unwrap();
    let state = root.path().join("logrotate.status");
    let out = Command::new(lr)
        .arg("-d")
        .arg("-s")
        .arg(&state)
        .arg(render::under(root.path(), Path::new(path)))
        .output()
        .unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && !all.contains("error:"),
        "logrotate -d:\n{all}"
    );
    assert!(
        all.contains("rotating pattern: /var/lib/pmguard/events.jsonl"),
        "{all}"
    );
}

#[test]
fn cron_file_is_one_cron_will_read() {
    for (files, path) in both_layouts(CRON_PATH, "/etc/cron.d/pmguard-nobody") {
        cron_reads(&files, &path);
    }
}

fn cron_reads(files: &[DesiredFile], path: &str) {
    let ct = tool("crontab", "cron");
    let cron = file(files, path);
    let name = cron.path.file_name().unwrap().to_str().unwrap();
    assert!(
        name.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'),
        "cron ignores {name}"
    );
    assert_eq!(cron.mode, 0o644);
    assert_eq!(cron.uid, 0);
    let text = String::from_utf8(cron.content.clone()).unwrap();
    assert!(text.ends_with('\n'));
    let jobs: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.contains('=') && !l.trim().is_empty())
        .collect();
    assert_eq!(jobs.len(), 1);
    // crontab -n checks user-crontab syntax: drop the user field (the 6th).
    let fields: Vec<&str> = jobs[0].split_whitespace().collect();
    assert_eq!(fields[5], "nobody");
    let user_line = format!("{} {}\n", fields[..5].join(" "), fields[6..].join(" "));
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("line");
    std::fs::write(&p, &user_line).unwrap();
    let out = Command::new(ct).arg("-n").arg(&p).output().unwrap();
    assert!(
        out.status.success(),
        "crontab -n: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

const FLEET: &str = "[[apps]]\nname = \"codebox\"\nhealth_url = \"http://localhost:5000/api-health\"\n\n[aws]\nregion = \"us-east-1\"\nfleet = \"web\"\nalarm_email = \"ops@example.com\"\nauto_scaling_group = \"web-asg\"\n";

fn parliament(policy: &[u8]) -> String {
    let parliament = tool("parliament", "parliament (pip)");
    let mut child = Command::new(parliament)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(policy).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "parliament failed:\n{text}\n{}",
        String::from_utf8_lossy(policy)
    );
    text
}

#[test]
fn iam_policies_are_clean_and_grant_exactly_the_calls_made_on_each_side() {
    for config in [FULL, FLEET] {
        let files = render_for_host(config);
        for path in [IAM_PATH, IAM_ADMIN_PATH] {
            let policy = file(&files, path);
            let text = parliament(&policy.content);
            assert!(
                text.trim().is_empty(),
                "parliament findings on {path}:\n{text}"
            );
        }
        let c = Config::parse(Path::new("/x.toml"), config).unwrap();
        // Scoped to an account (`pmguard fleet iam --account`): as clean.
        for p in [
            iam::agent_policy(&c).unwrap(),
            iam::admin_policy(&c).unwrap(),
        ] {
            let scoped = iam::to_json(&iam::with_account(p, "123456789012").unwrap());
            let text = parliament(scoped.as_bytes());
            assert!(
                text.trim().is_empty(),
                "parliament findings:\n{text}\n{scoped}"
            );
        }
        let agent = iam::actions(&iam::agent_policy(&c).unwrap());
        let mut made: Vec<String> = iam::agent_actions(&c)
            .iter()
            .map(|s| s.to_string())
            .collect();
        made.sort();
        assert_eq!(agent, made);
        let admin = iam::actions(&iam::admin_policy(&c).unwrap());
        let mut made: Vec<String> = iam::admin_actions(&c)
            .iter()
            .map(|s| s.to_string())
            .collect();
        made.sort();
        assert_eq!(admin, made);
        let v: serde_json::Value = serde_json::from_slice(&file(&files, IAM_PATH).content).unwrap();
        let put = v["Statement"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["Action"][0] == "cloudwatch:PutMetricData")
            .unwrap();
        assert_eq!(
            put["Condition"]["StringEquals"]["cloudwatch:namespace"],
            "PM2/CodeBox"
        );
    }
    // The fleet's instance role: nothing that deletes, subscribes, edits alarms or creates a
    // shared resource.
    let c = Config::parse(Path::new("/x.toml"), FLEET).unwrap();
    for a in iam::actions(&iam::agent_policy(&c).unwrap()) {
        let verb = a.split(':').nth(1).unwrap();
        assert!(
            !verb.starts_with("Delete")
                && verb != "Subscribe"
                && !verb.contains("Alarm")
                && verb != "CreateLogGroup"
                && verb != "CreateTopic",
            "{a}"
        );
    }
}

#[test]
fn rendered_user_data_passes_cloud_init_schema_and_the_script_parses() {
    use pmguard_installer::bootstrap::{Bootstrap, ConfigSource, Format};
    let cloud_init = tool("cloud-init", "cloud-init (Debian)");
    let sha = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
    for config in [
        ConfigSource::Parameter("/pmguard/web/config".into()),
        ConfigSource::Inline(FULL.into()),
    ] {
        let b = Bootstrap::new(
            "https://downloads.example.com/pmguard_0.1.0_amd64.deb",
            sha,
            "ubuntu",
            config,
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let user_data = dir.path().join("user-data");
        std::fs::write(&user_data, b.render(Format::CloudInit)).unwrap();
        let out = Command::new(&cloud_init)
            .args(["schema", "--config-file"])
            .arg(&user_data)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && text.contains("Valid cloud-config"),
            "cloud-init schema:\n{text}"
        );
        let script = dir.path().join("bootstrap.sh");
        std::fs::write(&script, b.render(Format::Shell)).unwrap();
        let out = Command::new("sh").arg("-n").arg(&script).output().unwrap();
        assert!(
            out.status.success(),
            "sh -n: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
