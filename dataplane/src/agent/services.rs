//! Services in the datapath: each changed Service (or, on a full sync,
//! every one) is computed from the model and applied by difference; the
//! conntrack collector removes expired flows, purges the UDP flows and
//! affinities of backends that left, and counts LRU evictions.

use std::{
    collections::{BTreeSet, VecDeque},
    net::Ipv4Addr,
    sync::Arc,
    time::Duration,
};

use anyhow::Result;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::{Agent, lock, reconcile::Problems};
use crate::{
    cluster::Cluster,
    lb,
    maps::{SyncStats, ct, services::SvcName},
    telemetry,
};

/// Applies Services `names` (every Service when `full`), and those their
/// changes hand frontends to. Returns every Service address in the maps.
pub(super) fn apply(
    agent: &Agent,
    cluster: &Cluster,
    names: &BTreeSet<SvcName>,
    full: bool,
    problems: &mut Problems,
) -> Result<BTreeSet<Ipv4Addr>> {
    let mut queue: VecDeque<SvcName> = if full {
        let mut all = cluster.service_names();
        all.extend(lock(&agent.services)?.applied_names());
        all.into_iter().collect()
    } else {
        names.iter().cloned().collect()
    };
    let mut done: BTreeSet<SvcName> = BTreeSet::new();
    let mut stats = SyncStats::default();
    let mut ended = BTreeSet::new();
    let mut applied = 0usize;
    let started = std::time::Instant::now();
    let mut svcs = lock(&agent.services)?;
    while let Some(name) = queue.pop_front() {
        // A Service handed a frontend by another is applied once more at
        // most per round: claims settle in one pass.
        if !done.insert(name.clone()) && !full {
            continue;
        }
        let (key, svc, slices) = cluster.service(&name.0, &name.1);
        let mut found = BTreeSet::new();
        let computed = svc.map(|s| {
            let refs: Vec<_> = slices.iter().map(|(_, s)| *s).collect();
            lb::compute(&key, s, &refs, &agent.node)
        });
        if svc.is_none() {
            for (k, _) in &slices {
                found.insert(format!(
                    "EndpointSlice {}/{}: metadata.labels[kubernetes.io/service-name] {:?}: no such Service; ignored",
                    k.namespace, k.name, name.1
                ));
            }
        }
        let out = svcs.apply(&name, computed.as_ref())?;
        applied += 1;
        found.extend(computed.into_iter().flat_map(|c| c.problems));
        found.extend(out.problems);
        problems.set(
            &agent.telemetry,
            format!("service {}/{}", name.0, name.1),
            found,
        );
        stats += out.stats;
        ended.extend(out.ended);
        for n in out.redo {
            if !done.contains(&n) || full {
                queue.push_back(n);
            }
        }
    }
    if full {
        let s = svcs.sync_all()?;
        if !s.is_empty() {
            info!(
                added = s.added,
                changed = s.changed,
                removed = s.removed,
                "Service maps compared with the desired state and fixed"
            );
        }
        stats += s;
    }
    let (frontends, frontends_empty, backends) =
        (svcs.frontends(), svcs.frontends_empty(), svcs.backends());
    let addresses = svcs.addresses();
    let served = svcs.served_externally();
    drop(svcs);
    lock(&agent.routes)?.served_externally = served;
    {
        let mut st = lock(&agent.status)?;
        st.frontends = frontends;
        st.frontends_empty = frontends_empty;
        st.backends = backends;
    }
    if !stats.is_empty() {
        info!(
            services = applied,
            frontends,
            backends,
            added = stats.added,
            changed = stats.changed,
            removed = stats.removed,
            took_ms = started.elapsed().as_millis() as u64,
            "Services applied"
        );
    }
    if !ended.is_empty() {
        let _ = agent.ct_purge.send(ended);
    }
    Ok(addresses)
}

/// What the collector carries from one pass to the next, to count
/// evictions: the LRU removes entries without telling anyone, so they are
/// what the creation counter says was added minus what is accounted for.
#[derive(Default)]
struct Ledger {
    last: Option<(ct::CtStats, usize)>,
    /// Removed by the agent since `last`.
    removed: usize,
}

impl Ledger {
    /// Evictions since the last pass, given the counters and the live
    /// entries now.
    fn evicted(&mut self, now: ct::CtStats, live: usize) -> u64 {
        let ev = match self.last {
            Some((prev, prev_live)) => {
                let created = now.created.saturating_sub(prev.created) as i128;
                let reclaimed = now.reclaimed.saturating_sub(prev.reclaimed) as i128;
                let grown = live as i128 - prev_live as i128;
                (created - reclaimed - self.removed as i128 - grown).max(0) as u64
            }
            None => 0,
        };
        self.last = Some((now, live));
        self.removed = 0;
        ev
    }
}

/// Runs the conntrack collector: every `interval`, and at once for purges
/// and flushes.
pub(super) async fn collector(
    agent: Arc<Agent>,
    interval: Duration,
    mut purges: mpsc::UnboundedReceiver<BTreeSet<(u32, u32)>>,
) {
    let mut ledger = Ledger::default();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let a = agent.clone();
                let mut l = std::mem::take(&mut ledger);
                let r = tokio::task::spawn_blocking(move || {
                    let r = gc(&a, &mut l);
                    (l, r)
                })
                .await;
                match r {
                    Ok((l, Ok(()))) => ledger = l,
                    Ok((l, Err(e))) => {
                        ledger = l;
                        telemetry::error(&agent.telemetry, "ct_gc");
                        warn!("conntrack collection: {e:#}");
                    }
                    Err(e) => warn!("conntrack collector: {e}"),
                }
            }
            p = purges.recv() => {
                let Some(mut pairs) = p else { return };
                while let Ok(more) = purges.try_recv() {
                    pairs.extend(more);
                }
                let a = agent.clone();
                match tokio::task::spawn_blocking(move || purge(&a, &pairs)).await {
                    Ok(Ok(n)) => ledger.removed += n,
                    Ok(Err(e)) => {
                        telemetry::error(&agent.telemetry, "ct_purge");
                        warn!("purging flows of removed backends: {e:#}");
                    }
                    Err(e) => warn!("conntrack purge: {e}"),
                }
            }
        }
    }
}

fn gc(agent: &Agent, ledger: &mut Ledger) -> Result<()> {
    // Killed monitors leave their rings registered: the programs would fill
    // them for no one (and count the events as lost).
    match crate::maps::events::reap_monitors(&agent.pin_dir) {
        Ok(0) => {}
        Ok(n) => info!(
            slots = n,
            "took back the event rings of monitors that are gone"
        ),
        Err(e) => warn!("reaping monitor rings: {e:#}"),
    }
    let mut ctm = lock(&agent.ct)?;
    let (removed, live) = ctm.gc(ct::monotonic_ns())?;
    ledger.removed += removed + std::mem::take(&mut *lock(&agent.ct_flushed)?);
    let stats = ct::stats_of(&*lock(&agent.ct_stats)?)?;
    let evicted = ledger.evicted(stats, live);
    drop(ctm);
    telemetry::ct_collected(&agent.telemetry, removed as u64, evicted, live);
    if removed > 0 || evicted > 0 {
        debug!(removed, evicted, live, "conntrack collected");
    }
    if evicted > 0 {
        info!(
            evicted,
            live, "conntrack table full: the LRU evicted entries (raise --ct-max?)"
        );
    }
    Ok(())
}

/// Removes the UDP flows and the affinities of (frontend, backend) pairs
/// that ended. Returns the flows removed.
fn purge(agent: &Agent, pairs: &BTreeSet<(u32, u32)>) -> Result<usize> {
    let flows = lock(&agent.ct)?.purge_udp(pairs)?;
    let affinities = lock(&agent.affinity)?.purge(pairs)?;
    if flows + affinities > 0 {
        info!(
            flows,
            affinities, "removed the UDP flows and affinities of backends that left their Service"
        );
    }
    Ok(flows)
}

/// `dataplane ct flush`: every entry goes.
pub(super) fn flush(agent: &Agent) -> Result<usize> {
    let (removed, _) = lock(&agent.ct)?.remove_where(|_, _| true)?;
    *lock(&agent.ct_flushed)? += removed;
    info!(removed, "conntrack flushed on request");
    Ok(removed)
}

/// `dataplane nat flush`: the entries of NAT flows go.
pub(super) fn flush_nat(agent: &Agent) -> Result<usize> {
    let (removed, _) = lock(&agent.ct)?.remove_where(ct::is_nat)?;
    *lock(&agent.ct_flushed)? += removed;
    info!(removed, "NAT flows flushed on request");
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evictions_are_what_creation_leaves_unaccounted() {
        let mut l = Ledger::default();
        let s = |created, reclaimed| ct::CtStats {
            created,
            nat_exhausted: 0,
            reclaimed,
        };
        assert_eq!(l.evicted(s(100, 0), 100), 0, "first pass: a baseline");
        // 50 more created, 10 collected by the agent, 2 reclaimed by the
        // programs, 30 more live: 8 evicted.
        l.removed = 10;
        assert_eq!(l.evicted(s(150, 2), 130), 8);
        // A full table: 1000 created, live unchanged, all evicted.
        assert_eq!(l.evicted(s(1150, 2), 130), 1000);
        // Nothing happened.
        assert_eq!(l.evicted(s(1150, 2), 130), 0);
    }
}
