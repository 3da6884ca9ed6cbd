//! The toolchain the eBPF build needs (nightly rust-src, bpf-linker built
//! against rustc's own LLVM, cached outside the repo) and the build itself.

use std::{
    env,
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use crate::workspace_root;

/// bpf-linker release built against rustc's own LLVM.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// LLVM majors that bpf-linker release supports.
const BPF_LINKER_LLVM: &[u32] = &[21, 22, 23];
/// Same location dataplane/build.rs looks in.
pub(crate) fn cache_dir() -> Result<PathBuf> {
    if let Some(d) = env::var_os("DATAPLANE_CACHE") {
        return Ok(PathBuf::from(d));
    }
    if let Some(d) = env::var_os("XDG_CACHE_HOME") {
        return Ok(PathBuf::from(d).join("dataplane"));
    }
    let home =
        env::var_os("HOME").context("neither DATAPLANE_CACHE, XDG_CACHE_HOME nor HOME is set")?;
    Ok(PathBuf::from(home).join(".cache/dataplane"))
}

pub(crate) fn status(cmd: &mut Command) -> Result<()> {
    let st = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed ({st})");
    }
    Ok(())
}

pub(crate) fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

pub(crate) fn nightly_sysroot() -> Result<PathBuf> {
    Ok(PathBuf::from(output(
        Command::new("rustc").args(["+nightly", "--print", "sysroot"]),
    )?))
}

/// Returns the directory holding `bpf-linker` (to put on PATH).
pub(crate) fn setup() -> Result<PathBuf> {
    let started = Instant::now();
    if Command::new("rustup").arg("--version").output().is_err() {
        bail!(
            "rustup is needed to install the nightly toolchain for the eBPF build; see https://rustup.rs"
        );
    }
    let sysroot = match nightly_sysroot() {
        Ok(s) => s,
        Err(_) => {
            eprintln!("xtask: installing the nightly toolchain (eBPF programs need -Z build-std)");
            status(Command::new("rustup").args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
                "--component",
                "rust-src",
            ]))?;
            nightly_sysroot()?
        }
    };
    if !sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        eprintln!("xtask: adding rust-src to nightly");
        status(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }

    // bpf-linker must use the same LLVM as the rustc that emits the bitcode:
    // build it against the shared libLLVM the nightly toolchain ships.
    let llvm = std::fs::read_dir(sysroot.join("lib"))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so.") && n.contains("-rust-"))
        })
        .with_context(|| {
            format!(
                "no libLLVM.so.*-rust-* in {}/lib: is the nightly toolchain complete?",
                sysroot.display()
            )
        })?;
    let llvm_name = llvm
        .file_name()
        .and_then(|n| n.to_str())
        .context("libLLVM name")?
        .to_owned();
    let major: u32 = llvm_name
        .trim_start_matches("libLLVM.so.")
        .split(['.', '-'])
        .next()
        .and_then(|m| m.parse().ok())
        .with_context(|| format!("cannot read the LLVM version from {llvm_name}"))?;
    if !BPF_LINKER_LLVM.contains(&major) {
        bail!(
            "nightly uses LLVM {major}; bpf-linker {BPF_LINKER_VERSION} supports LLVM {BPF_LINKER_LLVM:?}"
        );
    }
    let cache = cache_dir()?;
    let root = cache.join("toolchain").join(&llvm_name);
    let linker = root.join("bin/bpf-linker");
    let works = Command::new(&linker)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !works {
        eprintln!(
            "xtask: building bpf-linker {BPF_LINKER_VERSION} against {llvm_name} (about a minute on 2 cores)"
        );
        let prefix = root.join("rustc-llvm");
        std::fs::create_dir_all(prefix.join("lib"))?;
        for name in ["libLLVM.so", llvm_name.as_str()] {
            let link = prefix.join("lib").join(name);
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(&llvm, &link)?;
        }
        status(
            Command::new("cargo")
                .args(["install", "--locked", "--root"])
                .arg(&root)
                .arg(format!("bpf-linker@{BPF_LINKER_VERSION}"))
                .args([
                    "--no-default-features",
                    "--features",
                    &format!("llvm-{major}"),
                ])
                .env("LLVM_PREFIX", &prefix),
        )
        .context("building bpf-linker (needs network access to crates.io)")?;
    }
    let bin = cache.join("bin");
    std::fs::create_dir_all(&bin)?;
    let link = bin.join("bpf-linker");
    if std::fs::read_link(&link).ok().as_deref() != Some(linker.as_path()) {
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&linker, &link)?;
    }
    eprintln!(
        "xtask: toolchain ready ({:.1} s)",
        started.elapsed().as_secs_f64()
    );
    Ok(bin)
}

pub(crate) fn cargo_with_linker(bin: &Path) -> Result<Command> {
    let mut paths: Vec<PathBuf> = vec![bin.to_path_buf()];
    paths.extend(env::split_paths(&env::var_os("PATH").unwrap_or_default()));
    let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo")));
    cmd.current_dir(workspace_root())
        .env("PATH", env::join_paths(paths)?);
    Ok(cmd)
}

/// Builds everything; returns the `dataplane` binary.
pub(crate) fn build(release: bool) -> Result<PathBuf> {
    let bin = setup()?;
    let mut cmd = cargo_with_linker(&bin)?;
    cmd.args([
        "build",
        "-p",
        "dataplane",
        "-p",
        "dataplane-cni",
        "-p",
        "dataplane-lab",
        "--bin",
        "dataplane",
        "--bin",
        "dataplane-cni",
        "--bin",
        "dataplane-lab",
    ]);
    if release {
        cmd.arg("--release");
    }
    status(&mut cmd)?;
    Ok(workspace_root()
        .join("target")
        .join(if release { "release" } else { "debug" })
        .join("dataplane"))
}
