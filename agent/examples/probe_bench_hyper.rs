//! Probe cost, the alternative the design card named: hyper's client (what reqwest wraps) with
//! hyper-rustls on a current-thread tokio runtime: one task per app, one GET a second each, a
//! new connection per probe (no pooling: a probe must see that the app still accepts), the
//! same rustls/aws-lc-rs and body check. `probe_bench_hyper <url> <apps> <seconds> [ca_file]`.

#[path = "probe_bench_common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

fn tls(ca_file: Option<&str>) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    if let Some(path) = ca_file {
        for c in CertificateDer::pem_file_iter(path).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth()
}

fn main() {
    let a = common::args();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls(a.ca_file.as_deref()))
        .https_or_http()
        .enable_http1()
        .build();
    let probes = Arc::new(AtomicU64::new(0));
    let passed = Arc::new(AtomicU64::new(0));
    let began = Instant::now();
    let cpu0 = common::cpu_secs();
    rt.block_on(async {
        let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .build(https);
        let uri: hyper::Uri = a.url.parse().unwrap();
        for i in 0..a.apps {
            let (client, uri) = (client.clone(), uri.clone());
            let (probes, passed) = (probes.clone(), passed.clone());
            let first = tokio::time::Instant::from_std(common::first_due(began, &a, i));
            let period = a.period;
            tokio::spawn(async move {
                let mut tick = tokio::time::interval_at(first, period);
                loop {
                    tick.tick().await;
                    let get = async {
                        let resp = client.get(uri.clone()).await.ok()?;
                        let ok = resp.status().is_success();
                        let body = resp.into_body().collect().await.ok()?.to_bytes();
                        Some(ok && body.windows(7).any(|w| w == b"healthy"))
                    };
                    let ok = tokio::time::timeout(Duration::from_secs(2), get).await;
                    probes.fetch_add(1, Ordering::Relaxed);
                    if matches!(ok, Ok(Some(true))) {
                        passed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
        tokio::time::sleep(Duration::from_secs(a.secs)).await;
    });
    let (p, ok) = (
        probes.load(Ordering::Relaxed),
        passed.load(Ordering::Relaxed),
    );
    common::report("hyper", &a, p, ok, cpu0, began);
}
