//! Events for `dataplane monitor`: each dropped packet with its named
//! reason, and NetworkPolicy verdicts naming the policy that decided, through
//! one ring buffer. A per-CPU budget keeps a flood from filling it (or the
//! CPU): events over the budget, and events the full ring refused, are
//! counted, never silently lost.

/// The ring buffer of [`Event`]s.
pub const MAP_EVENTS: &str = "dp_events";
/// Per-CPU budget and loss counters: index 0 -> [`EventState`].
pub const MAP_EVENT_STATE: &str = "dp_event_state";
/// What is emitted, one slot: index 0 -> [`EventConfig`].
pub const MAP_EVENT_CONFIG: &str = "dp_event_config";
/// The rings of running monitors, one per slot: every event goes to each
/// (and to [`MAP_EVENTS`], which keeps what happened while no one read), so
/// several monitors each see every event.
pub const MAP_EVENT_MONITORS: &str = "dp_event_monitors";
/// The pid of the monitor in each slot of [`MAP_EVENT_MONITORS`] (0: free):
/// a slot whose monitor is gone is taken back by the next one.
pub const MAP_EVENT_READERS: &str = "dp_event_readers";
/// Where each CPU builds an event before it goes to the rings (slot 0,
/// off the stack of the deep packet paths), and keeps a packet's trace
/// until its verdict (slot 1).
pub const MAP_EVENT_SCRATCH: &str = "dp_event_scratch";
/// Monitors that can run at once on a node.
pub const MONITORS_MAX: u32 = 4;

/// Each NetworkPolicy id the agent gave out -> [`PolicyName`], so that a
/// verdict names its policy even without the agent.
pub const MAP_POLICY_NAMES: &str = "dp_policy_names";

/// Bytes of the ring (a power of two pages).
pub const EVENTS_BYTES: u32 = 1 << 20;
pub const POLICY_NAMES_MAX: u32 = 16_384;

/// [`Event::kind`]: a dropped packet (not by policy: those are verdicts).
pub const EVENT_DROP: u8 = 1;
/// [`Event::kind`]: a policy verdict.
pub const EVENT_POLICY: u8 = 2;
/// [`Event::kind`]: a forwarded packet and where it went
/// ([`Event::route`], [`Event::target`]) with its rewrite, if any.
pub const EVENT_TRACE: u8 = 3;

/// [`Event::verdict`] of a policy verdict.
pub const VERDICT_ALLOWED: u8 = 1;
pub const VERDICT_DENIED: u8 = 2;

/// [`EventConfig::mask`]: allowed verdicts too (one per new flow). Denials
/// and drops are always emitted; allows only while a monitor asks.
pub const EVENTS_ALLOWED: u32 = 1;
/// [`EventConfig::mask`]: trace events, one per forwarded packet (within
/// the budget), while a monitor asks.
pub const EVENTS_TRACE: u32 = 2;

/// Events per second per CPU when [`EventConfig::rate`] is 0.
pub const EVENTS_DEFAULT_RATE: u32 = 2_000;

/// One event. Addresses and ports in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// `bpf_ktime_get_ns` (monotonic).
    pub ts: u64,
    /// [`EVENT_DROP`] or [`EVENT_POLICY`].
    pub kind: u8,
    /// The hook's [`crate::Direction`] code.
    pub direction: u8,
    /// The [`crate::Reason`] code (drops; `policy_denied` for denials).
    pub reason: u8,
    /// [`VERDICT_ALLOWED`] or [`VERDICT_DENIED`] (policy verdicts).
    pub verdict: u8,
    /// The policy direction judged: [`crate::POLICY_DIR_INGRESS`] or
    /// [`crate::POLICY_DIR_EGRESS`] (policy verdicts).
    pub policy_dir: u8,
    pub proto: u8,
    /// [`crate::FAMILY_IPV4`]; 0 when the packet had no IP header to read.
    pub family: u8,
    /// Trace events: an `EXPLAIN_ROUTE_*` (where the packet went).
    pub route: u8,
    /// The device the program ran on.
    pub ifindex: u32,
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    /// Security identities of source and destination (policy verdicts).
    pub src_identity: u32,
    pub dst_identity: u32,
    /// The policy that decided (an id of [`MAP_POLICY_NAMES`]); 0: none
    /// allowed it (default deny).
    pub policy: u32,
    /// Packet length.
    pub len: u32,
    /// Trace events: the route's target (a pod's ifindex, a node's
    /// address in wire bytes).
    pub target: u32,
    /// Trace events: the rewrite (`CT_F_SRC`/`CT_F_DST`) and the new
    /// destination.
    pub nat_flags: u16,
    pub nat_dport: [u8; 2],
    pub nat_daddr: [u8; 4],
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<Event>() == 64);

/// One monitor's slot in [`MAP_EVENT_READERS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventReader {
    /// The monitor's pid; 0: the slot is free.
    pub pid: u32,
    /// The `EVENTS_*` it asked for: the node emits what any live monitor
    /// asked for.
    pub mask: u32,
}
const _: () = assert!(core::mem::size_of::<EventReader>() == 8);

/// What the datapath emits.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventConfig {
    /// `EVENTS_*` bits.
    pub mask: u32,
    /// Events per second per CPU (0: [`EVENTS_DEFAULT_RATE`]).
    pub rate: u32,
}
const _: () = assert!(core::mem::size_of::<EventConfig>() == 8);

/// One CPU's budget and losses.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventState {
    /// Start of the current one-second window.
    pub window: u64,
    /// Events emitted in it.
    pub count: u64,
    /// Events over the budget, not emitted.
    pub limited: u64,
    /// Events the ring had no room for.
    pub lost: u64,
}
const _: () = assert!(core::mem::size_of::<EventState>() == 32);

/// `namespace/name`, zero-padded.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyName {
    pub name: [u8; 320],
}
const _: () = assert!(core::mem::size_of::<PolicyName>() == 320);

impl Default for PolicyName {
    fn default() -> Self {
        PolicyName { name: [0; 320] }
    }
}

#[cfg(any(feature = "user", feature = "api"))]
impl PolicyName {
    /// `ns/name`, cut at the field's size (Kubernetes names fit: 63 + 1 +
    /// 253).
    pub fn new(text: &str) -> Self {
        let mut n = PolicyName::default();
        let b = text.as_bytes();
        let len = b.len().min(n.name.len());
        n.name[..len].copy_from_slice(&b[..len]);
        n
    }

    pub fn text(&self) -> String {
        let end = self
            .name
            .iter()
            .position(|b| *b == 0)
            .unwrap_or(self.name.len());
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }
}
