//! Builds the eBPF programs (nightly, bpfel-unknown-none, bpf-linker) and
//! leaves the object in OUT_DIR, where `src/bpf.rs` embeds it.
//!
//! The nested cargo's output is kept and shown only when it fails: cargo
//! turns every line a build script prints into a `warning:`, which on
//! success is noise.

use std::{
    env,
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

const PACKAGE: &str = "dataplane-ebpf";

fn main() -> anyhow::Result<()> {
    // `cargo xtask setup` installs bpf-linker into this cache; look there too
    // so that a plain `cargo build` works once setup has run.
    let cache_bin = env::var_os("DATAPLANE_CACHE")
        .map(PathBuf::from)
        .or_else(|| env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("dataplane")))
        .or_else(|| env::var_os("HOME").map(|d| PathBuf::from(d).join(".cache/dataplane")))
        .map(|d| d.join("bin"));
    println!("cargo:rerun-if-env-changed=DATAPLANE_CACHE");
    println!("cargo:rerun-if-env-changed=PATH");
    let mut paths: Vec<PathBuf> =
        env::split_paths(&env::var_os("PATH").unwrap_or_default()).collect();
    if let Some(bin) = cache_bin {
        paths.push(bin);
    }
    if !paths.iter().any(|p| p.join("bpf-linker").is_file()) {
        bail!(
            "bpf-linker not found on PATH or in the dataplane cache: run `cargo xtask setup` first"
        );
    }

    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest.join("../dataplane-ebpf");
    // Rebuild when the programs change (the build dependency only covers
    // their library target).
    println!("cargo:rerun-if-changed={}", ebpf_dir.display());
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR")?);
    let arch = env::var("CARGO_CFG_TARGET_ARCH").context("CARGO_CFG_TARGET_ARCH")?;
    let target = if env::var("CARGO_CFG_TARGET_ENDIAN").as_deref() == Ok("big") {
        "bpfeb-unknown-none"
    } else {
        "bpfel-unknown-none"
    };
    let target_dir = out_dir.join("ebpf-target");
    let mut flags = OsString::new();
    for (i, f) in [
        format!("--cfg=bpf_target_arch=\"{arch}\""),
        "-Cdebuginfo=2".into(),
        "-Clink-arg=--btf".into(),
        // bpf-linker passes LLVM `-bpf-expand-memcpy-in-order` by default,
        // which also sets the BPF backend's stores-per-memset limit to 0:
        // every zeroing of a key or struct (hundreds of sites) then
        // becomes a call to aya-ebpf's byte-at-a-time `memset`, which was
        // most of each program's time per packet. Without it LLVM writes
        // them as plain stores.
        "-Clink-arg=--disable-expand-memcpy-in-order".into(),
        // A warning in the kernel programs fails the build (and is shown).
        "-Dwarnings".into(),
    ]
    .iter()
    .enumerate()
    {
        if i > 0 {
            flags.push("\x1f");
        }
        flags.push(f);
    }
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo", "build", "--package", PACKAGE])
        .args(["--bins", "--release", "--target", target])
        .args(["-Z", "build-std=core", "--target-dir"])
        .arg(&target_dir)
        .current_dir(&ebpf_dir)
        .env("PATH", env::join_paths(&paths).context("PATH")?)
        .env("CARGO_ENCODED_RUSTFLAGS", flags)
        // The outer build's toolchain must not leak into the nightly one.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTUP_TOOLCHAIN");
    let out = cmd
        .output()
        .with_context(|| format!("running {cmd:?} (is rustup installed?)"))?;
    if !out.status.success() {
        for stream in [&out.stdout, &out.stderr] {
            for line in String::from_utf8_lossy(stream).lines() {
                println!("cargo:warning={line}");
            }
        }
        bail!(
            "building the eBPF programs failed ({}); output above",
            out.status
        );
    }
    let built: &Path = &target_dir.join(target).join("release").join(PACKAGE);
    std::fs::copy(built, out_dir.join(PACKAGE))
        .with_context(|| format!("copying {}", built.display()))?;
    Ok(())
}
