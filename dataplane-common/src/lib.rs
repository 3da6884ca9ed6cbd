//! The contract between the eBPF programs and the user side.
//!
//! Every map has exactly one name, one key type, one value type and one pin
//! path, all defined here; the kernel programs, the agent and the CLI all use
//! these definitions. Types are `repr(C)` with explicit padding and a size
//! assertion, and every field that carries an address states its byte order.
#![cfg_attr(
    not(any(
        feature = "user",
        feature = "api",
        feature = "netlink",
        feature = "netns",
        test
    )),
    no_std
)]

pub mod events;
pub mod explain;
pub mod lb;
pub mod maps;
pub mod policy;
pub mod progs;
pub mod reason;

#[cfg(any(feature = "user", feature = "api"))]
pub mod pin;

#[cfg(feature = "netns")]
pub mod netns;

#[cfg(feature = "api")]
pub mod api;

#[cfg(feature = "api")]
pub mod manifest;

#[cfg(feature = "netlink")]
pub mod netlink;

pub use events::*;
pub use explain::*;
pub use lb::*;
pub use maps::*;
#[cfg(any(feature = "user", feature = "api"))]
pub use pin::pin_dir;
pub use policy::*;
pub use progs::*;
pub use reason::{Direction, Hook, Reason};
