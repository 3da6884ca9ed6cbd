//! `dp_ct` (connection tracking and NAT), `dp_ct_stats`, `dp_affinity`,
//! `dp_frags` and `dp_ct_scratch`. The programs create and refresh
//! entries; the agent removes the expired ones, the flows and affinities of
//! backends that left their Service, and (on request) everything.

use std::{collections::BTreeSet, os::fd::AsFd as _, path::Path};

use anyhow::{Context as _, Result};
use aya::maps::{HashMap as BpfHashMap, IterableMap as _, Map, MapData, PerCpuArray};
use dataplane_common::{
    AffinityKey, AffinityValue, CT_DIR_REPLY, CT_F_DST, CT_F_HAIRPIN, CT_F_MASQ,
    CT_F_NODEPORT_SNAT, CT_F_SERVICE, CT_F_SRC, CT_STAT_CREATED, CT_STAT_NAT_EXHAUSTED,
    CT_STAT_RECLAIMED, CtEntry, CtKey, FragKey, FragValue, IPPROTO_UDP, MAP_AFFINITY, MAP_CT,
    MAP_CT_SCRATCH, MAP_CT_STATS, MAP_FRAGS, proto_name,
};
use serde::Serialize;

use super::{Row, open};
use crate::sys;

/// `bpf_ktime_get_ns`'s clock, which the entries' times are in.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

pub struct CtMap(BpfHashMap<MapData, CtKey, CtEntry>);

impl CtMap {
    pub fn new(map: Map) -> Result<Self> {
        Ok(Self(BpfHashMap::try_from(map)?))
    }

    pub fn open(pin_dir: &Path) -> Result<Self> {
        Self::new(open(pin_dir, MAP_CT)?)
    }

    pub fn entries(&self) -> Result<Vec<(CtKey, CtEntry)>> {
        sys::map_entries(self.0.map().fd().as_fd()).context("reading dp_ct")
    }

    pub fn count(&self) -> Result<usize> {
        sys::map_count::<CtKey, CtEntry>(self.0.map().fd().as_fd()).context("counting dp_ct")
    }

    /// Removes the entries `pick` selects; returns how many went and how
    /// many stay.
    pub fn remove_where(
        &mut self,
        pick: impl Fn(&CtKey, &CtEntry) -> bool,
    ) -> Result<(usize, usize)> {
        let mut doomed = Vec::new();
        let mut total = 0;
        sys::map_walk::<CtKey, CtEntry>(self.0.map().fd().as_fd(), |batch| {
            total += batch.len();
            doomed.extend(batch.iter().filter(|(k, e)| pick(k, e)).map(|(k, _)| *k));
        })
        .context("reading dp_ct")?;
        let removed =
            sys::map_delete(self.0.map().fd().as_fd(), &doomed).context("removing from dp_ct")?;
        Ok((removed, total - removed))
    }

    /// Removes entries whose lifetime ended before `now` (monotonic ns).
    pub fn gc(&mut self, now: u64) -> Result<(usize, usize)> {
        self.remove_where(|_, e| e.expires < now)
    }

    /// Removes the UDP flows of these (frontend id, backend id) pairs: a
    /// datagram flow would otherwise keep going to a backend that left its
    /// Service for as long as it keeps sending.
    pub fn purge_udp(&mut self, pairs: &BTreeSet<(u32, u32)>) -> Result<usize> {
        Ok(self
            .remove_where(|k, e| {
                k.proto == IPPROTO_UDP
                    && e.flags & CT_F_SERVICE != 0
                    && pairs.contains(&(e.id, e.backend_id))
            })?
            .0)
    }
}

pub struct AffinityMap(BpfHashMap<MapData, AffinityKey, AffinityValue>);

impl AffinityMap {
    pub fn new(map: Map) -> Result<Self> {
        Ok(Self(BpfHashMap::try_from(map)?))
    }

    pub fn open(pin_dir: &Path) -> Result<Self> {
        Self::new(open(pin_dir, MAP_AFFINITY)?)
    }

    pub fn entries(&self) -> Result<Vec<(AffinityKey, AffinityValue)>> {
        sys::map_entries(self.0.map().fd().as_fd()).context("reading dp_affinity")
    }

    /// Removes the affinities of these (frontend id, backend id) pairs.
    pub fn purge(&mut self, pairs: &BTreeSet<(u32, u32)>) -> Result<usize> {
        let doomed: Vec<AffinityKey> = self
            .entries()?
            .into_iter()
            .filter(|(k, v)| pairs.contains(&(k.id, v.backend_id)))
            .map(|(k, _)| k)
            .collect();
        sys::map_delete(self.0.map().fd().as_fd(), &doomed).context("removing from dp_affinity")
    }
}

/// The programs' conntrack counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CtStats {
    pub created: u64,
    pub nat_exhausted: u64,
    pub reclaimed: u64,
}

pub fn stats(pin_dir: &Path) -> Result<CtStats> {
    let map: PerCpuArray<MapData, u64> = PerCpuArray::try_from(open(pin_dir, MAP_CT_STATS)?)?;
    stats_of(&map)
}

pub fn stats_of(map: &PerCpuArray<MapData, u64>) -> Result<CtStats> {
    let sum = |i: u32| -> Result<u64> { Ok(map.get(&i, 0)?.iter().sum()) };
    Ok(CtStats {
        created: sum(CT_STAT_CREATED)?,
        nat_exhausted: sum(CT_STAT_NAT_EXHAUSTED)?,
        reclaimed: sum(CT_STAT_RECLAIMED)?,
    })
}

/// One direction of a tracked flow.
#[derive(Debug, Serialize)]
pub struct CtRow {
    pub proto: String,
    pub src: String,
    pub dst: String,
    pub dir: &'static str,
    /// Rewrites, as `src->new` / `dst->new`.
    pub snat: Option<String>,
    pub dnat: Option<String>,
    pub flags: Vec<&'static str>,
    /// Seconds until the entry expires (negative: expired, not yet
    /// collected).
    pub expires_in: i64,
    pub packets: u64,
    pub bytes: u64,
    pub frontend_id: u32,
    pub backend_id: u32,
}

impl Row for CtRow {
    const HEADERS: &'static [&'static str] = &[
        "PROTO",
        "SOURCE",
        "DESTINATION",
        "DIR",
        "SNAT",
        "DNAT",
        "FLAGS",
        "EXPIRES",
        "PACKETS",
        "BYTES",
    ];
    fn cells(&self) -> Vec<String> {
        vec![
            self.proto.clone(),
            self.src.clone(),
            self.dst.clone(),
            self.dir.into(),
            self.snat.clone().unwrap_or_else(|| "-".into()),
            self.dnat.clone().unwrap_or_else(|| "-".into()),
            if self.flags.is_empty() {
                "-".into()
            } else {
                self.flags.join(",")
            },
            format!("{}s", self.expires_in),
            self.packets.to_string(),
            self.bytes.to_string(),
        ]
    }
}

pub fn rows(pin_dir: &Path) -> Result<Vec<CtRow>> {
    rows_where(pin_dir, |_, _| true)
}

/// Whether an entry is one of a NAT flow's (`dataplane nat list`): a
/// masquerade, a NodePort flow SNATed to this node, and the reply entry of
/// the latter (which rewrites both addresses back).
pub fn is_nat(k: &CtKey, e: &CtEntry) -> bool {
    let both = CT_F_SRC | CT_F_DST;
    e.flags & (CT_F_MASQ | CT_F_NODEPORT_SNAT) != 0
        || (k.dir == CT_DIR_REPLY
            && e.flags & CT_F_SERVICE != 0
            && e.flags & both == both
            && e.flags & CT_F_HAIRPIN == 0)
}

/// The entries `pick` chooses, as rows.
pub fn rows_where(pin_dir: &Path, pick: impl Fn(&CtKey, &CtEntry) -> bool) -> Result<Vec<CtRow>> {
    let now = monotonic_ns() as i128;
    let mut entries = CtMap::open(pin_dir)?.entries()?;
    entries.retain(|(k, e)| pick(k, e));
    entries.sort_by_key(|e| e.0);
    Ok(entries
        .into_iter()
        .map(|(k, e)| CtRow {
            proto: proto_name(k.proto),
            src: k.src(),
            dst: k.dst(),
            dir: if k.dir == CT_DIR_REPLY {
                "reply"
            } else {
                "orig"
            },
            snat: e.src_to(k.family),
            dnat: e.dst_to(k.family),
            flags: e.flag_names(),
            expires_in: ((i128::from(e.expires) - now) / 1_000_000_000) as i64,
            packets: e.packets,
            bytes: e.bytes,
            frontend_id: e.id,
            backend_id: e.backend_id,
        })
        .collect())
}

#[derive(Debug, Serialize)]
pub struct AffinityRow {
    pub client: String,
    pub frontend_id: u32,
    pub backend_id: u32,
    /// Seconds since its last new flow.
    pub idle: u64,
}

impl Row for AffinityRow {
    const HEADERS: &'static [&'static str] = &["CLIENT", "FRONTEND-ID", "BACKEND-ID", "IDLE"];
    fn cells(&self) -> Vec<String> {
        vec![
            self.client.clone(),
            self.frontend_id.to_string(),
            self.backend_id.to_string(),
            format!("{}s", self.idle),
        ]
    }
}

pub fn affinity_rows(pin_dir: &Path) -> Result<Vec<AffinityRow>> {
    let now = monotonic_ns();
    let mut rows: Vec<AffinityRow> = AffinityMap::open(pin_dir)?
        .entries()?
        .into_iter()
        .map(|(k, v)| AffinityRow {
            client: dataplane_common::addr(&k.client, k.family)
                .map_or_else(|| "?".into(), |ip| ip.to_string()),
            frontend_id: k.id,
            backend_id: v.backend_id,
            idle: now.saturating_sub(v.last_used) / 1_000_000_000,
        })
        .collect();
    rows.sort_by(|a, b| (&a.client, a.frontend_id).cmp(&(&b.client, b.frontend_id)));
    Ok(rows)
}

#[derive(Debug, Serialize)]
pub struct StatRow {
    pub counter: &'static str,
    pub value: u64,
}

impl Row for StatRow {
    const HEADERS: &'static [&'static str] = &["COUNTER", "VALUE"];
    fn cells(&self) -> Vec<String> {
        vec![self.counter.into(), self.value.to_string()]
    }
}

pub fn stat_rows(pin_dir: &Path) -> Result<Vec<StatRow>> {
    let s = stats(pin_dir)?;
    Ok(vec![
        StatRow {
            counter: "created",
            value: s.created,
        },
        StatRow {
            counter: "nat_exhausted",
            value: s.nat_exhausted,
        },
        StatRow {
            counter: "reclaimed",
            value: s.reclaimed,
        },
    ])
}

#[derive(Debug, Serialize)]
pub struct FragRow {
    pub proto: String,
    pub src: String,
    pub dst: String,
    pub id: u16,
    pub sport: u16,
    pub dport: u16,
}

impl Row for FragRow {
    const HEADERS: &'static [&'static str] = &["PROTO", "SOURCE", "DESTINATION", "IP-ID", "PORTS"];
    fn cells(&self) -> Vec<String> {
        vec![
            self.proto.clone(),
            self.src.clone(),
            self.dst.clone(),
            self.id.to_string(),
            format!("{}->{}", self.sport, self.dport),
        ]
    }
}

fn frags(pin_dir: &Path) -> Result<Vec<(FragKey, FragValue)>> {
    let map: BpfHashMap<MapData, FragKey, FragValue> =
        BpfHashMap::try_from(open(pin_dir, MAP_FRAGS)?)?;
    sys::map_entries(map.map().fd().as_fd()).context("reading dp_frags")
}

pub fn frag_rows(pin_dir: &Path) -> Result<Vec<FragRow>> {
    let ip = |a: &[u8; 16], f: u8| {
        dataplane_common::addr(a, f).map_or_else(|| "?".into(), |ip| ip.to_string())
    };
    Ok(frags(pin_dir)?
        .into_iter()
        .map(|(k, v)| FragRow {
            proto: proto_name(k.proto),
            src: ip(&k.saddr, k.family),
            dst: ip(&k.daddr, k.family),
            id: u16::from_be_bytes([k.id[0], k.id[1]]),
            sport: u16::from_be_bytes(v.sport),
            dport: u16::from_be_bytes(v.dport),
        })
        .collect())
}

/// One CPU's scratch slot: the last new flow it built (both directions).
#[derive(Debug, Serialize)]
pub struct ScratchRow {
    pub cpu: usize,
    pub orig: String,
    pub reply: String,
}

impl Row for ScratchRow {
    const HEADERS: &'static [&'static str] = &["CPU", "LAST ORIGINAL KEY", "LAST REPLY KEY"];
    fn cells(&self) -> Vec<String> {
        vec![self.cpu.to_string(), self.orig.clone(), self.reply.clone()]
    }
}

/// `dp_ct_scratch`, per CPU: work space, shown for what it last held.
pub fn scratch_rows(pin_dir: &Path) -> Result<Vec<ScratchRow>> {
    let m: PerCpuArray<MapData, dataplane_common::CtScratch> =
        PerCpuArray::try_from(open(pin_dir, MAP_CT_SCRATCH)?)?;
    let values = m.get(&0, 0)?;
    Ok(values
        .iter()
        .enumerate()
        .map(|(cpu, s)| ScratchRow {
            cpu,
            orig: s.orig_key.to_string(),
            reply: s.reply_key.to_string(),
        })
        .collect())
}

pub fn count(pin_dir: &Path, name: &str) -> Result<usize> {
    Ok(match name {
        MAP_CT => CtMap::open(pin_dir)?.count()?,
        MAP_AFFINITY => AffinityMap::open(pin_dir)?.entries()?.len(),
        MAP_FRAGS => frags(pin_dir)?.len(),
        // The counters in use.
        MAP_CT_STATS => {
            let s = stats(pin_dir)?;
            [s.created, s.nat_exhausted, s.reclaimed]
                .iter()
                .filter(|v| **v > 0)
                .count()
        }
        // One slot per CPU, always there.
        MAP_CT_SCRATCH => 1,
        _ => anyhow::bail!("no map named {name:?}"),
    })
}
