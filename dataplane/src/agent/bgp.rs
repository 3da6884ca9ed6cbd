//! The agent's BGP speaker: a BIRD 2 daemon in the node's network
//! namespace, configured from [`crate::bgp::render`] and reloaded when what
//! the node advertises changes. The daemon is started detached (its pid
//! file and control socket under `<state-dir>/bgp/`) and outlives the
//! agent: a restarted agent finds it answering and only reloads it, so
//! sessions and routes live through the agent's restarts. Reading it
//! (sessions, routes) goes through `birdc`.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::Mutex,
};

use anyhow::{Context as _, Result, bail};
use tracing::{info, warn};

use dataplane_common::api::BgpStatus;

use crate::bgp::{self, Advertised, Speaker};

pub(crate) struct Bgp {
    speaker: Speaker,
    dir: PathBuf,
    daemon: PathBuf,
    client: PathBuf,
    /// The configuration last loaded, what it advertises, and the AS
    /// number it speaks as.
    loaded: Mutex<Option<(String, Advertised, u32)>>,
}

/// `birdc` next to the daemon when it is given by path, else from PATH.
fn client_of(daemon: &Path) -> PathBuf {
    match daemon.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join("birdc"),
        _ => PathBuf::from("birdc"),
    }
}

impl Bgp {
    pub(crate) fn new(speaker: Speaker, state_dir: &Path, daemon: PathBuf) -> Result<Bgp> {
        let dir = state_dir.join("bgp");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Bgp {
            client: client_of(&daemon),
            speaker,
            dir,
            daemon,
            loaded: Mutex::new(None),
        })
    }

    pub(crate) fn client(&self) -> PathBuf {
        self.client.clone()
    }

    pub(crate) fn control_socket(&self) -> PathBuf {
        self.dir.join("bird.ctl")
    }

    fn birdc(&self, args: &[&str]) -> Result<String> {
        birdc(&self.client, &self.control_socket(), args)
    }

    /// Whether a daemon answers on the control socket.
    fn running(&self) -> bool {
        self.control_socket().exists() && self.birdc(&["show", "status"]).is_ok()
    }

    /// Makes the daemon advertise `adv`: the configuration written (only
    /// when it changed) and loaded, the daemon started if none answers
    /// (asked only when `check`, or when the configuration changed: the
    /// full resyncs look after a daemon that went away).
    pub(crate) fn apply(
        &self,
        adv: &Advertised,
        (asn, peers): bgp::Overrides,
        check: bool,
    ) -> Result<()> {
        let log = self.dir.join("bird.log");
        // The Node object's annotations win over the flags.
        let speaker = Speaker {
            asn: asn.unwrap_or(self.speaker.asn),
            peers: peers.unwrap_or_else(|| self.speaker.peers.clone()),
            ..self.speaker.clone()
        };
        let text = bgp::render(&speaker, adv, &log.display().to_string());
        let mut loaded = self
            .loaded
            .lock()
            .map_err(|_| anyhow::anyhow!("bgp state poisoned"))?;
        let same = loaded.as_ref().is_some_and(|(t, ..)| *t == text);
        if same && !check {
            return Ok(());
        }
        let running = self.running();
        if running && same {
            return Ok(());
        }
        if !running && loaded.is_some() {
            warn!("the BGP daemon does not answer: starting it again");
        }
        let conf = self.dir.join("bird.conf");
        let tmp = self.dir.join("bird.conf.new");
        std::fs::write(&tmp, &text).with_context(|| format!("writing {}", tmp.display()))?;
        // Checked before it replaces the configuration in use.
        let check = Command::new(&self.daemon)
            .arg("-p")
            .arg("-c")
            .arg(&tmp)
            .output()
            .with_context(|| format!("running {}", self.daemon.display()))?;
        if !check.status.success() {
            bail!(
                "the BGP configuration is refused by {}: {}",
                self.daemon.display(),
                String::from_utf8_lossy(&check.stderr).trim()
            );
        }
        std::fs::rename(&tmp, &conf)?;
        if running {
            let out = self.birdc(&["configure"])?;
            if !out.contains("Reconfigured") && !out.contains("Reconfiguration in progress") {
                bail!("birdc configure: {}", out.trim());
            }
            info!(pod_cidr = ?adv.pod_cidr, service_ips = adv.service_ips.len(), "BGP configuration reloaded");
        } else {
            // BIRD forks and returns once it runs: the daemon is not this
            // process's child and outlives it.
            let out = Command::new(&self.daemon)
                .arg("-c")
                .arg(&conf)
                .arg("-s")
                .arg(self.control_socket())
                .arg("-P")
                .arg(self.dir.join("bird.pid"))
                .output()
                .with_context(|| format!("starting {}", self.daemon.display()))?;
            if !out.status.success() {
                bail!(
                    "starting {}: {}",
                    self.daemon.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            info!(
                asn = speaker.asn,
                peers = speaker.peers.len(),
                pod_cidr = ?adv.pod_cidr,
                "BGP daemon started"
            );
        }
        *loaded = Some((text, adv.clone(), speaker.asn));
        Ok(())
    }

    /// Reads the daemon's state, without holding on to the speaker.
    pub(crate) fn reader(&self) -> Reader {
        let asn = self
            .loaded
            .lock()
            .ok()
            .and_then(|l| l.as_ref().map(|(.., asn)| *asn))
            .unwrap_or(self.speaker.asn);
        Reader {
            client: self.client.clone(),
            socket: self.control_socket(),
            asn,
            router_id: self.speaker.router_id,
        }
    }
}

#[derive(Clone)]
pub(crate) struct Reader {
    client: PathBuf,
    socket: PathBuf,
    asn: u32,
    router_id: std::net::Ipv4Addr,
}

impl Reader {
    fn birdc(&self, args: &[&str]) -> Result<String> {
        birdc(&self.client, &self.socket, args)
    }

    pub(crate) fn status(&self) -> Result<BgpStatus> {
        Ok(BgpStatus {
            asn: self.asn,
            router_id: self.router_id.to_string(),
            sessions: bgp::parse_protocols(&self.birdc(&["show", "protocols", "all"])?),
            routes: bgp::parse_routes(&self.birdc(&["show", "route"])?),
        })
    }
}

/// Logs each session's changes of state (with the error that ended an
/// established one), looking every 2 s: the daemon retries on its own, the
/// operator sees it in the agent's log and in the metrics.
pub(crate) async fn watch_sessions(reader: Reader) {
    let mut known: std::collections::BTreeMap<String, String> = Default::default();
    let mut every = tokio::time::interval(std::time::Duration::from_secs(2));
    loop {
        every.tick().await;
        let r = reader.clone();
        let Ok(Ok(st)) = tokio::task::spawn_blocking(move || r.status()).await else {
            continue;
        };
        for s in st.sessions {
            let before = known.insert(s.neighbor.clone(), s.state.clone());
            if before.as_deref() == Some(s.state.as_str()) {
                continue;
            }
            let error = s.last_error.as_deref().unwrap_or("");
            if s.state == "Established" {
                info!(peer = %s.neighbor, peer_as = ?s.neighbor_as, "BGP session established");
            } else {
                warn!(
                    peer = %s.neighbor,
                    peer_as = ?s.neighbor_as,
                    state = %s.state,
                    error,
                    was = before.as_deref().unwrap_or("-"),
                    "BGP session not established"
                );
            }
        }
    }
}

fn birdc(client: &Path, socket: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(client)
        .arg("-s")
        .arg(socket)
        .args(args)
        .output()
        .with_context(|| format!("running {}", client.display()))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "birdc {}: {}{}",
            args.join(" "),
            text.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(text)
}

/// Stops the daemon a node's agent started (`dataplane uninstall`, the
/// agent's `--cleanup`): by its pid file, waiting for it to go (it
/// withdraws its routes from the kernel and its peers as it ends).
pub fn stop_daemon(state_dir: &Path) -> Result<bool> {
    let pid_file = state_dir.join("bgp").join("bird.pid");
    let Ok(text) = std::fs::read_to_string(&pid_file) else {
        return Ok(false);
    };
    let pid: i32 = text
        .trim()
        .parse()
        .with_context(|| format!("{}: {text:?}", pid_file.display()))?;
    // Only a BIRD: a stale pid file may name another process by now.
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if comm.trim() != "bird" {
        let _ = std::fs::remove_file(&pid_file);
        return Ok(false);
    }
    // SAFETY: plain kill(2).
    unsafe { libc::kill(pid, libc::SIGTERM) };
    for _ in 0..100 {
        if !Path::new(&format!("/proc/{pid}")).exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    if Path::new(&format!("/proc/{pid}")).exists() {
        warn!(pid, "the BGP daemon did not stop in 5 s");
    }
    let _ = std::fs::remove_file(&pid_file);
    Ok(true)
}
