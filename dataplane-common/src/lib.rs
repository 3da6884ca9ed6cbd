//! The contract between the eBPF programs and the user side.
//!
//! Every map has exactly one name, one key type, one value type and one pin
//! path, all defined here; the kernel programs, the agent and the CLI all use
//! these definitions. Types are `repr(C)` with explicit padding and a size
//! assertion, and every field that carries an address states its byte order.
#![cfg_attr(
    not(any(feature = "user", feature = "api", feature = "netlink", test)),
    no_std
)]

pub mod maps;
pub mod reason;

#[cfg(feature = "api")]
pub mod api;

#[cfg(feature = "netlink")]
pub mod netlink;

pub use maps::*;
pub use reason::{Direction, Reason};
