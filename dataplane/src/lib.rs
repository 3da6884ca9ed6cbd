//! The node agent and the inspection code behind the `dataplane` binary,
//! as a library so that the golden-packet tests load the same object and
//! use the same map modules.

pub mod agent;
pub mod bgp;
pub mod bpf;
pub mod cli;
pub mod cluster;
pub mod explain;
pub mod inspect;
pub mod lb;
pub mod maps;
pub mod monitor;
pub mod nodes;
pub mod policy;
pub mod source_dir;
pub mod source_kube;
pub mod sys;
pub mod telemetry;
pub mod uninstall;
