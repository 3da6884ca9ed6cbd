//! `cargo xtask image`: the container image from `deploy/Containerfile`,
//! built offline with podman (or buildah) from static binaries compiled
//! here, then checked: its entry point and the DaemonSet agree (the deploy
//! tests check that statically), and its `dataplane --version` answers.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::{
    testing::have,
    toolchain::{cargo_with_linker, output, setup, status},
    workspace_root,
};

/// The host target, linked statically (glibc's static libc: the agent
/// resolves no host names, it dials the API server by address).
const TARGET: &str = "x86_64-unknown-linux-gnu";
pub(crate) const IMAGE: &str = "localhost/dataplane";

fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

/// An ELF file without a program interpreter needs no loader or shared
/// library at run time: it runs in an empty image.
fn is_static_elf(path: &Path) -> Result<bool> {
    let b = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if b.len() < 64 || &b[..4] != b"\x7fELF" || b[4] != 2 || b[5] != 1 {
        bail!("{}: not a 64-bit little-endian ELF file", path.display());
    }
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let u64_at = |o: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[o..o + 8]);
        u64::from_le_bytes(a) as usize
    };
    let (phoff, phentsize, phnum) = (u64_at(0x20), u16_at(0x36), u16_at(0x38));
    const PT_INTERP: u32 = 3;
    for i in 0..phnum {
        let o = phoff + i * phentsize;
        let t = b
            .get(o..o + 4)
            .context("truncated program header table")?
            .try_into()
            .map(u32::from_le_bytes)?;
        if t == PT_INTERP {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Builds the static binaries; returns their directory.
fn build_static() -> Result<PathBuf> {
    let bin = setup()?;
    let mut cmd = cargo_with_linker(&bin)?;
    cmd.args([
        "build",
        "--release",
        "--target",
        TARGET,
        "-p",
        "dataplane",
        "-p",
        "dataplane-cni",
        "--bin",
        "dataplane",
        "--bin",
        "dataplane-cni",
    ])
    // Only for the target: build scripts and the eBPF build stay as they are.
    .env(
        "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS",
        "-C target-feature=+crt-static",
    );
    status(&mut cmd)?;
    let dir = workspace_root().join("target").join(TARGET).join("release");
    for b in ["dataplane", "dataplane-cni"] {
        if !is_static_elf(&dir.join(b))? {
            bail!("{}: dynamically linked; the image has no libc", b);
        }
    }
    Ok(dir)
}

fn builder() -> Result<&'static str> {
    for tool in ["podman", "buildah"] {
        if have(tool) {
            return Ok(tool);
        }
    }
    if crate::testing::is_root() && have("apt-get") {
        crate::testing::apt_install(&["podman"])?;
        return Ok("podman");
    }
    bail!("neither podman nor buildah is installed (apt-get install podman)")
}

/// The BGP speaker the agent runs with `--bgp on`: BIRD 2's `bird` and
/// `birdc` from the build host's Debian package, with every library they
/// link (as `ldd` resolves them), at their own paths under `root`.
fn stage_bird(root: &Path) -> Result<()> {
    const BINARIES: [&str; 2] = ["/usr/sbin/bird", "/usr/sbin/birdc"];
    if !BINARIES.iter().all(|b| Path::new(b).is_file()) {
        crate::testing::apt_install(&["bird2"])?;
    }
    let mut files: Vec<PathBuf> = BINARIES.iter().map(PathBuf::from).collect();
    for b in BINARIES {
        let out = output(Command::new("ldd").arg(b))?;
        for line in out.lines() {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)", or the
            // loader's own "/lib64/ld-linux-x86-64.so.2 (0x…)".
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next(),
                None => line
                    .split_whitespace()
                    .next()
                    .filter(|p| p.starts_with('/')),
            };
            if let Some(p) = path.filter(|p| p.starts_with('/')) {
                files.push(PathBuf::from(p));
            }
        }
    }
    files.sort();
    files.dedup();
    for f in &files {
        let dest = root.join(f.strip_prefix("/")?);
        fs::create_dir_all(dest.parent().context("parent")?)?;
        // Symlinks followed: the image gets the library under the name
        // the binaries ask for.
        fs::copy(f, &dest).with_context(|| format!("staging {}", f.display()))?;
    }
    Ok(())
}

/// Builds the image; returns its tag.
pub(crate) fn image() -> Result<String> {
    let bins = build_static()?;
    let tool = builder()?;
    let ctx = workspace_root().join("target").join("image-context");
    let _ = fs::remove_dir_all(&ctx);
    fs::create_dir_all(ctx.join("bin"))?;
    for b in ["dataplane", "dataplane-cni"] {
        fs::copy(bins.join(b), ctx.join("bin").join(b)).with_context(|| format!("staging {b}"))?;
    }
    stage_bird(&ctx.join("rootfs"))?;
    let tag = format!("{IMAGE}:{}", version());
    let containerfile = workspace_root().join("deploy").join("Containerfile");
    let mut cmd = Command::new(tool);
    if tool == "buildah" {
        cmd.arg("bud");
    } else {
        cmd.arg("build");
    }
    cmd.args(["--network", "none", "--pull=never", "--build-arg"])
        .arg(format!("VERSION={}", version()))
        .arg("-f")
        .arg(&containerfile)
        .args(["-t", &tag])
        .arg(&ctx);
    status(&mut cmd)?;
    let _ = fs::remove_dir_all(&ctx);
    Ok(tag)
}

/// What the image says of itself and its `dataplane --version`, run in a
/// container when the runtime works here, else the image's own binary
/// copied out of it (said so).
pub(crate) fn check(tag: &str) -> Result<()> {
    let tool = builder()?;
    let entry = output(Command::new(tool).args([
        "image",
        "inspect",
        "--format",
        "{{json .Config.Entrypoint}}",
        tag,
    ]))?;
    let entry: Vec<String> = serde_json::from_str(entry.trim())
        .with_context(|| format!("entry point of {tag}: {entry}"))?;
    if entry != ["/usr/bin/dataplane"] {
        bail!("{tag}: entry point {entry:?}, the DaemonSet runs /usr/bin/dataplane");
    }
    let want = format!("dataplane {}", version());
    let run = Command::new(tool)
        .args(["run", "--rm", "--network", "none", tag, "--version"])
        .output()?;
    let got = String::from_utf8_lossy(&run.stdout).trim().to_owned();
    if run.status.success() {
        if got != want {
            bail!("{tag} --version: {got:?}, expected {want:?}");
        }
        eprintln!("xtask: image {tag}: entry point {entry:?}; in a container: {got}");
        return check_bird(tool, tag);
    }
    // This machine's runtime may refuse containers (cgroup hybrid mode,
    // rlimits); the image's content is still checked, outside it.
    let why = String::from_utf8_lossy(&run.stderr).trim().to_owned();
    let name = format!("dataplane-image-check-{}", std::process::id());
    status(Command::new(tool).args(["create", "--name", &name, tag]))?;
    let dir = std::env::temp_dir().join(&name);
    fs::create_dir_all(&dir)?;
    let copied = status(Command::new(tool).args([
        "cp",
        &format!("{name}:/usr/bin/dataplane"),
        &dir.display().to_string(),
    ]));
    let _ = Command::new(tool).args(["rm", &name]).output();
    let result = copied.and_then(|()| output(Command::new(dir.join("dataplane")).arg("--version")));
    let _ = fs::remove_dir_all(&dir);
    let got = result?.trim().to_owned();
    if got != want {
        bail!("{tag}'s /usr/bin/dataplane --version: {got:?}, expected {want:?}");
    }
    eprintln!(
        "xtask: image {tag}: entry point {entry:?}; the container runtime refused to run it here ({}), so its /usr/bin/dataplane ran outside it: {got}",
        why.lines().last().unwrap_or_default()
    );
    check_bird(tool, tag)
}

/// The image's BIRD runs on what the image holds: `bird --version` and
/// `birdc` (to a socket that is not there) in a chroot of the image's
/// files, so a library left out fails it.
fn check_bird(tool: &str, tag: &str) -> Result<()> {
    let root = output(Command::new(tool).args(["image", "mount", tag]))?;
    let root = PathBuf::from(root.trim());
    let run = |args: &[&str]| Command::new("chroot").arg(&root).args(args).output();
    let bird = run(&["/usr/sbin/bird", "--version"]);
    let birdc = run(&[
        "/usr/sbin/birdc",
        "-s",
        "/nonexistent.ctl",
        "show",
        "status",
    ]);
    let _ = Command::new(tool).args(["image", "unmount", tag]).output();
    let bird = bird?;
    let version = String::from_utf8_lossy(&bird.stderr).trim().to_owned();
    if !bird.status.success() || !version.starts_with("BIRD version 2") {
        bail!("{tag}: /usr/sbin/bird --version in the image: {version}");
    }
    let birdc = birdc?;
    let said = String::from_utf8_lossy(&birdc.stdout).into_owned()
        + &String::from_utf8_lossy(&birdc.stderr);
    if !said.contains("Unable to connect") {
        bail!("{tag}: /usr/sbin/birdc in the image did not run: {said}");
    }
    eprintln!("xtask: image {tag}: {version}, birdc runs (in a chroot of the image)");
    Ok(())
}
