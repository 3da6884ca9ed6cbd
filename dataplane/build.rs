//! Builds the eBPF programs (nightly, bpfel-unknown-none, bpf-linker) and
//! leaves the object in OUT_DIR, where `src/bpf.rs` embeds it.

use std::{env, path::PathBuf};

use anyhow::{Context as _, bail};

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
    // SAFETY: build scripts are single-threaded here; the child cargo that
    // aya-build spawns inherits this PATH.
    unsafe { env::set_var("PATH", env::join_paths(paths).context("PATH")?) };

    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest.join("../dataplane-ebpf");
    let root_dir = ebpf_dir.to_str().context("non-UTF-8 path")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "dataplane-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
