//! `dataplane explain`: a packet the CLI builds is run through a node's live
//! programs with `BPF_PROG_TEST_RUN`, marked as a dry run. Marked, the
//! programs decide as for any packet but change nothing (no conntrack entry,
//! NAT port, affinity, counter, log line or event) and note each decision in
//! the one slot of [`MAP_EXPLAIN`], which the CLI then reads. Runs on a node
//! are serialised by the CLI (a lock on the node's pin directory).

/// One slot: index 0 -> [`ExplainTrace`].
pub const MAP_EXPLAIN: &str = "dp_explain";

/// `skb->mark` of a dry-run packet, and [`EXPLAIN_COOKIE`] in `skb->cb[0]`:
/// both must hold, so that no packet of a real flow is ever taken for one.
pub const EXPLAIN_MARK: u32 = 0x6578_706c;
pub const EXPLAIN_COOKIE: u32 = 0x6472_7921;

/// [`ExplainTrace::notes`]: a conntrack entry of the flow matched.
pub const EXPLAIN_CT: u32 = 1 << 0;
/// A new flow to a Service frontend: frontend and backend chosen.
pub const EXPLAIN_SERVICE: u32 = 1 << 1;
/// A NAT port would be claimed for the flow (masquerade, NodePort SNAT).
pub const EXPLAIN_PORT_CLAIM: u32 = 1 << 2;
pub const EXPLAIN_EGRESS: u32 = 1 << 3;
pub const EXPLAIN_INGRESS: u32 = 1 << 4;
pub const EXPLAIN_ROUTE: u32 = 1 << 5;
/// The program reached its exit (the verdict fields are set).
pub const EXPLAIN_VERDICT: u32 = 1 << 6;
/// A Service refused the flow (no backend): answered with ICMP.
pub const EXPLAIN_REJECT: u32 = 1 << 7;

/// [`ExplainPolicy::result`].
pub const EXPLAIN_POLICY_NONE: u8 = 1;
pub const EXPLAIN_POLICY_ALLOWED: u8 = 2;
/// Under policy, but this direction is not isolated.
pub const EXPLAIN_POLICY_OPEN: u8 = 3;
pub const EXPLAIN_POLICY_DENIED: u8 = 4;
/// Not allowed, but a reply of a flow conntrack knows.
pub const EXPLAIN_POLICY_REPLY: u8 = 5;
/// Not allowed, but from the pod's own node (always admitted).
pub const EXPLAIN_POLICY_HOST: u8 = 6;

/// [`ExplainTrace::route`]: delivered to a pod of this node
/// (`route_target`: its host-side ifindex).
pub const EXPLAIN_ROUTE_LOCAL: u8 = 1;
/// Encapsulated toward another node (`route_target`: its address, wire
/// bytes).
pub const EXPLAIN_ROUTE_TUNNEL: u8 = 2;
/// Out of the uplink by the kernel's FIB (a rewritten packet).
pub const EXPLAIN_ROUTE_UPLINK: u8 = 3;
/// Handed to the host stack, which routes it.
pub const EXPLAIN_ROUTE_STACK: u8 = 4;
/// For this node itself.
pub const EXPLAIN_ROUTE_HOST: u8 = 5;

/// One policy direction's decision.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExplainPolicy {
    /// The endpoint judged (host-side ifindex).
    pub endpoint: u32,
    /// The peer's security identity.
    pub peer: u32,
    /// The deciding policy (an id of `dp_policy_names`), 0: none.
    pub policy: u32,
    /// An `EXPLAIN_POLICY_*`.
    pub result: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<ExplainPolicy>() == 16);

/// What a dry run decided, step by step. Addresses and ports in network
/// byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExplainTrace {
    /// `EXPLAIN_*` bits: the steps that were reached.
    pub notes: u32,
    /// The verdict's `TC_ACT_*` action and its reason code.
    pub action: i32,
    pub reason: u32,
    /// The conntrack entry that matched: its flags and direction.
    pub ct_flags: u16,
    pub ct_dir: u8,
    /// An `EXPLAIN_ROUTE_*`.
    pub route: u8,
    pub route_target: u32,
    /// Service frontend and backend ids (from the entry, or chosen).
    pub frontend: u32,
    pub backend: u32,
    /// The rewrite: `CT_F_SRC`/`CT_F_DST` and the new addresses.
    pub nat_flags: u16,
    pub nat_sport: [u8; 2],
    pub nat_src: [u8; 4],
    pub nat_dst: [u8; 4],
    pub nat_dport: [u8; 2],
    pub _pad: [u8; 2],
    pub egress: ExplainPolicy,
    pub ingress: ExplainPolicy,
}
const _: () = assert!(core::mem::size_of::<ExplainTrace>() == 76);
