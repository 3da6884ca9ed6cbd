//! Loading the embedded eBPF object, pinning its maps, attaching programs.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use aya::maps::{Array, HashMap, MapData, PerCpuHashMap, lpm_trie::LpmTrie};
use aya::{
    Ebpf, EbpfLoader,
    programs::{
        LinkOrder, SchedClassifier, TcAttachType,
        links::{FdLink, LinkError, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, SchedClassifierLinkId, TcAttachOptions},
    },
    util::KernelVersion,
};
use dataplane_common::{
    Counter, DatapathConfig, EndpointInfo, EndpointKey, EpMetricsKey, IpcacheEntry, IpcacheKey,
    MAP_CONFIG, MAP_ENDPOINTS, MAP_EP_METRICS, MAP_IPCACHE, MAPS, PROGRAMS,
};

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

/// One program attached to one device, as [`Datapath::attach`] made it.
#[derive(Debug)]
pub enum Attached {
    /// A tcx link pinned at this path.
    Pinned(PathBuf),
    /// A clsact filter owned by this process.
    Owned(&'static str, SchedClassifierLinkId),
}

pub struct Datapath {
    ebpf: Ebpf,
    mode: AttachMode,
    pin_dir: PathBuf,
}

impl Datapath {
    /// Loads every program and creates (or reuses, when already pinned) every
    /// map under `pin_dir`. `log_level` is aya-log's level (1 error .. 5 trace).
    pub fn load(
        pin_dir: &Path,
        mode: AttachMode,
        log_level: u8,
    ) -> Result<(Datapath, aya_log::EbpfLogger<&'static dyn log::Log>)> {
        let mode = mode.resolve();
        let mut loader = EbpfLoader::new();
        for spec in MAPS {
            loader.map_pin_path(spec.name, pin_dir.join(spec.name));
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
        // The logger must exist before programs load and be drained for as
        // long as they run.
        let logger = aya_log::EbpfLogger::init(&mut ebpf).context("setting up aya-log")?;
        for name in PROGRAMS {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .with_context(|| format!("the eBPF object has no program named {name}"))?
                .try_into()?;
            prog.load()
                .with_context(|| format!("loading program {name} (verifier)"))?;
        }
        Ok((
            Datapath {
                ebpf,
                mode,
                pin_dir: pin_dir.to_owned(),
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

    fn program(&mut self, name: &str) -> Result<&mut SchedClassifier> {
        Ok(self
            .ebpf
            .program_mut(name)
            .with_context(|| format!("no program {name}"))?
            .try_into()?)
    }

    /// Where the link of `prog` on `ifname` is pinned (tcx mode).
    pub fn link_pin(&self, prog: &str, ifname: &str) -> PathBuf {
        self.pin_dir.join("links").join(format!("{prog}@{ifname}"))
    }

    /// Attaches `name` to `ifname`. In tcx mode the link is pinned, so it
    /// outlives this process; a link an earlier agent pinned there is adopted
    /// instead, its program swapped for ours atomically (no packet sees
    /// neither). In clsact mode filters of the same name are replaced.
    pub fn attach(
        &mut self,
        name: &'static str,
        ifname: &str,
        direction: TcAttachType,
    ) -> Result<Attached> {
        if self.mode == AttachMode::Clsact {
            match tc::qdisc_add_clsact(ifname) {
                Ok(()) => {}
                // Another endpoint's attach (or another tool) added it already.
                Err(tc::TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("adding clsact qdisc to {ifname}"));
                }
            }
            // Filters outlive the process that added them: drop an earlier
            // agent's before adding ours, or both would run.
            match tc::qdisc_detach_program(ifname, direction, name) {
                Ok(()) => {}
                Err(tc::TcError::IoError(e)) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("removing stale {name} filters from {ifname}"));
                }
            }
            let id = self
                .program(name)?
                .attach_with_options(
                    ifname,
                    direction,
                    TcAttachOptions::Netlink(NlOptions::default()),
                )
                .with_context(|| format!("attaching {name} to {ifname} (clsact)"))?;
            return Ok(Attached::Owned(name, id));
        }
        let pin = self.link_pin(name, ifname);
        let prog = self.program(name)?;
        let id = match PinnedLink::from_pin(&pin) {
            Ok(pinned) => {
                let link = SchedClassifierLink::try_from(FdLink::from(pinned))
                    .with_context(|| format!("{} is not a tc link", pin.display()))?;
                prog.attach_to_link(link)
                    .with_context(|| format!("swapping {name} on {ifname}"))?
            }
            Err(LinkError::SyscallError(e))
                if e.io_error.kind() == std::io::ErrorKind::NotFound =>
            {
                let id = prog
                    .attach_with_options(
                        ifname,
                        direction,
                        TcAttachOptions::TcxOrder(LinkOrder::default()),
                    )
                    .with_context(|| format!("attaching {name} to {ifname} (tcx)"))?;
                let fd: FdLink = prog.take_link(id)?.try_into()?;
                if let Some(dir) = pin.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                fd.pin(&pin)
                    .with_context(|| format!("pinning {}", pin.display()))?;
                return Ok(Attached::Pinned(pin));
            }
            Err(e) => return Err(e).with_context(|| format!("opening {}", pin.display())),
        };
        // The link stays pinned; our handle to it can go.
        drop(prog.take_link(id)?);
        Ok(Attached::Pinned(pin))
    }

    /// Undoes [`Datapath::attach`]. A link whose device is gone is already
    /// detached; only its pin remains to remove.
    pub fn detach(&mut self, attached: Attached) -> Result<()> {
        match attached {
            Attached::Owned(name, id) => Ok(self.program(name)?.detach(id)?),
            Attached::Pinned(pin) => match PinnedLink::from_pin(&pin) {
                Ok(link) => {
                    let fd = link
                        .unpin()
                        .with_context(|| format!("unpinning {}", pin.display()))?;
                    // Detach now, even if another process still holds the link.
                    if let Ok(link) = SchedClassifierLink::try_from(fd) {
                        aya::programs::links::Link::detach(link)?;
                    }
                    Ok(())
                }
                Err(LinkError::SyscallError(e))
                    if e.io_error.kind() == std::io::ErrorKind::NotFound =>
                {
                    Ok(())
                }
                Err(e) => Err(e).with_context(|| format!("opening {}", pin.display())),
            },
        }
    }

    fn map_mut(&mut self, name: &str) -> Result<&mut aya::maps::Map> {
        self.ebpf
            .map_mut(name)
            .with_context(|| format!("no map {name}"))
    }

    /// [`MAP_ENDPOINTS`], typed.
    pub fn endpoints(&mut self) -> Result<HashMap<&mut MapData, EndpointKey, EndpointInfo>> {
        Ok(HashMap::try_from(self.map_mut(MAP_ENDPOINTS)?)?)
    }

    /// [`MAP_EP_METRICS`], typed.
    pub fn ep_metrics(&mut self) -> Result<PerCpuHashMap<&mut MapData, EpMetricsKey, Counter>> {
        Ok(PerCpuHashMap::try_from(self.map_mut(MAP_EP_METRICS)?)?)
    }

    /// [`MAP_IPCACHE`], typed.
    pub fn ipcache(&mut self) -> Result<LpmTrie<&mut MapData, IpcacheKey, IpcacheEntry>> {
        Ok(LpmTrie::try_from(self.map_mut(MAP_IPCACHE)?)?)
    }

    /// [`MAP_CONFIG`], typed.
    pub fn config(&mut self) -> Result<Array<&mut MapData, DatapathConfig>> {
        Ok(Array::try_from(self.map_mut(MAP_CONFIG)?)?)
    }
}
