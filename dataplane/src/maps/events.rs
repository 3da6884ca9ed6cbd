//! `dp_events`, `dp_event_state`, `dp_event_config` and `dp_policy_names`:
//! the events `dataplane monitor` reads straight from the pinned ring
//! (agent or not), their per-CPU budget and losses, what is emitted, and
//! the policy names verdicts refer to (written by the agent).

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result};
use aya::maps::{Array, HashMap, MapData, PerCpuArray, RingBuf};
use dataplane_common::{
    Direction, EVENT_DROP, EVENT_POLICY, EVENT_TRACE, EVENTS_ALLOWED, EVENTS_BYTES, EVENTS_TRACE,
    EXPLAIN_ROUTE_HOST, EXPLAIN_ROUTE_LOCAL, EXPLAIN_ROUTE_STACK, EXPLAIN_ROUTE_TUNNEL,
    EXPLAIN_ROUTE_UPLINK, Event, EventConfig, EventReader as EventReaderSlot, EventState,
    MAP_EVENT_CONFIG, MAP_EVENT_MONITORS, MAP_EVENT_READERS, MAP_EVENT_STATE, MAP_EVENTS,
    MAP_POLICY_NAMES, MONITORS_MAX, PolicyName, Reason, VERDICT_ALLOWED, policy_dir_name,
    proto_name,
};
use serde::Serialize;

use super::{Row, open};

/// An event as people and scripts read it.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct EventView {
    /// Kernel monotonic time, nanoseconds.
    pub ts: u64,
    /// `drop`, `policy-verdict` or `trace`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The hook's direction (drops), or the policy direction judged.
    pub direction: String,
    /// Verdicts: `allowed` or `denied`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verdict: Option<String>,
    /// The named reason (drops and denials).
    pub reason: String,
    pub ifindex: u32,
    pub protocol: String,
    pub src: String,
    pub dst: String,
    pub sport: u16,
    pub dport: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub src_identity: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dst_identity: Option<u32>,
    /// Verdicts: `namespace/name` of the policy that decided, or
    /// `default deny` (isolated, and nothing allowed it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    pub len: u32,
    /// Traces: where the packet went (`to-pod`, `tunnel`, `uplink`,
    /// `stack`, `host`) and its target (pod ifindex, node address).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Traces: the destination it was rewritten to (`ip:port`), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nat_to: Option<String>,
}

impl EventView {
    pub fn decode(e: &Event, names: &BTreeMap<u32, String>) -> Self {
        let reason = Reason::from_code(e.reason)
            .map_or_else(|| format!("reason {}", e.reason), |r| r.name().to_owned());
        let policy_verdict = e.kind == EVENT_POLICY;
        let trace = e.kind == EVENT_TRACE;
        let route = match e.route {
            EXPLAIN_ROUTE_LOCAL => "to-pod",
            EXPLAIN_ROUTE_TUNNEL => "tunnel",
            EXPLAIN_ROUTE_UPLINK => "uplink",
            EXPLAIN_ROUTE_STACK => "stack",
            EXPLAIN_ROUTE_HOST => "host",
            _ => "?",
        };
        EventView {
            ts: e.ts,
            kind: match e.kind {
                EVENT_DROP => "drop".into(),
                EVENT_POLICY => "policy-verdict".into(),
                EVENT_TRACE => "trace".into(),
                k => format!("kind {k}"),
            },
            route: trace.then(|| route.to_owned()),
            target: trace.then(|| match e.route {
                EXPLAIN_ROUTE_LOCAL => format!("ifindex {}", e.target),
                EXPLAIN_ROUTE_TUNNEL => Ipv4Addr::from(e.target.to_ne_bytes()).to_string(),
                _ => "-".to_owned(),
            }),
            nat_to: (trace && e.nat_flags & dataplane_common::CT_F_DST != 0).then(|| {
                format!(
                    "{}:{}",
                    Ipv4Addr::from(e.nat_daddr),
                    u16::from_be_bytes(e.nat_dport)
                )
            }),
            direction: if policy_verdict {
                policy_dir_name(e.policy_dir).to_owned()
            } else {
                Direction::from_code(e.direction).map_or_else(
                    || format!("direction {}", e.direction),
                    |d| d.name().to_owned(),
                )
            },
            verdict: policy_verdict.then(|| {
                if e.verdict == VERDICT_ALLOWED {
                    "allowed"
                } else {
                    "denied"
                }
                .to_owned()
            }),
            reason,
            ifindex: e.ifindex,
            protocol: proto_name(e.proto).to_owned(),
            src: Ipv4Addr::from(e.saddr).to_string(),
            dst: Ipv4Addr::from(e.daddr).to_string(),
            sport: u16::from_be_bytes(e.sport),
            dport: u16::from_be_bytes(e.dport),
            src_identity: policy_verdict.then_some(e.src_identity),
            dst_identity: policy_verdict.then_some(e.dst_identity),
            policy: policy_verdict.then(|| match e.policy {
                0 => "default deny".to_owned(),
                id => names
                    .get(&id)
                    .cloned()
                    .unwrap_or_else(|| format!("policy {id}")),
            }),
            len: e.len,
        }
    }

    /// One line for people.
    pub fn line(&self) -> String {
        let flow = format!(
            "{}:{} -> {}:{} {}",
            self.src, self.sport, self.dst, self.dport, self.protocol
        );
        if let Some(route) = &self.route {
            return format!(
                "trace  {route:<7} {flow}{}  -> {}",
                self.nat_to
                    .as_ref()
                    .map(|n| format!("  (translated to {n})"))
                    .unwrap_or_default(),
                self.target.as_deref().unwrap_or("-")
            );
        }
        match &self.verdict {
            Some(v) => format!(
                "policy {v:<7} {:<7} {flow}  identity {} -> {}  by {}  (endpoint {})",
                self.direction,
                self.src_identity.unwrap_or(0),
                self.dst_identity.unwrap_or(0),
                self.policy.as_deref().unwrap_or("-"),
                self.ifindex
            ),
            None => format!(
                "drop   {:<22} {:<13} {flow}  (ifindex {}, {} bytes)",
                self.reason, self.direction, self.ifindex, self.len
            ),
        }
    }
}

/// A ring of events: the node's backlog ring (from its pin), or a
/// monitor's own (see [`Subscription`]).
pub struct EventReader(RingBuf<MapData>);

/// A monitor's own ring, in a slot of `dp_event_monitors` for as long as
/// this lives: the programs send every event to each slot's ring, so every
/// monitor sees every event.
pub struct Subscription {
    pin_dir: PathBuf,
    slot: u32,
    pub reader: EventReader,
}

/// Whether a process is alive.
fn alive(pid: u32) -> bool {
    pid != 0 && Path::new(&format!("/proc/{pid}")).exists()
}

impl EventReader {
    /// The backlog ring (what happened while no monitor read).
    pub fn open(pin_dir: &Path) -> Result<Self> {
        Ok(Self(RingBuf::try_from(open(pin_dir, MAP_EVENTS)?)?))
    }

    /// A ring of this process's own, registered in a free slot (or one
    /// whose monitor is gone), asking for the `EVENTS_*` in `mask` besides
    /// drops and denials.
    pub fn subscribe(pin_dir: &Path, mask: u32) -> Result<Subscription> {
        let _lock = crate::sys::lock_exclusive(pin_dir)?;
        let outer = open(pin_dir, MAP_EVENT_MONITORS)?;
        let mut readers: Array<MapData, EventReaderSlot> =
            Array::try_from(open(pin_dir, MAP_EVENT_READERS)?)?;
        let slot = (0..MONITORS_MAX)
            .find(|i| !alive(readers.get(i, 0).map_or(0, |r| r.pid)))
            .with_context(|| {
                format!("{MONITORS_MAX} monitors already run on this node; stop one first")
            })?;
        let ring = crate::sys::ringbuf_create(EVENTS_BYTES).context("creating a ring buffer")?;
        let outer_fd = match &outer {
            aya::maps::Map::ArrayOfMaps(m) => m.fd().as_fd(),
            _ => anyhow::bail!("{MAP_EVENT_MONITORS} is not an array of maps"),
        };
        crate::sys::map_set_inner(outer_fd, slot, ring.as_fd())
            .with_context(|| format!("registering in {MAP_EVENT_MONITORS}"))?;
        readers.set(
            slot,
            EventReaderSlot {
                pid: std::process::id(),
                mask,
            },
            0,
        )?;
        emit_what_monitors_want(pin_dir)?;
        let data = MapData::from_fd(ring)?;
        Ok(Subscription {
            pin_dir: pin_dir.to_path_buf(),
            slot,
            reader: EventReader(RingBuf::try_from(aya::maps::Map::RingBuf(data))?),
        })
    }

    /// The events waiting, at most `max`; waits up to `wait` for the first.
    pub fn next_batch(&mut self, max: usize, wait: Duration) -> Result<Vec<Event>> {
        let mut out = Vec::new();
        self.drain(&mut out, max);
        if out.is_empty() {
            let mut pfd = libc::pollfd {
                fd: std::os::fd::AsRawFd::as_raw_fd(&self.0),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = i32::try_from(wait.as_millis()).unwrap_or(i32::MAX);
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut pfd, 1, ms) };
            self.drain(&mut out, max);
        }
        Ok(out)
    }

    fn drain(&mut self, out: &mut Vec<Event>, max: usize) {
        while out.len() < max {
            let Some(item) = self.0.next() else { break };
            if item.len() >= std::mem::size_of::<Event>() {
                // SAFETY: the kernel wrote an `Event` (repr(C), plain
                // integers); read unaligned all the same.
                out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<Event>()) });
            }
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let _ = unregister(&self.pin_dir, self.slot);
    }
}

fn unregister(pin_dir: &Path, slot: u32) -> Result<()> {
    let _lock = crate::sys::lock_exclusive(pin_dir)?;
    if let aya::maps::Map::ArrayOfMaps(m) = open(pin_dir, MAP_EVENT_MONITORS)? {
        crate::sys::map_clear_inner(m.fd().as_fd(), slot)?;
    }
    let mut readers: Array<MapData, EventReaderSlot> =
        Array::try_from(open(pin_dir, MAP_EVENT_READERS)?)?;
    readers.set(slot, EventReaderSlot::default(), 0)?;
    emit_what_monitors_want(pin_dir)
}

/// The events the node emits besides drops and denials: what any live
/// monitor asked for (called under the pin directory's lock).
fn emit_what_monitors_want(pin_dir: &Path) -> Result<()> {
    let readers: Array<MapData, EventReaderSlot> =
        Array::try_from(open(pin_dir, MAP_EVENT_READERS)?)?;
    let mask = (0..MONITORS_MAX)
        .filter_map(|i| readers.get(&i, 0).ok())
        .filter(|r| alive(r.pid))
        .fold(0, |m, r| m | r.mask);
    let mut config = EventConfigMap::open(pin_dir)?;
    let mut c = config.get()?;
    if c.mask != mask {
        c.mask = mask;
        config.set(c)?;
    }
    Ok(())
}

impl Row for EventView {
    const HEADERS: &'static [&'static str] = &["EVENT"];
    fn cells(&self) -> Vec<String> {
        vec![self.line()]
    }
}

/// A monitor slot, for `map dump dp_event_readers` / `dp_event_monitors`.
#[derive(Debug, Serialize)]
pub struct MonitorRow {
    pub slot: u32,
    pub pid: u32,
    pub running: bool,
    /// What it asked for besides drops and denials.
    pub wants: Vec<&'static str>,
}

impl Row for MonitorRow {
    const HEADERS: &'static [&'static str] = &["SLOT", "PID", "RUNNING", "WANTS"];
    fn cells(&self) -> Vec<String> {
        vec![
            self.slot.to_string(),
            self.pid.to_string(),
            self.running.to_string(),
            self.wants.join(","),
        ]
    }
}

/// The slots in use.
pub fn monitor_rows(pin_dir: &Path) -> Result<Vec<MonitorRow>> {
    let readers: Array<MapData, EventReaderSlot> =
        Array::try_from(open(pin_dir, MAP_EVENT_READERS)?)?;
    Ok((0..MONITORS_MAX)
        .filter_map(|slot| {
            let r = readers.get(&slot, 0).ok().filter(|r| r.pid != 0)?;
            Some(MonitorRow {
                slot,
                pid: r.pid,
                running: alive(r.pid),
                wants: [
                    (EVENTS_ALLOWED, "allowed-verdicts"),
                    (EVENTS_TRACE, "traces"),
                ]
                .into_iter()
                .filter(|(b, _)| r.mask & b != 0)
                .map(|(_, n)| n)
                .collect(),
            })
        })
        .collect())
}

/// What each CPU's event work space last held.
pub fn scratch_rows(pin_dir: &Path) -> Result<Vec<EventView>> {
    let m: PerCpuArray<MapData, Event> =
        PerCpuArray::try_from(open(pin_dir, dataplane_common::MAP_EVENT_SCRATCH)?)?;
    let names = BTreeMap::new();
    Ok(m.get(&0, 0)?
        .iter()
        .filter(|e| e.ts != 0)
        .map(|e| EventView::decode(e, &names))
        .collect())
}

/// Takes back the slots of monitors that are gone (killed): the programs
/// would fill their rings for no one. Returns how many.
pub fn reap_monitors(pin_dir: &Path) -> Result<usize> {
    let readers: Array<MapData, EventReaderSlot> =
        Array::try_from(open(pin_dir, MAP_EVENT_READERS)?)?;
    let dead: Vec<u32> = (0..MONITORS_MAX)
        .filter(|i| readers.get(i, 0).is_ok_and(|r| r.pid != 0 && !alive(r.pid)))
        .collect();
    for slot in &dead {
        unregister(pin_dir, *slot)?;
    }
    Ok(dead.len())
}

/// Events over the budget and events lost, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Losses {
    pub limited: u64,
    pub lost: u64,
}

pub fn losses(pin_dir: &Path) -> Result<Losses> {
    let st: PerCpuArray<MapData, EventState> =
        PerCpuArray::try_from(open(pin_dir, MAP_EVENT_STATE)?)?;
    let v = st.get(&0, 0)?;
    Ok(v.iter().fold(Losses::default(), |a, s| Losses {
        limited: a.limited + s.limited,
        lost: a.lost + s.lost,
    }))
}

/// What the datapath emits (`dp_event_config`).
pub struct EventConfigMap(Array<MapData, EventConfig>);

impl EventConfigMap {
    pub fn open(pin_dir: &Path) -> Result<Self> {
        Ok(Self(Array::try_from(open(pin_dir, MAP_EVENT_CONFIG)?)?))
    }

    pub fn get(&self) -> Result<EventConfig> {
        Ok(self.0.get(&0, 0)?)
    }

    pub fn set(&mut self, c: EventConfig) -> Result<()> {
        Ok(self.0.set(0, c, 0)?)
    }
}

/// `dp_policy_names`: the agent names each policy id it hands out.
pub struct PolicyNamesMap(HashMap<MapData, u32, PolicyName>);

impl PolicyNamesMap {
    pub fn new(map: aya::maps::Map) -> Result<Self> {
        Ok(Self(HashMap::try_from(map)?))
    }

    pub fn open(pin_dir: &Path) -> Result<Self> {
        Self::new(open(pin_dir, MAP_POLICY_NAMES)?)
    }

    pub fn put(&mut self, id: u32, name: &str) -> Result<()> {
        self.0
            .insert(id, PolicyName::new(name), 0)
            .with_context(|| format!("naming policy {id} {name}"))
    }

    pub fn all(&self) -> Result<BTreeMap<u32, String>> {
        let mut out = BTreeMap::new();
        for item in self.0.iter() {
            let (k, v) = item?;
            out.insert(k, v.text());
        }
        Ok(out)
    }
}

#[derive(Serialize)]
pub struct NameRow {
    pub id: u32,
    pub policy: String,
}

impl Row for NameRow {
    const HEADERS: &'static [&'static str] = &["ID", "POLICY"];
    fn cells(&self) -> Vec<String> {
        vec![self.id.to_string(), self.policy.clone()]
    }
}

pub fn name_rows(pin_dir: &Path) -> Result<Vec<NameRow>> {
    Ok(PolicyNamesMap::open(pin_dir)?
        .all()?
        .into_iter()
        .map(|(id, policy)| NameRow { id, policy })
        .collect())
}

#[derive(Serialize)]
pub struct StateRow {
    pub cpu: usize,
    pub emitted_this_second: u64,
    pub over_budget: u64,
    pub lost: u64,
}

impl Row for StateRow {
    const HEADERS: &'static [&'static str] = &["CPU", "EMITTED-THIS-SECOND", "OVER-BUDGET", "LOST"];
    fn cells(&self) -> Vec<String> {
        vec![
            self.cpu.to_string(),
            self.emitted_this_second.to_string(),
            self.over_budget.to_string(),
            self.lost.to_string(),
        ]
    }
}

pub fn state_rows(pin_dir: &Path) -> Result<Vec<StateRow>> {
    let st: PerCpuArray<MapData, EventState> =
        PerCpuArray::try_from(open(pin_dir, MAP_EVENT_STATE)?)?;
    Ok(st
        .get(&0, 0)?
        .iter()
        .enumerate()
        .map(|(cpu, s)| StateRow {
            cpu,
            emitted_this_second: s.count,
            over_budget: s.limited,
            lost: s.lost,
        })
        .collect())
}

#[derive(Serialize)]
pub struct ConfigRow {
    pub allowed_verdicts: bool,
    pub traces: bool,
    pub rate_per_cpu: u32,
}

impl Row for ConfigRow {
    const HEADERS: &'static [&'static str] = &["ALLOWED-VERDICTS", "TRACES", "RATE-PER-CPU"];
    fn cells(&self) -> Vec<String> {
        vec![
            self.allowed_verdicts.to_string(),
            self.traces.to_string(),
            self.rate_per_cpu.to_string(),
        ]
    }
}

pub fn config_rows(pin_dir: &Path) -> Result<Vec<ConfigRow>> {
    let c = EventConfigMap::open(pin_dir)?.get()?;
    Ok(vec![ConfigRow {
        allowed_verdicts: c.mask & EVENTS_ALLOWED != 0,
        traces: c.mask & EVENTS_TRACE != 0,
        rate_per_cpu: if c.rate == 0 {
            dataplane_common::EVENTS_DEFAULT_RATE
        } else {
            c.rate
        },
    }])
}
