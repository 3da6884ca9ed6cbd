//! `cargo xtask test`, and what the lab needs on the machine.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Result, bail};

use crate::toolchain::{build, cache_dir, cargo_with_linker, status};

/// Debian packages the lab and tests drive.
const TEST_PACKAGES: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("tc", "iproute2"),
    ("ping", "iputils-ping"),
    ("bpftool", "bpftool"),
    ("iptables", "iptables"),
    ("tcpdump", "tcpdump"),
    ("nft", "nftables"),
    ("/usr/lib/cni/portmap", "containernetworking-plugins"),
    // The BGP speaker (the agent's --bgp) and the routed lab's router.
    ("bird", "bird2"),
    ("vtysh", "frr"),
];

pub(crate) fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

pub(crate) fn have(tool: &str) -> bool {
    if tool.starts_with('/') {
        return Path::new(tool).is_file();
    }
    env::split_paths(&env::var_os("PATH").unwrap_or_default())
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .any(|d| d.join(tool).is_file())
}

/// The lab drives iproute2, ping and bpftool; install them when missing.
pub(crate) fn ensure_test_tools() -> Result<()> {
    apt_install_missing(TEST_PACKAGES)
}

/// Installs the packages of the (tool, package) pairs whose tool is
/// missing.
pub(crate) fn apt_install_missing(tools: &[(&str, &str)]) -> Result<()> {
    let mut missing: Vec<&str> = tools
        .iter()
        .filter(|(t, _)| !have(t))
        .map(|(_, p)| *p)
        .collect();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    apt_install(&missing)
}

/// Installs Debian packages, or says which to install where there is no
/// apt-get.
pub(crate) fn apt_install(packages: &[&str]) -> Result<()> {
    if !have("apt-get") {
        bail!(
            "missing tools; install these packages: {}",
            packages.join(" ")
        );
    }
    eprintln!("xtask: installing {}", packages.join(" "));
    status(Command::new("apt-get").args(["update", "-qq"]))?;
    status(
        Command::new("apt-get")
            .args(["install", "-y", "-qq"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

pub(crate) fn test(args: &[String]) -> Result<()> {
    let dataplane = build(false)?;
    let bin = cache_dir()?.join("bin");
    let root = is_root();
    if root {
        ensure_test_tools()?;
    }
    let mut cmd = cargo_with_linker(&bin)?;
    cmd.arg("test")
        .env("DATAPLANE_BIN", &dataplane)
        .env(
            "DATAPLANE_CNI_BIN",
            dataplane.with_file_name("dataplane-cni"),
        )
        .env(
            "DATAPLANE_LAB_BIN",
            dataplane.with_file_name("dataplane-lab"),
        );
    if !root {
        // Unit tests still run; the lab tests cannot.
        cmd.args(["--lib", "--bins"]);
    }
    cmd.args(args);
    status(&mut cmd)?;
    // The image and the bench harness's smoke run, unless a filter picked
    // some tests only.
    if root && args.is_empty() {
        let tag = crate::image::image()?;
        crate::image::check(&tag)?;
        prepare_lab_with(false)?;
        crate::bench::smoke()?;
    }
    if !root {
        bail!(
            "unit tests passed, but the lab integration tests need root (network namespaces, BPF, bpffs): run `sudo -E cargo xtask test`"
        );
    }
    Ok(())
}

/// Builds, installs the lab's tools and points the lab library at the
/// fresh binaries.
pub(crate) fn prepare_lab() -> Result<()> {
    prepare_lab_with(false)
}

pub(crate) fn prepare_lab_with(release: bool) -> Result<()> {
    if !is_root() {
        bail!("the lab needs root (network namespaces, BPF programs, bpffs): run with sudo -E");
    }
    let dataplane = build(release)?;
    ensure_test_tools()?;
    // SAFETY: single-threaded at this point; the lab library reads these.
    unsafe {
        env::set_var("DATAPLANE_BIN", &dataplane);
        env::set_var(
            "DATAPLANE_CNI_BIN",
            dataplane.with_file_name("dataplane-cni"),
        );
        env::set_var(
            "DATAPLANE_LAB_BIN",
            dataplane.with_file_name("dataplane-lab"),
        );
    }
    Ok(())
}
