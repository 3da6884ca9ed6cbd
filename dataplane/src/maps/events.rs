//! `dp_events`, `dp_event_state`, `dp_event_config` and `dp_policy_names`:
//! the events `dataplane monitor` reads straight from the pinned ring
//! (agent or not), their per-CPU budget and losses, what is emitted, and
//! the policy names verdicts refer to (written by the agent).

use std::{collections::BTreeMap, net::Ipv4Addr, path::Path, time::Duration};

use anyhow::{Context as _, Result};
use aya::maps::{Array, HashMap, MapData, PerCpuArray, RingBuf};
use dataplane_common::{
    Direction, EVENT_DROP, EVENT_POLICY, EVENTS_ALLOWED, Event, EventConfig, EventState,
    MAP_EVENT_CONFIG, MAP_EVENT_STATE, MAP_EVENTS, MAP_POLICY_NAMES, PolicyName, Reason,
    VERDICT_ALLOWED, policy_dir_name, proto_name,
};
use serde::Serialize;

use super::{Row, open};

/// An event as people and scripts read it.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct EventView {
    /// Kernel monotonic time, nanoseconds.
    pub ts: u64,
    /// `drop` or `policy-verdict`.
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
}

impl EventView {
    pub fn decode(e: &Event, names: &BTreeMap<u32, String>) -> Self {
        let reason = Reason::from_code(e.reason)
            .map_or_else(|| format!("reason {}", e.reason), |r| r.name().to_owned());
        let policy_verdict = e.kind == EVENT_POLICY;
        EventView {
            ts: e.ts,
            kind: match e.kind {
                EVENT_DROP => "drop".into(),
                EVENT_POLICY => "policy-verdict".into(),
                k => format!("kind {k}"),
            },
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

/// The ring, read from its pin.
pub struct EventReader(RingBuf<MapData>);

impl EventReader {
    pub fn open(pin_dir: &Path) -> Result<Self> {
        Ok(Self(RingBuf::try_from(open(pin_dir, MAP_EVENTS)?)?))
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

    /// Turns allowed verdicts on or off; returns the setting before.
    pub fn allowed(&mut self, on: bool) -> Result<bool> {
        let mut c = self.get()?;
        let was = c.mask & EVENTS_ALLOWED != 0;
        if on {
            c.mask |= EVENTS_ALLOWED;
        } else {
            c.mask &= !EVENTS_ALLOWED;
        }
        self.set(c)?;
        Ok(was)
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
    pub rate_per_cpu: u32,
}

impl Row for ConfigRow {
    const HEADERS: &'static [&'static str] = &["ALLOWED-VERDICTS", "RATE-PER-CPU"];
    fn cells(&self) -> Vec<String> {
        vec![
            self.allowed_verdicts.to_string(),
            self.rate_per_cpu.to_string(),
        ]
    }
}

pub fn config_rows(pin_dir: &Path) -> Result<Vec<ConfigRow>> {
    let c = EventConfigMap::open(pin_dir)?.get()?;
    Ok(vec![ConfigRow {
        allowed_verdicts: c.mask & EVENTS_ALLOWED != 0,
        rate_per_cpu: if c.rate == 0 {
            dataplane_common::EVENTS_DEFAULT_RATE
        } else {
            c.rate
        },
    }])
}
