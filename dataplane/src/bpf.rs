//! Loading the embedded eBPF object, pinning its maps, attaching programs.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    programs::{
        LinkOrder, SchedClassifier, TcAttachType,
        tc::{self, NlOptions, SchedClassifierLinkId, TcAttachOptions},
    },
    util::KernelVersion,
};
use dataplane_common::{MAPS, PROGRAMS};

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

    pub fn attach(
        &mut self,
        name: &str,
        ifname: &str,
        direction: TcAttachType,
    ) -> Result<SchedClassifierLinkId> {
        let mode = self.mode;
        let options = match mode {
            AttachMode::Clsact => {
                match tc::qdisc_add_clsact(ifname) {
                    Ok(()) => {}
                    // Another endpoint's attach (or another tool) added it already.
                    Err(tc::TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {
                    }
                    Err(e) => {
                        return Err(e).with_context(|| format!("adding clsact qdisc to {ifname}"));
                    }
                }
                TcAttachOptions::Netlink(NlOptions::default())
            }
            _ => TcAttachOptions::TcxOrder(LinkOrder::default()),
        };
        self.program(name)?
            .attach_with_options(ifname, direction, options)
            .with_context(|| format!("attaching {name} to {ifname} ({})", mode.name()))
    }

    pub fn detach(&mut self, name: &str, link: SchedClassifierLinkId) -> Result<()> {
        Ok(self.program(name)?.detach(link)?)
    }

    pub fn map_mut(&mut self, name: &str) -> Result<&mut aya::maps::Map> {
        self.ebpf
            .map_mut(name)
            .with_context(|| format!("no map {name}"))
    }
}
