//! The outbound HTTP client (`pmguard_agent::net`) against small servers on 127.0.0.1 written
//! here byte by byte, so each reply framing and each misbehaving peer is exact: a Content-Length
//! reply, a chunked one, one read to EOF, an interim 100, a server that never answers or drips,
//! one that sends too much, a refused port. (https is tested in probes.rs, beside its servers.)

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use pmguard_agent::net::{send, Limits, NetError, Reply, Request, Url};

const LIMITS: Limits = Limits {
    connect: Duration::from_secs(1),
    total: Duration::from_secs(3),
    max_body: 1024,
};

/// Serves one connection: reads the request (head and Content-Length body), hands it to
/// `reply`, which writes the answer. Returns the URL and the request the server saw.
fn serve_once(
    reply: impl FnOnce(&mut TcpStream) + Send + 'static,
) -> (Url, thread::JoinHandle<Vec<u8>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let h = thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let seen = read_request(&mut s);
        reply(&mut s);
        seen
    });
    (
        Url::parse(&format!("http://127.0.0.1:{port}/hook/SECRET?k=v")).unwrap(),
        h,
    )
}

fn read_request(s: &mut TcpStream) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).unwrap();
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let len: usize = text
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .map_or(0, |v| v.trim().parse().unwrap());
            if buf.len() >= end + 4 + len || n == 0 {
                return buf;
            }
        }
        if n == 0 {
            return buf;
        }
    }
}

fn get(url: &Url, limits: &Limits) -> Result<Reply, NetError> {
    send(
        &Request {
            method: "GET",
            url,
            headers: &[],
            body: b"",
        },
        limits,
    )
}

fn post(url: &Url, body: &[u8]) -> Result<Reply, NetError> {
    send(
        &Request {
            method: "POST",
            url,
            headers: &[("Content-Type", "application/json")],
            body,
        },
        &LIMITS,
    )
}

#[test]
fn a_post_carries_its_framing_and_reads_a_content_length_reply() {
    let (url, seen) = serve_once(|s| {
        s.write_all(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Amzn-RequestId: r1\r\n\r\nhelloEXTRA",
        )
        .unwrap();
    });
    let r = post(&url, b"{\"a\":1}").unwrap();
    assert_eq!((r.status, r.body.as_slice()), (200, b"hello".as_slice()));
    assert_eq!(r.header("x-amzn-requestid"), Some("r1"));
    let req = String::from_utf8(seen.join().unwrap()).unwrap();
    assert!(
        req.starts_with("POST /hook/SECRET?k=v HTTP/1.1\r\n"),
        "{req}"
    );
    assert!(
        req.contains(&format!("\r\nHost: 127.0.0.1:{}\r\n", url.port)),
        "{req}"
    );
    assert!(req.contains("\r\nContent-Length: 7\r\n") && req.contains("\r\nConnection: close\r\n"));
    assert!(req.ends_with("\r\n\r\n{\"a\":1}"), "{req}");
}

#[test]
fn chunked_eof_and_interim_replies_are_read_whole() {
    let (url, _s) = serve_once(|s| {
        s.write_all(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n").unwrap();
    });
    let r = post(&url, b"").unwrap();
    assert_eq!((r.status, r.body.as_slice()), (201, b"abcde".as_slice()));

    let (url, _s) = serve_once(|s| {
        s.write_all(b"HTTP/1.0 503 Slow Down\r\n\r\nto the end")
            .unwrap();
    });
    let r = post(&url, b"").unwrap();
    assert_eq!(
        (r.status, r.body.as_slice()),
        (503, b"to the end".as_slice())
    );
}

#[test]
fn a_silent_or_dripping_server_is_cut_off_at_the_deadline() {
    let limits = Limits {
        total: Duration::from_millis(700),
        ..LIMITS
    };
    let (url, _s) = serve_once(|_s| thread::sleep(Duration::from_secs(2)));
    let t = Instant::now();
    let got = get(&url, &limits);
    assert_eq!(got, Err(NetError::Timeout));
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "{:?}",
        t.elapsed()
    );

    // One byte every 200 ms never lets a per-read timeout fire; the total deadline does.
    let (url, _s) = serve_once(|s| {
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n");
        for _ in 0..20 {
            if s.write_all(b"x").is_err() {
                return;
            }
            thread::sleep(Duration::from_millis(200));
        }
    });
    let t = Instant::now();
    let got = get(&url, &limits);
    assert_eq!(got.map(|r| (r.status, r.truncated)), Ok((200, true)));
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "{:?}",
        t.elapsed()
    );
}

/// Once the status line is in, the reply stands (a webhook that answered 200 got the alert),
/// and a body that did not come whole is marked, capped, for callers that parse it.
#[test]
fn too_much_or_broken_replies_are_marked_or_errors_without_the_secret() {
    let cut = |r: Result<Reply, NetError>| r.map(|r| (r.status, r.body.len(), r.truncated));
    let (url, _s) = serve_once(|s| {
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 99999\r\n\r\n");
    });
    assert_eq!(cut(post(&url, b"")), Ok((200, 0, true)));
    let (url, _s) = serve_once(|s| {
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\n\r\n");
        let _ = s.write_all(&[b'y'; 4096]);
    });
    assert_eq!(cut(post(&url, b"")), Ok((200, 1024, true)));
    let (url, _s) = serve_once(|s| {
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc");
    });
    let r = post(&url, b"").unwrap();
    assert_eq!(
        (r.status, r.body.as_slice(), r.truncated),
        (200, b"abc".as_slice(), true)
    );
    let e = r.whole().unwrap_err();
    assert!(matches!(e, NetError::Protocol(_)), "{e}");
    let (url, _s) = serve_once(|s| {
        let _ = s.write_all(b"SSH-2.0-OpenSSH\r\n\r\n");
    });
    assert!(matches!(post(&url, b""), Err(NetError::Protocol(_))));

    // Nothing listens on a port just freed.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = Url::parse(&format!("http://127.0.0.1:{port}/hook/SECRET")).unwrap();
    let e = post(&url, b"").unwrap_err();
    assert!(matches!(e, NetError::Connect(_)), "{e}");
    assert!(!e.to_string().contains("SECRET"), "{e}");
}

#[test]
fn a_header_cannot_inject_a_line_or_reframe_the_request() {
    let url = Url::parse("http://127.0.0.1:9/").unwrap();
    for headers in [
        [("X-A", "1\r\nX-Injected: 2")],
        [("Content-Length", "0")],
        [("Bad Name", "1")],
        [("Host", "evil")],
    ] {
        let got = send(
            &Request {
                method: "POST",
                url: &url,
                headers: &headers,
                body: b"",
            },
            &LIMITS,
        );
        assert!(
            matches!(got, Err(NetError::Protocol(_))),
            "{headers:?}: {got:?}"
        );
    }
}

/// A TLS server that feeds its handshake one byte at a time, each just inside a per-read
/// timeout, must not hold a request past its deadline (the handshake runs inside the first
/// write, so every socket operation re-arms its timeout from the one deadline).
#[test]
fn a_tls_handshake_fed_a_byte_at_a_time_is_cut_off_at_the_deadline() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let _server = thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let _ = s.write_all(&[0x16, 0x03, 0x03, 0x40, 0x00]);
        for _ in 0..30 {
            thread::sleep(Duration::from_millis(300));
            if s.write_all(&[0]).is_err() {
                return;
            }
        }
    });
    let url = Url::parse(&format!("https://localhost:{port}/")).unwrap();
    let limits = Limits {
        total: Duration::from_millis(1500),
        ..LIMITS
    };
    let t = Instant::now();
    let got = get(&url, &limits);
    assert!(got.is_err(), "{got:?}");
    assert!(
        t.elapsed() < Duration::from_millis(2500),
        "{:?}: {got:?}",
        t.elapsed()
    );
}
