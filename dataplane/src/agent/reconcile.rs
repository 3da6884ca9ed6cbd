//! From cluster state to the datapath: each new store is translated and
//! applied by difference.

use super::*;

/// Applies every new store the source publishes; the first success makes
/// the agent ready.
pub(super) async fn reconcile_loop(
    mut rx: tokio::sync::watch::Receiver<Option<Store>>,
    own: String,
    state: Arc<Mutex<State>>,
    nl: Nl,
    t: telemetry::Shared,
) {
    let mut reported = std::collections::BTreeSet::new();
    loop {
        let Some(store) = rx.borrow_and_update().clone() else {
            if rx.changed().await.is_err() {
                return;
            }
            continue;
        };
        let started = std::time::Instant::now();
        for kind in Kind::ALL {
            telemetry::set_objects(&t, kind.name(), store.count(kind));
        }
        let mut desired = cluster::desired(&store, &own);
        let mut problems = std::mem::take(&mut desired.problems);
        match apply_desired(&state, &nl, desired).await {
            Ok(more) => {
                problems.extend(more);
                telemetry::reconciled(&t, "cluster", started.elapsed());
                telemetry::set_ready(&t);
            }
            Err(e) => {
                telemetry::error(&t, "reconcile");
                warn!("applying cluster state: {e:#}");
            }
        }
        // Each problem is reported when it appears, not on every change.
        for p in problems.difference(&reported) {
            telemetry::error(&t, "object_conflict");
            warn!("{p}");
        }
        for p in reported.difference(&problems) {
            info!("resolved: {p}");
        }
        reported = problems;
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Moves the datapath to `d`: this node's CIDR, remote nodes, remote pods.
/// Returns the conflicts met on the way (one line each), for reporting.
pub(super) async fn apply_desired(
    state: &Arc<Mutex<State>>,
    nl: &Nl,
    d: cluster::Desired,
) -> Result<Vec<String>> {
    let problems = {
        let mut st = state
            .lock()
            .map_err(|_| anyhow::anyhow!("agent state poisoned"))?;
        let new = d.own_pod_cidr.map(ipnetwork::IpNetwork::V4);
        if !st.own_cidr_fixed && new.is_some() && st.own_cidr != new {
            if let Some(new) = new {
                ipcache_put(&mut st.datapath, new, entry(IPCACHE_KIND_LOCAL_PODS, None))?;
            }
            if let Some(old) = st.own_cidr {
                ipcache_del(&mut st.datapath, old)?;
            }
            st.own_cidr = new;
            info!(pod_cidr = ?new, "this node's pod CIDR, from its Node object");
        }
        apply_remote_pods(&mut st, &d.remote_pods)?
    };
    apply_nodes(state, nl, d.nodes).await?;
    Ok(problems)
}

/// Remote pods in the endpoint map (identity slot for policy), by
/// difference; a local endpoint's entry is never overwritten (returned as a
/// conflict instead).
pub(super) fn apply_remote_pods(
    st: &mut State,
    want: &std::collections::BTreeMap<std::net::IpAddr, String>,
) -> Result<Vec<String>> {
    let mut problems = Vec::new();
    let local: Vec<std::net::IpAddr> = st
        .endpoints
        .values()
        .flat_map(|e| e.spec.ips.iter().copied())
        .collect();
    let mut map = st.datapath.endpoints()?;
    for (ip, pod) in want {
        if st.remote_pods.get(ip) == Some(pod) {
            continue;
        }
        if local.contains(ip) {
            problems.push(format!("Pod {pod}: status.podIPs: address {ip} belongs to an endpoint on this node; skipped"));
            continue;
        }
        map.insert(EndpointKey::from(*ip), EndpointInfo::default(), 0)
            .with_context(|| format!("{MAP_ENDPOINTS}: inserting remote pod {pod} {ip}"))?;
    }
    for ip in st.remote_pods.keys() {
        if !want.contains_key(ip) && !local.contains(ip) {
            match map.remove(&EndpointKey::from(*ip)) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(e).with_context(|| format!("{MAP_ENDPOINTS}: removing {ip}")),
            }
        }
    }
    st.remote_pods = want
        .iter()
        .filter(|(ip, _)| !local.contains(ip))
        .map(|(k, v)| (*k, v.clone()))
        .collect();
    Ok(problems)
}
