//! `cargo xtask`: toolchain setup, build, tests, the lab and the demo.
//!
//! Every command installs what it needs itself, so the README's two commands
//! work on a fresh machine.

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::{Parser, Subcommand};

mod bench;
mod demo;
mod labcmd;
mod testing;
mod toolchain;

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what the build needs: nightly rust-src and bpf-linker (cached
    /// outside the repo; a second run is a quick check).
    Setup,
    /// Build the eBPF programs and the userspace binaries.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Unit tests plus the root-only lab integration tests.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// A simulated cluster with traffic and what the datapath saw of it.
    Demo {
        /// Leave the lab running afterwards (remove it with `cargo xtask lab down`).
        #[arg(long)]
        keep: bool,
    },
    /// A lab to explore by hand.
    #[command(subcommand)]
    Lab(LabCmd),
    /// Benchmarks: Services, NetworkPolicy, and the control plane (change latency, full sync, agent memory).
    Bench {
        /// Only this part: `services`, `policy` or `control-plane`.
        only: Option<String>,
    },
}

#[derive(Subcommand)]
pub(crate) enum LabCmd {
    /// Build a lab and leave it running.
    Up {
        #[arg(long, default_value_t = 2)]
        nodes: usize,
        #[arg(long, default_value_t = 2)]
        pods_per_node: usize,
        /// auto, tcx or clsact.
        #[arg(long, default_value = "auto")]
        attach_mode: String,
        /// vxlan or native.
        #[arg(long, default_value = "vxlan")]
        mode: String,
    },
    /// Show the labs on this machine.
    Status,
    /// Remove labs: the given ones, or else every lab no running process owns
    /// (persisted labs and those left by killed test runs).
    Down { ids: Vec<String> },
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Cmd::Setup => toolchain::setup().map(drop),
        Cmd::Build { release } => toolchain::build(release).map(drop),
        Cmd::Test { args } => testing::test(&args),
        Cmd::Demo { keep } => demo::demo(keep),
        Cmd::Lab(cmd) => labcmd::lab_cmd(cmd),
        Cmd::Bench { only } => bench::bench(only.as_deref()),
    }
}

pub(crate) fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}
