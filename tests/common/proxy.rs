//! A counting HTTP proxy on 127.0.0.1 in front of the AWS stand-in: it forwards bytes unchanged
//! and records the AWS operation of every request, so tests can count mutating calls from the
//! outside (CBOR: `/operation/<Op>` in the path; JSON: `X-Amz-Target`; query: `Action=` in the body).
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

pub struct CountingProxy {
    pub port: u16,
    pub ops: Arc<Mutex<Vec<String>>>,
}

impl CountingProxy {
    pub fn start(upstream_port: u16) -> CountingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let ops = Arc::new(Mutex::new(Vec::new()));
        let seen = ops.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream_port)) else {
                    continue;
                };
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || copy_back(s2, c2));
                let seen = seen.clone();
                std::thread::spawn(move || forward(client, server, seen));
            }
        });
        CountingProxy { port, ops }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.ops.lock().unwrap())
    }
}

/// Operations that change something in AWS.
pub fn mutating(ops: &[String]) -> Vec<String> {
    ops.iter()
        .filter(|o| !(o.starts_with("Describe") || o.starts_with("List") || o.starts_with("Get")))
        .cloned()
        .collect()
}

fn copy_back(mut from: TcpStream, mut to: TcpStream) {
    let _ = std::io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Write);
}

fn forward(mut client: TcpStream, mut server: TcpStream, seen: Arc<Mutex<Vec<String>>>) {
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 16384];
    loop {
        // Parse whole requests out of what has arrived; forward them as they are.
        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let len = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                })
                .unwrap_or(0);
            if buf.len() < end + 4 + len {
                break;
            }
            let body = &buf[end + 4..end + 4 + len];
            seen.lock().unwrap().push(operation(&head, body));
            if server.write_all(&buf[..end + 4 + len]).is_err() {
                return;
            }
            buf.drain(..end + 4 + len);
        }
        match client.read(&mut chunk) {
            Ok(0) | Err(_) => {
                let _ = server.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn operation(head: &str, body: &[u8]) -> String {
    let path = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("");
    if let Some(op) = path.split("/operation/").nth(1) {
        return op.to_string();
    }
    for l in head.lines() {
        if let Some(v) = l.to_ascii_lowercase().strip_prefix("x-amz-target:") {
            let original = &l[l.len() - v.len()..];
            return original.trim().rsplit('.').next().unwrap_or("").to_string();
        }
    }
    let body = String::from_utf8_lossy(body);
    body.split('&')
        .find_map(|kv| kv.strip_prefix("Action="))
        .unwrap_or("?")
        .to_string()
}
