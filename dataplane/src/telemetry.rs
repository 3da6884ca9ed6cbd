//! `/healthz`, `/readyz` and Prometheus `/metrics` (axum, prometheus-client).
//! The agent's own figures are kept in prometheus-client metrics; the
//! datapath's (map fill, verdicts) are read from the pinned maps at scrape
//! time by a collector, so they are exact and never cached.

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::Result;
use axum::{Router, extract::State, http::StatusCode, http::header, response::IntoResponse};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::Histogram,
    },
    registry::Registry,
};
use tracing::warn;

use crate::maps;

/// Default port of the agent's metrics and health endpoints.
pub const DEFAULT_ADDR: &str = "0.0.0.0:9963";

const BUCKETS: [f64; 13] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WhatLabel {
    what: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabel {
    map: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabels {
    hook: String,
    direction: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FlowLabels {
    hook: String,
    direction: String,
}

/// What the agent reports about itself; shared by the tasks that do work.
pub struct Telemetry {
    registry: Registry,
    ready: AtomicBool,
    ready_gauge: Gauge,
    objects: Family<KindLabel, Gauge>,
    errors: Family<KindLabel, Counter>,
    reconcile: Family<WhatLabel, Histogram, fn() -> Histogram>,
    ct_collected: Counter,
    ct_evicted: Counter,
    ct_live: Gauge,
}

pub type Shared = Arc<Telemetry>;

fn histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

/// A packets family and a bytes family ((name, help) each) of verdict
/// counter `rows`, labelled by `labels`.
fn verdict_families<L: EncodeLabelSet + std::fmt::Debug>(
    encoder: &mut DescriptorEncoder,
    [packets, bytes]: [(&str, &str); 2],
    rows: &[&maps::metrics::MetricsRow],
    labels: impl Fn(&maps::metrics::MetricsRow) -> L,
) -> Result<(), std::fmt::Error> {
    for ((name, help), of_bytes) in [(packets, false), (bytes, true)] {
        let mut family =
            encoder.encode_descriptor(name, help, None, ConstCounter::new(0u64).metric_type())?;
        for r in rows {
            let v = if of_bytes { r.bytes } else { r.packets };
            ConstCounter::new(v).encode(family.encode_family(&labels(r))?)?;
        }
    }
    Ok(())
}

/// Counters without labels, read at scrape time: (name, help, value).
fn counters<const N: usize>(
    encoder: &mut DescriptorEncoder,
    items: [(&str, &str, u64); N],
) -> Result<(), std::fmt::Error> {
    for (name, help, v) in items {
        let metric = ConstCounter::new(v);
        let enc = encoder.encode_descriptor(name, help, None, metric.metric_type())?;
        metric.encode(enc)?;
    }
    Ok(())
}

/// Reads the pinned maps on every scrape.
#[derive(Debug)]
struct Datapath {
    pin_dir: PathBuf,
}

impl Collector for Datapath {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut entries = Vec::new();
        for spec in dataplane_common::MAPS {
            match maps::count(&self.pin_dir, spec.name) {
                Ok(n) => entries.push((spec.name, n as i64)),
                Err(e) => warn!("metrics: {}: {e:#}", spec.name),
            }
        }
        let mut family = encoder.encode_descriptor(
            "dataplane_map_entries",
            "Entries in use per BPF map.",
            None,
            ConstGauge::new(0i64).metric_type(),
        )?;
        for (name, n) in entries {
            let labels = MapLabel { map: name.into() };
            ConstGauge::new(n).encode(family.encode_family(&labels)?)?;
        }
        let mut family = encoder.encode_descriptor(
            "dataplane_map_capacity",
            "Maximum entries per BPF map.",
            None,
            ConstGauge::new(0i64).metric_type(),
        )?;
        for spec in dataplane_common::MAPS {
            let labels = MapLabel {
                map: spec.name.into(),
            };
            // As created: some sizes are the agent's settings (--ct-max).
            let max = aya::maps::MapInfo::from_pin(self.pin_dir.join(spec.pin_name()))
                .map(|i| i.max_entries())
                .unwrap_or(spec.max_entries);
            ConstGauge::new(i64::from(max)).encode(family.encode_family(&labels)?)?;
        }
        if let Ok(s) = maps::ct::stats(&self.pin_dir) {
            counters(
                &mut encoder,
                [
                    (
                        "dataplane_ct_created",
                        "Conntrack entries the programs created.",
                        s.created,
                    ),
                    (
                        "dataplane_nat_ports_exhausted",
                        "New NAT flows refused because no port toward their destination was free.",
                        s.nat_exhausted,
                    ),
                ],
            )?;
        }
        let rows = maps::metrics::rows(&self.pin_dir).unwrap_or_else(|e| {
            warn!("metrics: dp_metrics: {e:#}");
            Vec::new()
        });
        // Forwarded packets by where they were seen; every other verdict is
        // a drop (or an answer in its place) under its named reason.
        let (forwarded, dropped): (Vec<_>, Vec<_>) =
            rows.iter().partition(|r| r.reason == "forwarded");
        let flow = |r: &maps::metrics::MetricsRow| FlowLabels {
            hook: r.hook.clone(),
            direction: r.direction.clone(),
        };
        let drop = |r: &maps::metrics::MetricsRow| VerdictLabels {
            hook: r.hook.clone(),
            direction: r.direction.clone(),
            reason: r.reason.clone(),
        };
        verdict_families(
            &mut encoder,
            [
                (
                    "dataplane_forward_count",
                    "Packets the datapath forwarded, per hook and direction.",
                ),
                (
                    "dataplane_forward_bytes",
                    "Bytes the datapath forwarded, per hook and direction.",
                ),
            ],
            &forwarded,
            flow,
        )?;
        verdict_families(
            &mut encoder,
            [
                (
                    "dataplane_drop_count",
                    "Packets dropped (or answered with an ICMP error instead), by reason, hook and direction.",
                ),
                (
                    "dataplane_drop_bytes",
                    "Bytes dropped, by reason, hook and direction.",
                ),
            ],
            &dropped,
            drop,
        )?;
        if let Ok(l) = maps::events::losses(&self.pin_dir) {
            counters(
                &mut encoder,
                [
                    (
                        "dataplane_events_lost",
                        "Monitor events the ring buffer had no room for.",
                        l.lost,
                    ),
                    (
                        "dataplane_events_over_budget",
                        "Monitor events not emitted: over a CPU's budget per second.",
                        l.limited,
                    ),
                ],
            )?;
        }
        Ok(())
    }
}

/// Asks the BGP daemon on every scrape: (birdc, control socket).
#[derive(Debug)]
struct BgpSessions {
    client: PathBuf,
    socket: PathBuf,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabel {
    peer: String,
}

impl Collector for BgpSessions {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let out = std::process::Command::new(&self.client)
            .arg("-s")
            .arg(&self.socket)
            .args(["show", "protocols", "all"])
            .output();
        let sessions = match out {
            Ok(o) if o.status.success() => {
                crate::bgp::parse_protocols(&String::from_utf8_lossy(&o.stdout))
            }
            _ => Vec::new(),
        };
        let peer = |s: &crate::bgp::Session| PeerLabel {
            peer: if s.neighbor.is_empty() {
                s.name.clone()
            } else {
                s.neighbor.clone()
            },
        };
        let mut family = encoder.encode_descriptor(
            "dataplane_bgp_session_state",
            "Each BGP session's state, numbered as RFC 4271 (BGP4-MIB bgpPeerState): 1 Idle, 2 Connect, 3 Active, 4 OpenSent, 5 OpenConfirm, 6 Established; 0 when the daemon does not say.",
            None,
            ConstGauge::new(0i64).metric_type(),
        )?;
        for s in &sessions {
            ConstGauge::new(i64::from(crate::bgp::state_code(s)))
                .encode(family.encode_family(&peer(s))?)?;
        }
        for (name, help, sent) in [
            (
                "dataplane_bgp_updates_received",
                "Route updates received from each BGP peer.",
                false,
            ),
            (
                "dataplane_bgp_updates_sent",
                "Route updates sent to each BGP peer.",
                true,
            ),
        ] {
            let mut family = encoder.encode_descriptor(
                name,
                help,
                None,
                ConstCounter::new(0u64).metric_type(),
            )?;
            for s in &sessions {
                let v = if sent {
                    s.updates_sent
                } else {
                    s.updates_received
                };
                ConstCounter::new(v).encode(family.encode_family(&peer(s))?)?;
            }
        }
        Ok(())
    }
}

impl Telemetry {
    /// `bgp`: birdc and the daemon's control socket, when BGP is on.
    pub fn new(pin_dir: PathBuf, bgp: Option<(PathBuf, PathBuf)>) -> Shared {
        let mut registry = Registry::default();
        let ready_gauge = Gauge::default();
        registry.register(
            "dataplane_ready",
            "Whether the agent has restored its state, applied its source and knows its pod CIDR.",
            ready_gauge.clone(),
        );
        let objects = Family::<KindLabel, Gauge>::default();
        registry.register(
            "dataplane_objects",
            "Objects the agent holds, by kind.",
            objects.clone(),
        );
        let errors = Family::<KindLabel, Counter>::default();
        registry.register("dataplane_errors", "Errors by kind.", errors.clone());
        let reconcile = Family::<WhatLabel, Histogram, fn() -> Histogram>::new_with_constructor(
            histogram as fn() -> Histogram,
        );
        registry.register(
            "dataplane_reconcile_duration_seconds",
            "Time to apply one change to the maps.",
            reconcile.clone(),
        );
        let ct_collected = Counter::default();
        registry.register(
            "dataplane_ct_collected",
            "Expired conntrack entries the agent removed.",
            ct_collected.clone(),
        );
        let ct_evicted = Counter::default();
        registry.register(
            "dataplane_ct_evicted",
            "Conntrack entries the full table's LRU evicted (counted at each collection).",
            ct_evicted.clone(),
        );
        let ct_live = Gauge::default();
        registry.register(
            "dataplane_ct_entries",
            "Conntrack entries after the last collection.",
            ct_live.clone(),
        );
        registry.register_collector(Box::new(Datapath { pin_dir }));
        if let Some((client, socket)) = bgp {
            registry.register_collector(Box::new(BgpSessions { client, socket }));
        }
        Arc::new(Telemetry {
            registry,
            ready: AtomicBool::new(false),
            ready_gauge,
            objects,
            errors,
            reconcile,
            ct_collected,
            ct_evicted,
            ct_live,
        })
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            warn!("metrics: encoding: {e}");
        }
        out
    }
}

pub fn set_ready(t: &Shared, ready: bool) {
    t.ready.store(ready, Ordering::Relaxed);
    t.ready_gauge.set(i64::from(ready));
}

pub fn set_objects(t: &Shared, kind: &str, n: usize) {
    t.objects
        .get_or_create(&KindLabel { kind: kind.into() })
        .set(i64::try_from(n).unwrap_or(i64::MAX));
}

pub fn error(t: &Shared, kind: &str) {
    t.errors
        .get_or_create(&KindLabel { kind: kind.into() })
        .inc();
}

/// Records how long one reconcile of `what` took.
pub fn reconciled(t: &Shared, what: &str, took: Duration) {
    t.reconcile
        .get_or_create(&WhatLabel { what: what.into() })
        .observe(took.as_secs_f64());
}

/// One conntrack collection: entries removed as expired, evicted since the
/// last one, live now.
pub fn ct_collected(t: &Shared, removed: u64, evicted: u64, live: usize) {
    t.ct_collected.inc_by(removed);
    t.ct_evicted.inc_by(evicted);
    t.ct_live.set(i64::try_from(live).unwrap_or(i64::MAX));
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(t): State<Shared>) -> impl IntoResponse {
    if t.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn metrics(State(t): State<Shared>) -> impl IntoResponse {
    // Reading the maps is a few hundred syscalls: off the async threads.
    let body = tokio::task::spawn_blocking(move || t.render())
        .await
        .unwrap_or_default();
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
}

/// Serves until the process ends. Bind errors are returned at once.
pub async fn serve(addr: &str, t: Shared) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("--metrics-addr {addr}: {e}"))?;
    let app = Router::new()
        .route("/healthz", axum::routing::get(healthz))
        .route("/readyz", axum::routing::get(readyz))
        .route("/metrics", axum::routing::get(metrics))
        .fallback(|| async { (StatusCode::NOT_FOUND, "try /metrics, /healthz or /readyz\n") })
        .with_state(t);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            warn!("metrics server stopped: {e}");
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_format_has_our_series() {
        let t = Telemetry::new(PathBuf::from("/nonexistent"), None);
        set_objects(&t, "Node", 3);
        error(&t, "manifest_invalid");
        reconciled(&t, "cluster", Duration::from_millis(3));
        set_ready(&t, true);
        let text = t.render();
        for line in [
            "dataplane_ready 1",
            "dataplane_objects{kind=\"Node\"} 3",
            "dataplane_errors_total{kind=\"manifest_invalid\"} 1",
            "dataplane_reconcile_duration_seconds_bucket{le=\"0.005\",what=\"cluster\"} 1",
            "dataplane_reconcile_duration_seconds_count{what=\"cluster\"} 1",
            "dataplane_map_capacity{map=\"dp_endpoints\"} 65536",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
    }
}
