//! `/healthz`, `/readyz` and Prometheus `/metrics`, on a plain HTTP/1.1
//! listener (three GET paths do not need an HTTP stack).

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Result;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};
use tracing::warn;

use crate::maps;

/// Default port of the agent's metrics and health endpoints.
pub const DEFAULT_ADDR: &str = "0.0.0.0:9963";

const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

#[derive(Default)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, secs: f64) {
        if self.counts.is_empty() {
            self.counts = vec![0; BUCKETS.len()];
        }
        for (c, le) in self.counts.iter_mut().zip(BUCKETS) {
            if secs <= *le {
                *c += 1;
            }
        }
        self.sum += secs;
        self.count += 1;
    }
}

/// What the agent reports about itself; shared by the tasks that do work.
#[derive(Default)]
pub struct Telemetry {
    ready: bool,
    objects: BTreeMap<&'static str, usize>,
    errors: BTreeMap<&'static str, u64>,
    reconcile: BTreeMap<&'static str, Histogram>,
}

pub type Shared = Arc<Mutex<Telemetry>>;

fn with(t: &Shared, f: impl FnOnce(&mut Telemetry)) {
    if let Ok(mut t) = t.lock() {
        f(&mut t);
    }
}

pub fn set_ready(t: &Shared) {
    with(t, |t| t.ready = true);
}

pub fn set_objects(t: &Shared, kind: &'static str, n: usize) {
    with(t, |t| {
        t.objects.insert(kind, n);
    });
}

pub fn error(t: &Shared, kind: &'static str) {
    with(t, |t| *t.errors.entry(kind).or_default() += 1);
}

/// Records how long one reconcile of `what` took.
pub fn reconciled(t: &Shared, what: &'static str, took: Duration) {
    with(t, |t| {
        t.reconcile
            .entry(what)
            .or_default()
            .observe(took.as_secs_f64())
    });
}

fn render(t: &Telemetry, pin_dir: &std::path::Path) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP dataplane_ready Whether the agent has restored its state and applied its sources."
    );
    let _ = writeln!(
        out,
        "# TYPE dataplane_ready gauge\ndataplane_ready {}",
        u8::from(t.ready)
    );
    let _ = writeln!(
        out,
        "# HELP dataplane_objects Objects the agent holds, by kind.\n# TYPE dataplane_objects gauge"
    );
    for (kind, n) in &t.objects {
        let _ = writeln!(out, "dataplane_objects{{kind=\"{kind}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "# HELP dataplane_errors_total Errors by kind.\n# TYPE dataplane_errors_total counter"
    );
    for (kind, n) in &t.errors {
        let _ = writeln!(out, "dataplane_errors_total{{kind=\"{kind}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "# HELP dataplane_reconcile_duration_seconds Time to apply one change to the maps.\n# TYPE dataplane_reconcile_duration_seconds histogram"
    );
    for (what, h) in &t.reconcile {
        for (le, c) in BUCKETS.iter().zip(&h.counts) {
            let _ = writeln!(
                out,
                "dataplane_reconcile_duration_seconds_bucket{{what=\"{what}\",le=\"{le}\"}} {c}"
            );
        }
        let _ = writeln!(
            out,
            "dataplane_reconcile_duration_seconds_bucket{{what=\"{what}\",le=\"+Inf\"}} {}",
            h.count
        );
        let _ = writeln!(
            out,
            "dataplane_reconcile_duration_seconds_sum{{what=\"{what}\"}} {}",
            h.sum
        );
        let _ = writeln!(
            out,
            "dataplane_reconcile_duration_seconds_count{{what=\"{what}\"}} {}",
            h.count
        );
    }
    let _ = writeln!(
        out,
        "# HELP dataplane_map_entries Entries in use per BPF map.\n# TYPE dataplane_map_entries gauge"
    );
    let mut caps = String::new();
    for spec in dataplane_common::MAPS {
        match maps::count(pin_dir, spec.name) {
            Ok(n) => {
                let _ = writeln!(out, "dataplane_map_entries{{map=\"{}\"}} {n}", spec.name);
            }
            Err(e) => warn!("metrics: {}: {e:#}", spec.name),
        }
        let _ = writeln!(
            caps,
            "dataplane_map_capacity{{map=\"{}\"}} {}",
            spec.name, spec.max_entries
        );
    }
    let _ = writeln!(
        out,
        "# HELP dataplane_map_capacity Maximum entries per BPF map.\n# TYPE dataplane_map_capacity gauge"
    );
    out.push_str(&caps);
    let _ = writeln!(
        out,
        "# HELP dataplane_packets_total Packets by verdict: forwarded or the drop reason.\n# TYPE dataplane_packets_total counter"
    );
    let _ = writeln!(
        out,
        "# HELP dataplane_bytes_total Bytes by verdict.\n# TYPE dataplane_bytes_total counter"
    );
    if let Ok(rows) = maps::metrics::rows(pin_dir) {
        for r in rows {
            let labels = format!("direction=\"{}\",reason=\"{}\"", r.direction, r.reason);
            let _ = writeln!(out, "dataplane_packets_total{{{labels}}} {}", r.packets);
            let _ = writeln!(out, "dataplane_bytes_total{{{labels}}} {}", r.bytes);
        }
    }
    out
}

/// Serves until the process ends. Bind errors are returned at once.
pub async fn serve(addr: &str, t: Shared, pin_dir: PathBuf) -> Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("--metrics-addr {addr}: {e}"))?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (t, pin_dir) = (t.clone(), pin_dir.clone());
            tokio::spawn(async move {
                if let Err(e) = answer(stream, &t, &pin_dir).await {
                    warn!("metrics connection: {e}");
                }
            });
        }
    });
    Ok(())
}

async fn answer(
    mut stream: TcpStream,
    t: &Shared,
    pin_dir: &std::path::Path,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 8192];
    let mut len = 0;
    while !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
        if len == buf.len() {
            break;
        }
        let n =
            tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf[len..])).await??;
        if n == 0 {
            break;
        }
        len += n;
    }
    let request = String::from_utf8_lossy(&buf[..len]);
    let mut parts = request.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, ctype, body) = match (method, path) {
        ("GET", "/healthz") => ("200 OK", "text/plain", "ok\n".to_owned()),
        ("GET", "/readyz") => {
            if t.lock().map(|t| t.ready).unwrap_or(false) {
                ("200 OK", "text/plain", "ready\n".to_owned())
            } else {
                (
                    "503 Service Unavailable",
                    "text/plain",
                    "not ready\n".to_owned(),
                )
            }
        }
        ("GET", "/metrics") => {
            let body = match t.lock() {
                Ok(t) => render(&t, pin_dir),
                Err(_) => String::new(),
            };
            ("200 OK", "text/plain; version=0.0.4", body)
        }
        ("GET", _) => (
            "404 Not Found",
            "text/plain",
            "try /metrics, /healthz or /readyz\n".to_owned(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n".to_owned(),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let mut h = Histogram::default();
        for s in [0.0001, 0.003, 0.2, 9.0] {
            h.observe(s);
        }
        assert_eq!(h.count, 4);
        assert_eq!(h.counts[0], 1); // <= 0.5 ms
        assert_eq!(h.counts[3], 2); // <= 5 ms
        assert_eq!(*h.counts.last().unwrap(), 3); // <= 5 s; 9 s only in +Inf
    }
}
