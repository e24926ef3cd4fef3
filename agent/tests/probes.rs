//! The probes against real servers on the loopback: TLS servers (Python's `ssl`) with a
//! self-signed certificate, one from a test CA (`ca_file`) and an expired one, all made here at
//! run time with the `openssl` CLI (no key is committed); a Node HTTP server on a unix socket
//! that checks the request's headers; a TCP-only listener; a TLS port that never answers the
//! handshake. Probes are built from config text, as the agent builds them.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use pmguard_agent::config::Config;
use pmguard_agent::probe::{ProbeOutcome, ProbeResult, Prober, Started};
use rustix::event::{poll, PollFd, Timespec};

/// A server process, killed on drop.
struct Server {
    child: Child,
    port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `cmd`, which prints its port (or "ready") on its first stdout line.
fn spawn(cmd: &mut Command) -> Server {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("server starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port = line.trim().parse().unwrap_or(0);
    assert!(!line.is_empty(), "server printed nothing");
    Server { child, port }
}

const TLS_SERVER: &str = r#"
import http.server, ssl, socket, sys
cert, key, host = sys.argv[1], sys.argv[2], sys.argv[3]
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = b'{"status":"healthy"}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
class S(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
srv = S((host, 0), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
print(srv.server_address[1], flush=True)
srv.serve_forever()
"#;

/// Node on a unix socket; `/h` answers 200 only with the expected Host and Authorization.
const UNIX_SERVER: &str = r#"
const http = require('http');
const path = process.argv[process.argv.length - 1];
http.createServer((req, res) => {
  const ok = req.headers.host === 'api.internal' && req.headers.authorization === 'Bearer t0ken';
  if (req.url === '/h' && ok) { res.writeHead(200, {'content-type': 'application/json'}); res.end('{"status":"healthy","db":"up"}'); }
  else if (req.url === '/h') { res.writeHead(401); res.end('who are you'); }
  else { res.writeHead(302, {location: '/h'}); res.end(); }
}).listen(path, () => console.log('0'));
"#;

/// Certificates made by the openssl CLI in a temp dir: a test CA, leaves it signed (valid and
/// expired) and a self-signed one, all for 127.0.0.1, ::1 and localhost.
struct Certs {
    dir: tempfile::TempDir,
}

impl Certs {
    fn new() -> Certs {
        let dir = tempfile::tempdir().unwrap();
        let c = Certs { dir };
        let san = "subjectAltName=IP:127.0.0.1,IP:::1,DNS:localhost";
        c.openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "3650",
            "-subj",
            "/CN=pmguard test CA",
        ]);
        c.openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "self.key",
            "-out",
            "self.pem",
            "-days",
            "30",
            "-subj",
            "/CN=localhost",
            "-addext",
            san,
        ]);
        c.openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "leaf.key",
            "-out",
            "leaf.csr",
            "-subj",
            "/CN=localhost",
        ]);
        std::fs::write(
            c.path("ext.cnf"),
            format!("{san}\nbasicConstraints=CA:FALSE\n"),
        )
        .unwrap();
        std::fs::write(c.path("index.txt"), "").unwrap();
        std::fs::write(c.path("serial"), "1000\n").unwrap();
        let ca_cnf = "[ca]\ndefault_ca=d\n[d]\ndir=.\ndatabase=index.txt\nserial=serial\nnew_certs_dir=.\ncertificate=ca.pem\nprivate_key=ca.key\ndefault_md=sha256\npolicy=p\nunique_subject=no\ncopy_extensions=none\n[p]\ncommonName=supplied\n";
        std::fs::write(c.path("ca.cnf"), ca_cnf).unwrap();
        let sign = |out: &str, dates: &[&str]| {
            let mut args = vec![
                "ca", "-batch", "-config", "ca.cnf", "-in", "leaf.csr", "-out", out, "-extfile",
                "ext.cnf", "-notext",
            ];
            args.extend_from_slice(dates);
            c.openssl(&args);
        };
        sign("leaf.pem", &["-days", "100"]);
        sign(
            "expired.pem",
            &[
                "-startdate",
                "20200101000000Z",
                "-enddate",
                "20200201000000Z",
            ],
        );
        c
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn openssl(&self, args: &[&str]) {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .expect("openssl runs");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A TLS server on `host` with this certificate and key.
    fn serve(&self, cert: &str, key: &str, host: &str) -> Server {
        spawn(
            Command::new("python3")
                .args(["-c", TLS_SERVER])
                .arg(self.path(cert))
                .arg(self.path(key))
                .arg(host),
        )
    }
}

/// The probes of the first app of a config made of `app_keys`.
fn prober(app_keys: &str) -> Prober {
    let text = format!("[[apps]]\nname = \"web\"\ntimeout = \"2s\"\n{app_keys}\n");
    let c = Config::parse(Path::new("/t.toml"), &text).unwrap_or_else(|e| panic!("{e}"));
    Prober::new(c.apps[0].probes.clone())
}

fn probe(app_keys: &str) -> ProbeResult {
    prober(app_keys).probe()
}

#[test]
fn https_verifies_against_a_ca_file_and_records_the_days_left() {
    let certs = Certs::new();
    let srv = certs.serve("leaf.pem", "leaf.key", "127.0.0.1");
    let ca = certs.path("ca.pem");
    let r = probe(&format!(
        "health_url = \"https://127.0.0.1:{}/health\"\nca_file = \"{}\"\nexpect_body = \"healthy\"",
        srv.port,
        ca.display()
    ));
    assert_eq!(r.outcome, ProbeOutcome::Pass { status: 200 }, "{r:?}");
    assert!(matches!(r.cert_days, Some(98..=100)), "{r:?}");
    // Below cert_warn_days: a warning, once per day left, not on every check.
    let mut p = prober(&format!(
        "health_url = \"https://localhost:{}/health\"\nca_file = \"{}\"\ncert_warn_days = 120",
        srv.port,
        ca.display()
    ));
    let first = p.probe();
    assert!(first.outcome.passed(), "{first:?}");
    assert!(
        matches!(first.cert_warning, Some((_, 98..=100))),
        "{first:?}"
    );
    assert_eq!(p.probe().cert_warning, None);
    // The system roots do not know the test CA.
    let r = probe(&format!(
        "health_url = \"https://127.0.0.1:{}/health\"",
        srv.port
    ));
    assert!(
        matches!(&r.outcome, ProbeOutcome::Tls(e) if e.contains("UnknownIssuer")),
        "{r:?}"
    );
}

#[test]
fn a_self_signed_certificate_fails_unless_tls_verify_is_off() {
    let certs = Certs::new();
    let srv = certs.serve("self.pem", "self.key", "127.0.0.1");
    let url = format!("health_url = \"https://127.0.0.1:{}/health\"", srv.port);
    let r = probe(&url);
    assert!(matches!(r.outcome, ProbeOutcome::Tls(_)), "{r:?}");
    assert!(r.outcome.reason().starts_with("tls failed"), "{r:?}");
    let r = probe(&format!("{url}\ntls_verify = false"));
    assert_eq!(r.outcome, ProbeOutcome::Pass { status: 200 }, "{r:?}");
    assert!(matches!(r.cert_days, Some(29..=30)), "{r:?}");
}

#[test]
fn an_expired_certificate_fails_and_reports_negative_days() {
    let certs = Certs::new();
    let srv = certs.serve("expired.pem", "leaf.key", "127.0.0.1");
    let r = probe(&format!(
        "health_url = \"https://127.0.0.1:{}/health\"\nca_file = \"{}\"",
        srv.port,
        certs.path("ca.pem").display()
    ));
    assert!(
        matches!(&r.outcome, ProbeOutcome::Tls(e) if e.to_lowercase().contains("expired")),
        "{r:?}"
    );
    assert!(r.cert_days.is_some_and(|d| d < -1000), "{r:?}");
}

#[test]
fn https_on_an_ipv6_literal_and_a_name_with_two_addresses() {
    let certs = Certs::new();
    let srv = certs.serve("leaf.pem", "leaf.key", "::1");
    let ca = certs.path("ca.pem");
    let r = probe(&format!(
        "health_url = \"https://[::1]:{}/health\"\nca_file = \"{}\"",
        srv.port,
        ca.display()
    ));
    assert_eq!(r.outcome, ProbeOutcome::Pass { status: 200 }, "{r:?}");
    // `localhost` is 127.0.0.1 then ::1: nothing listens on the first, the second answers.
    let r = probe(&format!(
        "health_url = \"https://localhost:{}/health\"\nca_file = \"{}\"",
        srv.port,
        ca.display()
    ));
    assert_eq!(r.outcome, ProbeOutcome::Pass { status: 200 }, "{r:?}");
}

#[test]
fn http_over_a_unix_socket_with_headers_the_server_checks() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("app.sock");
    let _srv = spawn(Command::new("node").args(["-e", UNIX_SERVER]).arg(&sock));
    let base = format!("health_socket = \"{}\"\n", sock.display());
    let good = "headers = { Host = \"api.internal\", Authorization = \"Bearer t0ken\" }";
    let r = probe(&format!(
        "{base}health_url = \"http://localhost/h\"\n{good}\nexpect_body_regex = '\"db\":\"up\"'"
    ));
    assert_eq!(r.outcome, ProbeOutcome::Pass { status: 200 }, "{r:?}");
    assert_eq!(
        r.target,
        format!("http://localhost/h via {}", sock.display())
    );
    let r = probe(&format!(
        "{base}health_url = \"http://localhost/h\"\nheaders = {{ Host = \"api.internal\" }}"
    ));
    assert_eq!(r.outcome, ProbeOutcome::Status(401), "{r:?}");
    // A redirect is the status; it is never followed.
    let r = probe(&format!(
        "{base}health_url = \"http://localhost/old\"\n{good}"
    ));
    assert_eq!(r.outcome, ProbeOutcome::Status(302), "{r:?}");
    let r = probe(&format!(
        "{base}health_url = \"http://localhost/h\"\n{good}\nmethod = \"HEAD\""
    ));
    assert_eq!(r.outcome, ProbeOutcome::Pass { status: 200 }, "{r:?}");
    // No socket there: a connect failure naming the path.
    let r = probe(&format!(
        "health_socket = \"{}/none.sock\"\nhealth_url = \"http://localhost/h\"",
        dir.path().display()
    ));
    assert!(
        matches!(&r.outcome, ProbeOutcome::Connect(e) if e.contains("none.sock")),
        "{r:?}"
    );
}

#[test]
fn tcp_probes_pass_on_connect_and_all_probes_must_pass() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let r = probe(&format!("tcp = \"127.0.0.1:{port}\""));
    assert_eq!(r.outcome, ProbeOutcome::Connected, "{r:?}");
    assert!(r.outcome.passed());
    let r = probe(&format!("tcp = \"127.0.0.1:{closed}\""));
    assert!(matches!(r.outcome, ProbeOutcome::Connect(_)), "{r:?}");
    // Two probes: the first passes, the second fails: the check fails, naming the second.
    let r = probe(&format!(
        "tcp = \"127.0.0.1:{port}\"\n[[apps.probes]]\ntcp = \"127.0.0.1:{closed}\""
    ));
    assert!(matches!(r.outcome, ProbeOutcome::Connect(_)), "{r:?}");
    assert_eq!(r.target, format!("tcp://127.0.0.1:{closed}"));
    let r = probe(&format!(
        "tcp = \"127.0.0.1:{port}\"\n[[apps.probes]]\ntcp = \"[::1]:{port}\"\ntimeout = \"200ms\""
    ));
    assert!(!r.outcome.passed(), "nothing on ::1: {r:?}");
    drop(listener);
}

/// A TLS port that accepts and never answers the handshake must not delay another app's check
/// on the same poll loop (the daemon's way of running probes).
#[test]
fn a_hung_tls_handshake_does_not_delay_another_probe() {
    let black_hole = TcpListener::bind("127.0.0.1:0").unwrap();
    let hole = black_hole.local_addr().unwrap().port();
    let held = thread::spawn(move || {
        let (mut s, _) = black_hole.accept().unwrap();
        let mut b = [0u8; 1024];
        let _ = s.read(&mut b);
        thread::sleep(Duration::from_secs(4));
        let _ = s.write_all(b"");
    });
    let fast = TcpListener::bind("127.0.0.1:0").unwrap();
    let fast_port = fast.local_addr().unwrap().port();
    thread::spawn(move || {
        let (mut s, _) = fast.accept().unwrap();
        let mut b = [0u8; 1024];
        let _ = s.read(&mut b);
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
    });
    let mut probers = [
        prober(&format!(
            "[[apps.probes]]\nhealth_url = \"https://127.0.0.1:{hole}/h\"\ntimeout = \"2s\""
        )),
        prober(&format!("health_url = \"http://127.0.0.1:{fast_port}/h\"")),
    ];
    let began = Instant::now();
    let mut done: [Option<(ProbeOutcome, Duration)>; 2] = [None, None];
    // The fast reply may be there by the time its request went: that check ends at its start.
    let mut flights: Vec<_> = Vec::new();
    for (i, p) in probers.iter_mut().enumerate() {
        match p.start() {
            Started::Pending(f) => flights.push(Some(f)),
            Started::Done(r) => {
                done[i] = Some((r.outcome, began.elapsed()));
                flights.push(None);
            }
        }
    }
    assert!(
        flights[0].is_some(),
        "the TLS handshake cannot be done at its start"
    );
    while done.iter().any(Option::is_none) {
        {
            let mut fds: Vec<PollFd<'_>> = flights
                .iter()
                .flatten()
                .map(|f| PollFd::from_borrowed_fd(f.fd(), f.events()))
                .collect();
            let _ = poll(
                &mut fds,
                Some(&Timespec {
                    tv_sec: 0,
                    tv_nsec: 20_000_000,
                }),
            );
        }
        for i in 0..2 {
            if let Some(f) = flights[i].as_mut() {
                if let Some(r) = probers[i].advance(f) {
                    done[i] = Some((r.outcome, began.elapsed()));
                    flights[i] = None;
                }
            }
        }
    }
    let (fast_outcome, fast_at) = done[1].clone().unwrap();
    assert_eq!(fast_outcome, ProbeOutcome::Pass { status: 200 });
    // Well before the hung one's deadline (a loaded 2-core machine can take a few 100 ms).
    assert!(fast_at < Duration::from_millis(1000), "{fast_at:?}");
    let (hole_outcome, hole_at) = done[0].clone().unwrap();
    assert_eq!(hole_outcome, ProbeOutcome::Timeout);
    assert!(
        hole_at >= Duration::from_millis(2000) && hole_at < Duration::from_millis(2600),
        "{hole_at:?}"
    );
    drop(held);
}

/// `pmguard-agent validate --config <cfg>`.
fn validate(cfg: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_pmguard-agent"))
        .args(["validate", "--config"])
        .arg(cfg)
        .output()
        .unwrap()
}

#[test]
fn validate_says_loudly_that_a_certificate_is_not_verified() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("pmguard.toml");
    std::fs::write(
        &cfg,
        "[[apps]]\nname = \"web\"\nhealth_url = \"https://127.0.0.1:8443/health?token=s3cret\"\ntls_verify = false\nheaders = { Authorization = \"Bearer s3cret\" }\n",
    )
    .unwrap();
    let out = validate(&cfg);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("WARNING: app `web`: tls_verify = false"),
        "{text}"
    );
    assert!(!text.contains("s3cret"), "{text}");
}

/// A `ca_file` that is a FIFO, missing, or not PEM, and an https host no certificate can name,
/// are refused when the config is validated (and by `run` and `check`), promptly: never waited
/// on, and never counted as the app's failures (which would restart a healthy app).
#[test]
fn validate_refuses_probes_that_could_never_pass() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("ca.pem");
    assert!(rustix::fs::mknodat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .is_ok());
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate\n").unwrap();
    let cases = [
        (
            format!("ca_file = \"{}\"", fifo.display()),
            "not a regular file",
        ),
        (
            format!("ca_file = \"{}\"", junk.display()),
            "no usable certificate",
        ),
        (
            "ca_file = \"/nonexistent/ca.pem\"".to_string(),
            "no such file",
        ),
    ];
    for (key, said) in cases {
        let cfg = dir.path().join("pmguard.toml");
        std::fs::write(
            &cfg,
            format!("[[apps]]\nname = \"web\"\nhealth_url = \"https://127.0.0.1:8443/h\"\n{key}\n"),
        )
        .unwrap();
        let started = std::time::Instant::now();
        let out = validate(&cfg);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{key}: {err}");
        assert!(err.contains(said) && err.contains("help:"), "{key}: {err}");
        assert!(started.elapsed() < Duration::from_secs(10), "{key}: waited");
    }
    let cfg = dir.path().join("pmguard.toml");
    std::fs::write(
        &cfg,
        "[[apps]]\nname = \"web\"\nhealth_url = \"https://127.1:8443/h\"\n",
    )
    .unwrap();
    let out = validate(&cfg);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("not a name a certificate can be checked against"),
        "{err}"
    );
}

/// The watch loop's way with several probes: one `InFlight` moves from the first probe's socket
/// to the second's inside `advance`; the caller just polls whatever `fd()` is now.
#[test]
fn several_probes_run_in_turn_through_one_in_flight_check() {
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    let tcp_port = tcp.local_addr().unwrap().port();
    let http = TcpListener::bind("127.0.0.1:0").unwrap();
    let http_port = http.local_addr().unwrap().port();
    thread::spawn(move || {
        let (mut s, _) = http.accept().unwrap();
        let mut b = [0u8; 1024];
        let _ = s.read(&mut b);
        thread::sleep(Duration::from_millis(100));
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nhealthy");
    });
    let mut p = prober(&format!(
        "tcp = \"127.0.0.1:{tcp_port}\"\n[[apps.probes]]\nhealth_url = \"http://127.0.0.1:{http_port}/h\"\nexpect_body = \"healthy\""
    ));
    let Started::Pending(mut f) = p.start() else {
        panic!("no check in flight")
    };
    let result = loop {
        {
            let mut fds = [PollFd::from_borrowed_fd(f.fd(), f.events())];
            let _ = poll(
                &mut fds,
                Some(&Timespec {
                    tv_sec: 0,
                    tv_nsec: 50_000_000,
                }),
            );
        }
        if let Some(r) = p.advance(&mut f) {
            break r;
        }
    };
    assert_eq!(
        result.outcome,
        ProbeOutcome::Pass { status: 200 },
        "{result:?}"
    );
    assert!(result.latency >= Duration::from_millis(100), "{result:?}");
    drop(tcp);
}

#[test]
fn an_unreadable_ca_file_fails_the_probe_and_says_why() {
    let r = probe("health_url = \"https://127.0.0.1:1/h\"\nca_file = \"/nonexistent/ca.pem\"");
    // Connect comes first: port 1 refuses, so point at a listener to reach the TLS setup.
    assert!(!r.outcome.passed());
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let r = probe(&format!(
        "health_url = \"https://127.0.0.1:{port}/h\"\nca_file = \"/nonexistent/ca.pem\""
    ));
    assert!(
        matches!(&r.outcome, ProbeOutcome::Tls(e) if e.contains("ca_file /nonexistent/ca.pem")),
        "{r:?}"
    );
}

/// The outbound client (`net`, used by the AWS and notify sinks) over the same TLS servers:
/// verification is always on, so a certificate the system roots do not know is refused, and the
/// same server passes with its CA as roots.
#[test]
fn the_outbound_client_verifies_https_and_speaks_it() {
    use pmguard_agent::net::{send, send_with, tls, Limits, NetError, Request, Url};
    use std::sync::Arc;

    let certs = Certs::new();
    let srv = certs.serve("leaf.pem", "leaf.key", "127.0.0.1");
    let url = Url::parse(&format!(
        "https://localhost:{}/health?token=SECRET",
        srv.port
    ))
    .unwrap();
    let req = Request {
        method: "GET",
        url: &url,
        headers: &[],
        body: b"",
    };
    let limits = Limits {
        connect: Duration::from_secs(1),
        total: Duration::from_secs(3),
        max_body: 4096,
    };
    let refused = send(&req, &limits).unwrap_err();
    assert!(
        matches!(&refused, NetError::Tls(e) if e.contains("UnknownIssuer")),
        "{refused}"
    );
    assert!(!refused.to_string().contains("SECRET"), "{refused}");

    let roots = pmguard_agent::probe::tls::roots_from(&certs.path("ca.pem")).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let reply = send_with(&req, &limits, &Arc::new(config)).unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body, br#"{"status":"healthy"}"#);
}
