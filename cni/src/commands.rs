//! ADD, DEL, CHECK, STATUS and GC.

use std::{
    fs::File,
    net::{IpAddr, Ipv4Addr},
    path::Path,
    time::Duration,
};

use dataplane_common::api::{self, AgentStatus, CallError, EndpointSpec, Request, Response};
use serde_json::{Value, json};

use crate::{
    config::{Attachment, Env, NetConf, parse_subnet},
    error::{CniError, Result, code},
    ipam::{Range, Reservation, Store},
    netlink::{Nl, link_mac, link_name, with_netns},
};

/// The pod's default gateway: link-local, the same on every node, answered
/// by a permanent neighbour entry (no bridge, no ARP on the host).
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// Host-side veth names: this prefix and 11 hex digits of a hash of the
/// container id and interface, so DEL and GC can find it without state.
pub const HOST_PREFIX: &str = "lxc";
const AGENT_TIMEOUT: Duration = Duration::from_secs(10);

pub fn host_ifname(container_id: &str, ifname: &str) -> String {
    // FNV-1a 64: stable across releases (unlike std's hasher).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in container_id.bytes().chain([b'/']).chain(ifname.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{HOST_PREFIX}{:011x}", h >> 20)
}

fn is_host_ifname(name: &str) -> bool {
    name.len() == HOST_PREFIX.len() + 11
        && name.starts_with(HOST_PREFIX)
        && name[HOST_PREFIX.len()..]
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

fn agent(conf: &NetConf, request: &Request) -> Result<Response> {
    match api::call(&conf.agent_socket, request, AGENT_TIMEOUT) {
        Ok(Response::Error { message }) => Err(CniError::new(
            code::AGENT_REJECTED,
            "the dataplane agent refused the request",
        )
        .details(message)),
        Ok(Response::NotReady { message }) => Err(CniError::new(
            code::TRY_AGAIN_LATER,
            "the dataplane agent is not ready yet",
        )
        .details(message)),
        Ok(r) => Ok(r),
        Err(CallError::Unavailable(e)) => Err(CniError::new(
            code::TRY_AGAIN_LATER,
            format!(
                "the dataplane agent is not running on this node (no answer on {})",
                conf.agent_socket.display()
            ),
        )
        .details(e)),
        Err(e) => Err(CniError::new(
            code::TRY_AGAIN_LATER,
            "the dataplane agent did not answer properly",
        )
        .details(e)),
    }
}

fn agent_status(conf: &NetConf) -> Result<AgentStatus> {
    match agent(conf, &Request::Status)? {
        Response::Status(s) => Ok(*s),
        other => Err(
            CniError::new(code::TRY_AGAIN_LATER, "unexpected answer from the agent")
                .details(format!("{other:?}")),
        ),
    }
}

fn pause_point(step: &str) {
    // Fault injection for the crash-safety tests: stop here so a test can
    // SIGKILL the plugin at a known point of ADD.
    if std::env::var("DATAPLANE_CNI_PAUSE_AT").is_ok_and(|s| s == step) {
        eprintln!("dataplane-cni: paused at {step}");
        std::thread::sleep(Duration::from_secs(600));
    }
}

pub fn add(env: &Env, conf: &NetConf) -> Result<Value> {
    env.require(&["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"])?;
    // Before touching anything: no agent, nothing done.
    let status = agent_status(conf)?;
    let subnet = match (&conf.ipam.subnet, &status.pod_cidr) {
        (Some(s), _) | (None, Some(s)) => parse_subnet(s)?,
        // The agent learns it from the Node object: not yet is not a
        // configuration error, and the runtime retries.
        (None, None) => {
            return Err(CniError::new(
                code::TRY_AGAIN_LATER,
                "the dataplane agent has no pod CIDR for this node yet",
            )
            .details("it comes from the Node object's spec.podCIDR (or the agent's --pod-cidr); set ipam.subnet to allocate without it"));
        }
    };
    let range = Range::new(subnet, conf.ipam.range_start, conf.ipam.range_end)?;
    let mtu = conf.mtu.unwrap_or(status.pod_mtu);
    let netns = File::open(&env.netns).map_err(|e| {
        CniError::new(
            code::INVALID_ENV,
            format!("CNI_NETNS {} cannot be opened", env.netns),
        )
        .details(e)
    })?;
    let owner = Reservation {
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
    };
    let host = host_ifname(&env.container_id, &env.ifname);

    let ip = {
        let store = Store::open(&conf.data_dir())?;
        store.allocate(&range, &owner)?
    };
    pause_point("allocated");
    let IpAddr::V4(ip4) = ip else {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            "IPv6 pod addresses are not supported yet",
        ));
    };

    let wired = wire(env, &netns, &host, ip4, mtu).and_then(|(host_mac, pod_mac, cookie)| {
        pause_point("wired");
        let spec = EndpointSpec {
            container_id: env.container_id.clone(),
            pod_namespace: env.arg("K8S_POD_NAMESPACE").to_owned(),
            pod_name: env.arg("K8S_POD_NAME").to_owned(),
            host_ifname: host.clone(),
            ips: vec![ip],
            mac: dataplane_common::format_mac(&pod_mac),
            netns_cookie: cookie,
        };
        agent(conf, &Request::EndpointAdd(spec))?;
        Ok((host_mac, pod_mac))
    });
    let (host_mac, pod_mac) = match wired {
        Ok(macs) => macs,
        Err(e) => {
            // Leave nothing behind: the veth (its peer goes with it) and the address.
            let _ = with_netns(None, async |nl: Nl| delete_link(&nl, &host).await);
            if let Ok(store) = Store::open(&conf.data_dir()) {
                let _ = store.release(&owner);
            }
            return Err(e);
        }
    };
    Ok(result(conf, env, &host, &host_mac, &pod_mac, ip4, mtu))
}

/// The veth pair and everything on both ends. Returns (host MAC, pod MAC).
fn wire(
    env: &Env,
    netns: &File,
    host: &str,
    ip: Ipv4Addr,
    mtu: u32,
) -> Result<([u8; 6], [u8; 6], Option<u64>)> {
    let ifname = env.ifname.clone();
    let host_mac = with_netns(None, async |nl: Nl| {
        if let Some(old) = nl.link(host).await? {
            // A half-done earlier ADD for this very container: start over.
            nl.del_link(old.header.index).await?;
        }
        nl.add_veth(host, &ifname, netns, mtu).await?;
        let link = nl.link(host).await?.ok_or_else(|| {
            CniError::new(code::NETLINK, format!("{host} vanished after creation"))
        })?;
        nl.set_up(link.header.index).await?;
        link_mac(&link).ok_or_else(|| CniError::new(code::NETLINK, format!("{host} has no MAC")))
    })?;
    let netns_path = Path::new(&env.netns);
    let (pod_mac, cookie) = with_netns(Some(netns_path), async |nl: Nl| {
        if let Some(lo) = nl.link("lo").await? {
            nl.set_up(lo.header.index).await?;
        }
        let link = nl.link(&ifname).await?.ok_or_else(|| {
            CniError::new(
                code::NETLINK,
                format!("{ifname} missing in the pod after creation"),
            )
        })?;
        let index = link.header.index;
        nl.add_addr(index, ip.into(), 32).await?;
        nl.set_up(index).await?;
        nl.add_link_route(index, GATEWAY).await?;
        nl.add_default_route(index, GATEWAY).await?;
        nl.add_permanent_neigh(index, GATEWAY.into(), &host_mac)
            .await?;
        let mac = link_mac(&link)
            .ok_or_else(|| CniError::new(code::NETLINK, format!("{ifname} has no MAC")))?;
        // Kernels before 5.14 have no netns cookies: the agent then leaves
        // this pod's affinity to the per-packet path.
        Ok((mac, dataplane_common::netns::cookie().ok()))
    })?;
    with_netns(None, async |nl: Nl| {
        let link = nl
            .link(host)
            .await?
            .ok_or_else(|| CniError::new(code::NETLINK, format!("{host} vanished")))?;
        // The node reaches the pod (kubelet probes, replies) through this route.
        Ok(nl.add_link_route(link.header.index, ip).await?)
    })?;
    Ok((host_mac, pod_mac, cookie))
}

async fn delete_link(nl: &Nl, name: &str) -> Result<()> {
    if let Some(link) = nl.link(name).await? {
        nl.del_link(link.header.index).await?;
    }
    Ok(())
}

fn mac_string(mac: &[u8; 6]) -> String {
    dataplane_common::format_mac(mac)
}

/// The ADD result in the config's version, appended to a previous result
/// when we are not first in the chain.
fn result(
    conf: &NetConf,
    env: &Env,
    host: &str,
    host_mac: &[u8; 6],
    pod_mac: &[u8; 6],
    ip: Ipv4Addr,
    mtu: u32,
) -> Value {
    let v1_1 = conf.cni_version == "1.1.0";
    let mut base = conf.prev_result.clone().unwrap_or_else(|| json!({}));
    let mut interfaces = base["interfaces"].as_array().cloned().unwrap_or_default();
    let mut host_if = json!({ "name": host, "mac": mac_string(host_mac) });
    let mut pod_if =
        json!({ "name": env.ifname, "mac": mac_string(pod_mac), "sandbox": env.netns });
    if v1_1 {
        host_if["mtu"] = mtu.into();
        pod_if["mtu"] = mtu.into();
    }
    interfaces.push(host_if);
    interfaces.push(pod_if);
    let pod_index = interfaces.len() - 1;
    let mut ip_entry = json!({ "address": format!("{ip}/32"), "gateway": GATEWAY.to_string(), "interface": pod_index });
    if conf.cni_version == "0.4.0" {
        ip_entry["version"] = "4".into();
    }
    let mut ips = base["ips"].as_array().cloned().unwrap_or_default();
    ips.push(ip_entry);
    let mut routes = base["routes"].as_array().cloned().unwrap_or_default();
    routes.push(json!({ "dst": "0.0.0.0/0", "gw": GATEWAY.to_string() }));
    base["cniVersion"] = conf.cni_version.clone().into();
    base["interfaces"] = interfaces.into();
    base["ips"] = ips.into();
    base["routes"] = routes.into();
    if let Some(dns) = &conf.dns {
        base["dns"] = dns.clone();
    } else if base.get("dns").is_none() {
        base["dns"] = json!({});
    }
    base
}

/// Idempotent: a missing netns, an unknown container or a second call all
/// succeed. The agent being down does not block the rest of the cleanup.
pub fn del(env: &Env, conf: &NetConf) -> Result<()> {
    env.require(&["CNI_CONTAINERID", "CNI_IFNAME"])?;
    match agent(
        conf,
        &Request::EndpointDel {
            container_id: env.container_id.clone(),
        },
    ) {
        Ok(_) => {}
        Err(e) if e.code == code::TRY_AGAIN_LATER => eprintln!(
            "dataplane-cni: DEL: {e} (the agent drops the endpoint when it finds the veth gone)"
        ),
        Err(e) => return Err(e),
    }
    let host = host_ifname(&env.container_id, &env.ifname);
    with_netns(None, async |nl: Nl| delete_link(&nl, &host).await)?;
    let store = Store::open(&conf.data_dir())?;
    store.release(&Reservation {
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
    })?;
    Ok(())
}

fn check_failed(what: impl Into<String>) -> CniError {
    CniError::new(code::CHECK_FAILED, what)
}

pub fn check(env: &Env, conf: &NetConf) -> Result<()> {
    env.require(&["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"])?;
    let prev = conf
        .prev_result
        .as_ref()
        .ok_or_else(|| CniError::new(code::INVALID_CONFIG, "CHECK needs prevResult"))?;
    let want: Vec<IpAddr> = prev["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["address"].as_str()?.split('/').next()?.parse().ok())
        .collect();
    let owner = Reservation {
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
    };
    let reserved = Store::open(&conf.data_dir())?.find(&owner)?;
    let Some(ip) = reserved.filter(|ip| want.contains(ip)) else {
        return Err(check_failed(format!(
            "no address reserved for {} matches prevResult {want:?}",
            env.container_id
        )));
    };
    let host = host_ifname(&env.container_id, &env.ifname);
    with_netns(None, async |nl: Nl| match nl.link(&host).await? {
        Some(_) => Ok(()),
        None => Err(check_failed(format!("host veth {host} is missing"))),
    })?;
    let ifname = env.ifname.clone();
    with_netns(Some(Path::new(&env.netns)), async |nl: Nl| {
        let link = nl
            .link(&ifname)
            .await?
            .ok_or_else(|| check_failed(format!("{ifname} is missing in the pod")))?;
        if !nl.addrs(link.header.index).await?.contains(&ip) {
            return Err(check_failed(format!("{ifname} does not have {ip}")));
        }
        Ok(())
    })?;
    match agent(conf, &Request::EndpointList)? {
        Response::Endpoints { endpoints }
            if endpoints
                .iter()
                .any(|e| e.spec.container_id == env.container_id && e.spec.ips.contains(&ip)) =>
        {
            Ok(())
        }
        _ => Err(check_failed(format!(
            "the agent has no endpoint {} with {ip}",
            env.container_id
        ))),
    }
}

pub fn status(conf: &NetConf) -> Result<()> {
    match agent_status(conf) {
        Ok(_) => Ok(()),
        Err(e) => Err(CniError::new(
            code::NOT_AVAILABLE,
            "the dataplane agent is not available: pods cannot be added",
        )
        .details(e.msg)),
    }
}

/// Releases addresses, veths and agent endpoints of attachments the runtime
/// no longer has.
pub fn gc(conf: &NetConf) -> Result<()> {
    let valid: Vec<Attachment> = conf
        .valid_attachments
        .clone()
        .ok_or_else(|| CniError::new(code::INVALID_CONFIG, "GC needs cni.dev/valid-attachments"))?;
    let released = Store::open(&conf.data_dir())?.gc(&valid)?;
    let keep: Vec<String> = valid
        .iter()
        .map(|a| host_ifname(&a.container_id, &a.ifname))
        .collect();
    with_netns(None, async |nl: Nl| {
        for link in nl.links().await? {
            if let Some(name) = link_name(&link)
                && is_host_ifname(name)
                && !keep.iter().any(|k| k == name)
            {
                nl.del_link(link.header.index).await?;
            }
        }
        Ok(())
    })?;
    // The agent may know endpoints whose address was already released.
    let mut stale: Vec<String> = released.into_iter().map(|(_, r)| r.container_id).collect();
    if let Ok(Response::Endpoints { endpoints }) = agent(conf, &Request::EndpointList) {
        stale.extend(
            endpoints
                .into_iter()
                .map(|e| e.spec.container_id)
                .filter(|id| !valid.iter().any(|a| &a.container_id == id)),
        );
    }
    stale.sort();
    stale.dedup();
    for container_id in stale {
        match agent(conf, &Request::EndpointDel { container_id }) {
            Ok(_) => {}
            Err(e) if e.code == code::TRY_AGAIN_LATER => break,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_are_stable_short_and_recognisable() {
        let a = host_ifname("0123456789abcdef", "eth0");
        assert_eq!(a, host_ifname("0123456789abcdef", "eth0"));
        assert_ne!(a, host_ifname("0123456789abcdef", "net1"));
        assert!(a.len() <= 15, "{a}");
        assert!(is_host_ifname(&a));
        assert!(!is_host_ifname("lxc0"));
        assert!(!is_host_ifname("eth0"));
    }
}
