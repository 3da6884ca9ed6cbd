//! Service frontends and the choice of a backend for a new flow: uniformly
//! at random (east-west), by the frontend's Maglev table (north-south: every
//! node picks the same backend for a flow), or the client's last backend
//! while its affinity lasts.

use aya_ebpf::{
    btf_maps::{Array, HashMap, HashOfMaps, LruHashMap},
    helpers::bpf_get_prandom_u32,
    macros::btf_map,
};
use dataplane_common::{
    AFFINITY_MAX, AffinityKey, AffinityValue, BACKENDS_MAX, BPF_F_NO_PREALLOC, Backend,
    FAMILY_IPV4, MAGLEV_DEFAULT_SIZE, MAGLEV_MAX, Reason, SERVICES_MAX, SVC_F_AFFINITY,
    SVC_F_LOCAL, SVC_F_MAGLEV, ServiceKey, ServiceValue, flow_hash,
};

use crate::{ct, l4::Flow};

#[btf_map(name = "dp_services")]
static SERVICES: HashMap<
    ServiceKey,
    ServiceValue,
    { SERVICES_MAX as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

#[btf_map(name = "dp_backends")]
static BACKENDS: HashMap<u32, Backend, { BACKENDS_MAX as usize }, { BPF_F_NO_PREALLOC as usize }> =
    HashMap::new();

/// BPF_F_INNER_MAP: the tables the agent inserts may have any size.
const INNER_MAP: usize = 1 << 12;

#[btf_map(name = "dp_maglev")]
static MAGLEV: HashOfMaps<
    u32,
    Array<u32, { MAGLEV_DEFAULT_SIZE as usize }, INNER_MAP>,
    { MAGLEV_MAX as usize },
> = HashOfMaps::new();

#[btf_map(name = "dp_affinity")]
static AFFINITY: LruHashMap<AffinityKey, AffinityValue, { AFFINITY_MAX as usize }> =
    LruHashMap::new();

const NS: u64 = 1_000_000_000;

/// The frontend at `addr`:`port` for `scope`, if there is one.
#[inline(always)]
pub fn frontend(
    addr: u32,
    port: u16,
    proto: u8,
    scope: u8,
) -> Option<(ServiceKey, &'static ServiceValue)> {
    let k = ServiceKey::v4(addr.to_ne_bytes(), port.to_ne_bytes(), proto, scope, 0);
    // SAFETY: values are written whole by the agent (a reader sees the old
    // or the new value of a field).
    let v = unsafe { SERVICES.get(k)? };
    Some((k, v))
}

/// The backend with this id.
#[inline(always)]
pub fn backend(id: u32) -> Option<&'static Backend> {
    // SAFETY: as above.
    unsafe { BACKENDS.get(id) }
}

/// A backend for a new flow of frontend `fe` (key `key`): its id and where
/// it is. A frontend with none refuses the flow: `service_no_backend`, or
/// `no_local_backend` under a Local traffic policy.
#[inline(always)]
pub fn select(
    flow: &Flow,
    key: &ServiceKey,
    fe: &ServiceValue,
) -> Result<(u32, &'static Backend), Reason> {
    if fe.count == 0 {
        return Err(if fe.flags & SVC_F_LOCAL != 0 {
            Reason::NoLocalBackend
        } else {
            Reason::ServiceNoBackend
        });
    }
    let akey = AffinityKey {
        client: crate::ct::v6(flow.saddr),
        id: fe.id,
        family: FAMILY_IPV4,
        _pad: [0; 3],
    };
    let now = ct::now();
    if fe.flags & SVC_F_AFFINITY != 0
        && let Some(a) = AFFINITY.get_ptr_mut(akey)
    {
        // SAFETY: a valid map value pointer.
        let (last, id) = unsafe { ((*a).last_used, (*a).backend_id) };
        if now.saturating_sub(last) < u64::from(fe.affinity_timeout) * NS
            && let Some(b) = backend(id)
        {
            if !flow.dry {
                // SAFETY: as above.
                unsafe { (*a).last_used = now };
            }
            return Ok((id, b));
        }
    }
    let id = if fe.flags & SVC_F_MAGLEV != 0 && fe.maglev_size > 0 {
        // The frontend's address, not the packet's: a NodePort's is zero,
        // so a flow hashes alike whichever node it arrives at.
        let h = flow_hash(
            flow.saddr.to_ne_bytes(),
            [key.addr[0], key.addr[1], key.addr[2], key.addr[3]],
            flow.sport.to_ne_bytes(),
            flow.dport.to_ne_bytes(),
            flow.proto,
        );
        // SAFETY: the table is replaced whole by the agent, never written.
        match unsafe { MAGLEV.get_value(&fe.id, &(h % fe.maglev_size)) } {
            Some(id) => *id,
            None => return Err(Reason::ServiceNoBackend),
        }
    } else {
        // SAFETY: plain helper call.
        let r = unsafe { bpf_get_prandom_u32() };
        let slot = (r % u32::from(fe.count)) as u16 + 1;
        let mut k = *key;
        k.slot = slot;
        match SERVICES.get_ptr(k) {
            // SAFETY: as above.
            Some(v) => unsafe { (*v).id },
            None => return Err(Reason::ServiceNoBackend),
        }
    };
    let b = backend(id).ok_or(Reason::ServiceNoBackend)?;
    if fe.flags & SVC_F_AFFINITY != 0 && !flow.dry {
        let v = AffinityValue {
            last_used: now,
            backend_id: id,
            _pad: 0,
        };
        let _ = AFFINITY.insert(akey, v, 0);
    }
    Ok((id, b))
}
