//! `cargo xtask`: toolchain setup, build, tests, the lab and the demo.
//!
//! Every command installs what it needs itself, so the README's two commands
//! work on a fresh machine.

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::{Parser, Subcommand};

mod bench;
mod demo;
mod image;
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
    /// A simulated cluster to use by hand: `cargo xtask lab --help` (up,
    /// apply, delete, exec, probe, matrix, status, down).
    Lab {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The container image (deploy/Containerfile) from static binaries,
    /// with podman or buildah, offline; then checks it runs.
    Image,
    /// Benchmarks, into target/bench/report.md with plots: side by side
    /// with the plain-veth limit, a Flannel-style cluster and kube-proxy,
    /// each program per packet, Services, XDP, NetworkPolicy, and the
    /// control plane (change latency, full sync, agent memory).
    Bench {
        /// Only this section: `compare`, `programs`, `services`, `xdp`,
        /// `policy` or `control-plane`.
        #[arg(long)]
        only: Option<String>,
        /// The side by side alone, with fewer and shorter repetitions
        /// (under 10 minutes from a fresh clone).
        #[arg(long)]
        quick: bool,
        /// The harness alone: every configuration up and one short
        /// measurement of each (what `cargo xtask test` runs).
        #[arg(long)]
        smoke: bool,
        /// Same as --only (kept for `cargo xtask bench services`).
        section: Option<String>,
    },
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
        Cmd::Lab { args } => labcmd::lab(&args),
        Cmd::Image => image::image().and_then(|tag| image::check(&tag)),
        Cmd::Bench {
            only,
            quick,
            smoke,
            section,
        } => bench::bench(only.or(section).as_deref(), quick, smoke),
    }
}

pub(crate) fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}
