//! Loading the embedded eBPF object, pinning its maps, attaching programs.
//!
//! Every program is loaded, attached, adopted after a restart and detached
//! through [`dataplane_common::PROGRAMS`], whatever its kind: tc (tcx links,
//! or clsact filters on old kernels), XDP (links), cgroup sock_addr (links).
//! Links are pinned under `<pin_dir>/links/`, so they outlive the agent; the
//! next agent swaps its program into each with `BPF_LINK_UPDATE`, atomically.

use std::{
    collections::BTreeMap,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Map, MapData, MapType},
    programs::{
        CgroupAttachMode, CgroupSockAddr, LinkOrder, Program, SchedClassifier, TcAttachType, Xdp,
        XdpMode,
        links::FdLink,
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
    },
    util::KernelVersion,
};
use dataplane_common::{MAPS, MapKind, MapSpec, PROGRAMS, ProgKind, ProgSpec, pin};
use tracing::{info, warn};

use crate::sys;

/// The object built by build.rs, embedded so the agent is one file to ship.
static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/dataplane-ebpf"));

/// How TC programs are attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AttachMode {
    /// tcx links when the kernel has them (6.6+), clsact otherwise.
    Auto,
    /// tcx links (multi-program, owned by the agent, pinnable).
    Tcx,
    /// A clsact qdisc with direct-action cls_bpf filters (older kernels).
    Clsact,
}

impl AttachMode {
    pub fn resolve(self) -> AttachMode {
        match self {
            AttachMode::Auto => match KernelVersion::current() {
                Ok(v) if v >= KernelVersion::new(6, 6, 0) => AttachMode::Tcx,
                _ => AttachMode::Clsact,
            },
            m => m,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            AttachMode::Auto => "auto",
            AttachMode::Tcx => "tcx",
            AttachMode::Clsact => "clsact",
        }
    }
}

/// How the XDP program goes on the uplink.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpSetting {
    /// In the driver when it supports XDP, generic (skb) mode otherwise.
    Auto,
    /// In the driver only.
    Native,
    /// Generic (skb) mode: works on every device, after skb allocation.
    Generic,
    /// No XDP program.
    Off,
}

/// What a program is attached to.
#[derive(Clone, Copy, Debug)]
pub enum Target<'a> {
    Iface(&'a str),
    Cgroup(&'a Path),
}

/// One program attached to one target, as [`Datapath::attach`] made it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attached {
    /// A link pinned at this path (tcx, XDP, cgroup).
    Pinned(PathBuf),
    /// A clsact filter; its priority and handle identify it on the device.
    Clsact {
        prog: &'static str,
        ifname: String,
        ingress: bool,
        priority: u16,
        handle: u32,
    },
}

impl Attached {
    pub fn pin(&self) -> Option<&Path> {
        match self {
            Attached::Pinned(path) => Some(path),
            Attached::Clsact { .. } => None,
        }
    }
}

/// Verified instruction count and kind of one loaded program.
#[derive(Clone, Debug)]
pub struct ProgStats {
    pub name: &'static str,
    pub kind: ProgKind,
    pub verified_insns: Option<u32>,
    pub translated_bytes: Option<u32>,
}

pub struct Datapath {
    ebpf: Ebpf,
    mode: AttachMode,
    pin_dir: PathBuf,
    /// Where clsact filters are recorded (`clsact.json`) so that the next
    /// agent can replace them without a gap.
    state_dir: PathBuf,
}

fn aya_map_type(kind: MapKind) -> MapType {
    match kind {
        MapKind::Hash => MapType::Hash,
        MapKind::LruHash => MapType::LruHash,
        MapKind::HashOfMaps => MapType::HashOfMaps,
        MapKind::ArrayOfMaps => MapType::ArrayOfMaps,
        MapKind::PerCpuHash => MapType::PerCpuHash,
        MapKind::Array => MapType::Array,
        MapKind::PerCpuArray => MapType::PerCpuArray,
        MapKind::LpmTrie => MapType::LpmTrie,
        MapKind::RingBuf => MapType::RingBuf,
    }
}

/// The size of `spec` as this agent creates it: its own, or a setting's.
fn max_entries(spec: &MapSpec, sizes: &[(&str, u32)]) -> u32 {
    sizes
        .iter()
        .find(|(n, _)| *n == spec.name)
        .map_or(spec.max_entries, |(_, m)| *m)
}

/// How a pinned map differs from `spec` (with `max_entries`), if it does.
/// `max_entries` `None`: any size (a map the agent sizes by a setting).
pub fn layout_mismatch(
    path: &Path,
    spec: &MapSpec,
    max_entries: Option<u32>,
) -> Result<Option<String>> {
    let info = aya::maps::MapInfo::from_pin(path)
        .with_context(|| format!("reading {}", path.display()))?;
    let mut diffs = Vec::new();
    match info.map_type() {
        Ok(t) if t == aya_map_type(spec.kind) => {}
        Ok(t) => diffs.push(format!("type {t:?}, expected {}", spec.kind.name())),
        Err(e) => diffs.push(format!("type unknown ({e})")),
    }
    for (what, have, want) in [
        ("flags", info.map_flags(), spec.flags),
        ("key size", info.key_size(), spec.key_size),
        ("value size", info.value_size(), spec.value_size),
        (
            "max entries",
            info.max_entries(),
            max_entries.unwrap_or(info.max_entries()),
        ),
    ] {
        if have != want {
            diffs.push(format!("{what} {have}, expected {want}"));
        }
    }
    Ok((!diffs.is_empty()).then(|| diffs.join(", ")))
}

/// Before loading: a pinned map this agent would misread is replaced, and
/// pins of other layout versions are removed. Programs of the previous agent
/// keep their own references to the old maps and keep forwarding until ours
/// are swapped in; the agent rebuilds the new maps' entries before that.
fn prepare_pins(pin_dir: &Path, sizes: &[(&str, u32)]) -> Result<()> {
    for spec in MAPS {
        let path = pin_dir.join(spec.pin_name());
        if path.exists()
            && let Some(diff) = layout_mismatch(&path, spec, Some(max_entries(spec, sizes)))?
        {
            warn!(
                map = spec.name,
                pin = %path.display(),
                "the pinned map's layout differs from this agent's ({diff}); replacing it with a new map, its entries are rebuilt from the agent's state"
            );
            std::fs::remove_file(&path).with_context(|| format!("unpinning {}", path.display()))?;
        }
        let Ok(dir) = std::fs::read_dir(pin_dir) else {
            continue;
        };
        let prefix = format!("{}_v", spec.name);
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            // Agents before layout versions pinned the bare name: version 0.
            let version = if name == spec.name {
                "0"
            } else {
                match name.strip_prefix(&prefix) {
                    Some(v) => v,
                    None => continue,
                }
            };
            if version.parse::<u32>().is_ok_and(|v| v != spec.version) {
                warn!(
                    map = spec.name,
                    "layout v{version} pinned by an earlier agent is replaced by layout v{}; its entries are rebuilt from the agent's state",
                    spec.version
                );
                std::fs::remove_file(entry.path())
                    .with_context(|| format!("unpinning {}", entry.path().display()))?;
            }
        }
    }
    Ok(())
}

impl Datapath {
    /// Loads every program and creates (or reuses, when already pinned with
    /// the same layout) every map under `pin_dir`. `log_level` is aya-log's
    /// level (1 error .. 5 trace). `sizes` overrides maps' sizes (by name).
    pub fn load(
        pin_dir: &Path,
        state_dir: &Path,
        mode: AttachMode,
        log_level: u8,
        sizes: &[(&'static str, u32)],
    ) -> Result<(Datapath, aya_log::EbpfLogger<&'static dyn log::Log>)> {
        let mode = mode.resolve();
        prepare_pins(pin_dir, sizes)?;
        let paths: Vec<(&'static str, PathBuf)> = MAPS
            .iter()
            .map(|s| (s.name, pin_dir.join(s.pin_name())))
            .collect();
        let mut loader = EbpfLoader::new();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        for (name, size) in sizes {
            loader.map_max_entries(name, *size);
        }
        loader.override_global("AYA_LOG_LEVEL", &log_level, false);
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .context("loading the eBPF object")?;
        for spec in MAPS {
            if ebpf.map(spec.name).is_none() {
                bail!(
                    "the eBPF object has no map named {} (contract drift)",
                    spec.name
                );
            }
        }
        for (name, _) in ebpf.programs() {
            if ProgSpec::by_name(name).is_none() {
                bail!("the eBPF object has a program {name} that the program table lacks");
            }
        }
        // The logger must exist before programs load and be drained for as
        // long as they run.
        let logger = aya_log::EbpfLogger::init(&mut ebpf).context("setting up aya-log")?;
        for spec in PROGRAMS {
            let prog = ebpf
                .program_mut(spec.name)
                .with_context(|| format!("the eBPF object has no program named {}", spec.name))?;
            load_program(prog, spec)
                .with_context(|| format!("loading program {} (verifier)", spec.name))?;
        }
        Ok((
            Datapath {
                ebpf,
                mode,
                pin_dir: pin_dir.to_owned(),
                state_dir: state_dir.to_owned(),
            },
            logger,
        ))
    }

    pub fn mode(&self) -> AttachMode {
        self.mode
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Takes a map out of the object, for the one module that owns it.
    pub fn take_map(&mut self, name: &str) -> Result<Map> {
        self.ebpf
            .take_map(name)
            .with_context(|| format!("no map {name} (already taken?)"))
    }

    /// What the verifier accepted, program by program.
    pub fn stats(&self) -> Result<Vec<ProgStats>> {
        PROGRAMS
            .iter()
            .map(|spec| {
                let info = self
                    .ebpf
                    .program(spec.name)
                    .with_context(|| format!("no program {}", spec.name))?
                    .info()?;
                Ok(ProgStats {
                    name: spec.name,
                    kind: spec.kind,
                    verified_insns: info.verified_instruction_count(),
                    translated_bytes: info.size_translated(),
                })
            })
            .collect()
    }

    /// A loaded program, for `BPF_PROG_TEST_RUN`.
    pub fn program_ref(&self, name: &str) -> Result<&Program> {
        self.ebpf
            .program(name)
            .with_context(|| format!("no program {name}"))
    }

    fn program(&mut self, name: &str) -> Result<&mut Program> {
        self.ebpf
            .program_mut(name)
            .with_context(|| format!("no program {name}"))
    }

    /// Where the link of `prog` on `target` is pinned.
    pub fn link_pin(&self, prog: &str, target: &Target<'_>) -> PathBuf {
        let what = match target {
            Target::Iface(ifname) => pin::escape(ifname),
            Target::Cgroup(_) => "cgroup".to_owned(),
        };
        self.pin_dir.join("links").join(format!("{prog}@{what}"))
    }

    /// Attaches `spec` to `target`. A link an earlier agent pinned there is
    /// adopted, its program swapped for ours atomically; otherwise a new link
    /// is made and pinned, so it outlives this process. In clsact mode the
    /// new filter goes in before the old one comes out.
    pub fn attach(
        &mut self,
        spec: &'static ProgSpec,
        target: Target<'_>,
        xdp: XdpSetting,
    ) -> Result<Attached> {
        if spec.kind.is_tc() && self.mode == AttachMode::Clsact {
            let Target::Iface(ifname) = target else {
                bail!("{} attaches to an interface", spec.name);
            };
            return self.attach_clsact(spec, ifname);
        }
        let pin = self.link_pin(spec.name, &target);
        if let Some(link) = sys::bpf_obj_get(&pin)? {
            let prog = self.program(spec.name)?;
            sys::bpf_link_update(link.as_fd(), prog.fd()?.as_fd())
                .with_context(|| format!("swapping {} into {}", spec.name, pin.display()))?;
            return Ok(Attached::Pinned(pin));
        }
        let fd: FdLink = match (spec.kind, target) {
            (ProgKind::TcIngress | ProgKind::TcEgress, Target::Iface(ifname)) => {
                let dir = tc_direction(spec.kind);
                let prog: &mut SchedClassifier = self.program(spec.name)?.try_into()?;
                let id = prog
                    .attach_with_options(
                        ifname,
                        dir,
                        TcAttachOptions::TcxOrder(LinkOrder::default()),
                    )
                    .with_context(|| format!("attaching {} to {ifname} (tcx)", spec.name))?;
                prog.take_link(id)?.try_into()?
            }
            (ProgKind::Xdp, Target::Iface(ifname)) => {
                let prog: &mut Xdp = self.program(spec.name)?.try_into()?;
                let modes: &[XdpMode] = match xdp {
                    XdpSetting::Native => &[XdpMode::Driver],
                    XdpSetting::Generic => &[XdpMode::Skb],
                    XdpSetting::Auto => &[XdpMode::Driver, XdpMode::Skb],
                    XdpSetting::Off => bail!("XDP is off"),
                };
                let mut last = None;
                let mut made = None;
                for m in modes {
                    match prog.attach(ifname, *m) {
                        Ok(id) => {
                            made = Some(id);
                            break;
                        }
                        Err(e) => last = Some(e),
                    }
                }
                let Some(id) = made else {
                    return Err(anyhow::Error::from(last.context("no XDP mode")?))
                        .with_context(|| format!("attaching {} to {ifname} (XDP)", spec.name));
                };
                prog.take_link(id)?.try_into()?
            }
            (kind, Target::Cgroup(cgroup)) if kind.is_cgroup() => {
                let file = std::fs::File::open(cgroup)
                    .with_context(|| format!("opening cgroup {}", cgroup.display()))?;
                let prog: &mut CgroupSockAddr = self.program(spec.name)?.try_into()?;
                // A link: the kernel runs every link on a cgroup (multi
                // attach is implied; the flag itself is refused with links).
                let id = prog
                    .attach(&file, CgroupAttachMode::Single)
                    .with_context(|| {
                        format!("attaching {} to cgroup {}", spec.name, cgroup.display())
                    })?;
                prog.take_link(id)?.try_into()?
            }
            (kind, target) => bail!(
                "{} ({}) cannot attach to {target:?}",
                spec.name,
                kind.name()
            ),
        };
        if let Some(dir) = pin.parent() {
            std::fs::create_dir_all(dir)?;
        }
        fd.pin(&pin)
            .with_context(|| format!("pinning {}", pin.display()))?;
        Ok(Attached::Pinned(pin))
    }

    /// Undoes [`Datapath::attach`]. A link whose device or cgroup is gone is
    /// already detached; only its pin remains to remove.
    pub fn detach(&mut self, attached: Attached) -> Result<()> {
        match attached {
            Attached::Clsact {
                prog,
                ifname,
                ingress,
                priority,
                handle,
            } => {
                let dir = if ingress {
                    TcAttachType::Ingress
                } else {
                    TcAttachType::Egress
                };
                let key = format!("{prog}@{ifname}");
                let mut records = self.clsact_records();
                records.remove(&key);
                self.save_clsact_records(&records)?;
                match SchedClassifierLink::attached(
                    &ifname,
                    dir,
                    priority,
                    TcHandle::from(handle),
                    None,
                ) {
                    Ok(link) => {
                        // Fails when the device (and its filters) is gone.
                        let _ = aya::programs::links::Link::detach(link);
                        Ok(())
                    }
                    Err(_) => Ok(()),
                }
            }
            Attached::Pinned(path) => detach_pinned(&path).map(drop),
        }
    }

    fn clsact_file(&self) -> PathBuf {
        self.state_dir.join("clsact.json")
    }

    fn clsact_records(&self) -> BTreeMap<String, (u16, u32)> {
        std::fs::read(self.clsact_file())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn save_clsact_records(&self, records: &BTreeMap<String, (u16, u32)>) -> Result<()> {
        std::fs::create_dir_all(&self.state_dir)?;
        let path = self.clsact_file();
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(records)?)?;
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))
    }

    /// clsact filters outlive the process that added them. The new filter
    /// is added first (the kernel gives it a priority ahead of the old one,
    /// so it takes over at once), then the old one, known from the record an
    /// earlier agent left, is removed: no packet goes unfiltered. Without a
    /// record, filters of the same name are removed before ours goes in.
    fn attach_clsact(&mut self, spec: &'static ProgSpec, ifname: &str) -> Result<Attached> {
        match tc::qdisc_add_clsact(ifname) {
            Ok(()) => {}
            // Another endpoint's attach (or another tool) added it already.
            Err(tc::TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => {
                return Err(e).with_context(|| format!("adding clsact qdisc to {ifname}"));
            }
        }
        let dir = tc_direction(spec.kind);
        let key = format!("{}@{ifname}", spec.name);
        let mut records = self.clsact_records();
        let old = records.get(&key).copied();
        if old.is_none() {
            match tc::qdisc_detach_program(ifname, dir, spec.name) {
                Ok(()) => info!(
                    prog = spec.name,
                    ifname, "replaced unrecorded clsact filters (a brief gap)"
                ),
                Err(tc::TcError::IoError(e)) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("removing stale {} filters from {ifname}", spec.name)
                    });
                }
            }
        }
        let prog: &mut SchedClassifier = self.program(spec.name)?.try_into()?;
        let id = prog
            .attach_with_options(ifname, dir, TcAttachOptions::Netlink(NlOptions::default()))
            .with_context(|| format!("attaching {} to {ifname} (clsact)", spec.name))?;
        let link = prog.take_link(id)?;
        let (priority, handle) = (link.priority()?, u32::from(link.handle()?));
        // The filter stays when our handle goes: forget it without detaching.
        std::mem::forget(link);
        if let Some((p, h)) = old
            && (p, h) != (priority, handle)
            && let Ok(old) = SchedClassifierLink::attached(ifname, dir, p, TcHandle::from(h), None)
        {
            // Gone already when the device was recreated: nothing to remove.
            let _ = aya::programs::links::Link::detach(old);
        }
        records.insert(key, (priority, handle));
        self.save_clsact_records(&records)?;
        Ok(Attached::Clsact {
            prog: spec.name,
            ifname: ifname.to_owned(),
            ingress: dir == TcAttachType::Ingress,
            priority,
            handle,
        })
    }
}

/// Detaches the link pinned at `path` now, even if another process still
/// holds it, and removes the pin; false when nothing was pinned there. A
/// link whose device or cgroup went away is already detached.
pub fn detach_pinned(path: &Path) -> Result<bool> {
    let Some(link) = sys::bpf_obj_get(path)? else {
        return Ok(false);
    };
    if let Err(e) = sys::bpf_link_detach(link.as_fd()) {
        tracing::debug!("detaching {}: {e}", path.display());
    }
    std::fs::remove_file(path).with_context(|| format!("unpinning {}", path.display()))?;
    Ok(true)
}

/// Removes the clsact filters an agent recorded in `state_dir` (what
/// `dataplane uninstall` does without loading anything); returns how many
/// were still there.
pub fn remove_recorded_clsact(state_dir: &Path) -> Result<usize> {
    let file = state_dir.join("clsact.json");
    let records: BTreeMap<String, (u16, u32)> = match std::fs::read(&file) {
        Ok(b) => serde_json::from_slice(&b).with_context(|| format!("{}", file.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e).with_context(|| format!("reading {}", file.display())),
    };
    let mut removed = 0;
    for (key, (priority, handle)) in &records {
        let Some((prog, ifname)) = key.split_once('@') else {
            continue;
        };
        let Some(spec) = PROGRAMS.iter().find(|p| p.name == prog) else {
            continue;
        };
        if let Ok(link) = SchedClassifierLink::attached(
            ifname,
            tc_direction(spec.kind),
            *priority,
            TcHandle::from(*handle),
            None,
        ) && aya::programs::links::Link::detach(link).is_ok()
        {
            removed += 1;
        }
    }
    std::fs::remove_file(&file).with_context(|| format!("removing {}", file.display()))?;
    Ok(removed)
}

fn tc_direction(kind: ProgKind) -> TcAttachType {
    if kind == ProgKind::TcEgress {
        TcAttachType::Egress
    } else {
        TcAttachType::Ingress
    }
}

fn load_program(prog: &mut Program, spec: &ProgSpec) -> Result<()> {
    // The verifier gives up with EAGAIN when a signal arrives during a long
    // verification (host_in takes ~300k steps); libbpf retries such loads
    // five times, and so does this.
    let mut attempt = 1;
    loop {
        match load_once(prog, spec) {
            Err(aya::programs::ProgramError::LoadError { io_error, .. })
                if attempt < 5 && io_error.raw_os_error() == Some(libc::EAGAIN) =>
            {
                warn!(
                    program = spec.name,
                    attempt, "verification interrupted; loading again"
                );
                attempt += 1;
            }
            r => return Ok(r?),
        }
    }
}

fn load_once(prog: &mut Program, spec: &ProgSpec) -> Result<(), aya::programs::ProgramError> {
    match spec.kind {
        ProgKind::TcIngress | ProgKind::TcEgress => {
            let p: &mut SchedClassifier = prog.try_into()?;
            p.load()
        }
        ProgKind::Xdp => {
            let p: &mut Xdp = prog.try_into()?;
            p.load()
        }
        ProgKind::CgroupConnect4
        | ProgKind::CgroupSendmsg4
        | ProgKind::CgroupRecvmsg4
        | ProgKind::CgroupGetpeername4 => {
            let p: &mut CgroupSockAddr = prog.try_into()?;
            p.load()
        }
    }
}

/// Opens a pinned map of the contract, with a clear error when it is
/// missing (no agent yet) or pinned by an agent of another layout version.
pub fn open_pinned(pin_dir: &Path, spec: &MapSpec) -> Result<Map> {
    let path = pin_dir.join(spec.pin_name());
    let data = match MapData::from_pin(&path) {
        Ok(d) => d,
        Err(e) => {
            let other = std::fs::read_dir(pin_dir).ok().and_then(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .find(|n| n.starts_with(&format!("{}_v", spec.name)))
            });
            return Err(match other {
                Some(o) => anyhow::anyhow!(
                    "{} has {o}, not {} (layout v{}): the agent that pinned it is another version",
                    pin_dir.display(),
                    spec.pin_name(),
                    spec.version
                ),
                None => {
                    anyhow::Error::from(e).context(format!("opening pinned map {}", path.display()))
                }
            });
        }
    };
    // Sizes set by the agent's flags are whatever that agent chose.
    let size = (spec.name != dataplane_common::MAP_CT).then_some(spec.max_entries);
    if let Some(diff) = layout_mismatch(&path, spec, size)? {
        bail!(
            "{} does not have this program's layout ({diff})",
            path.display()
        );
    }
    Ok(Map::from_map_data(data)?)
}
