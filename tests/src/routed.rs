//! The routed underlay (`lab up --underlay routed`): no shared L2. Node
//! `i` sits alone in 172.21.i.0/24 (the node at .11, the router at .1),
//! the external host in 172.21.100.0/24 (.100), and the router namespace
//! (the lab's `<id>-ul`) forwards between them as a top-of-rack router
//! would. It runs BIRD 2 or FRR as AS 65000 with an eBGP session to each
//! node (node `i` is AS 64512 + i, so that no node refuses another's
//! routes as its own AS's): what the nodes advertise is what the router,
//! and through it the other nodes, can reach.
//!
//! ```text
//!   <id>-ext 172.21.100.100 ── ext ┐
//!   <id>-n0  172.21.0.11    ── n0  ┤ <id>-ul: router, AS 65000
//!   <id>-n1  172.21.1.11    ── n1  ┘
//! ```

use std::{
    fmt::Write as _,
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

pub const ROUTER_AS: u32 = 65000;
pub const EXTERNAL_SUBNET: u8 = 100;

/// Node `i`'s AS number.
pub fn node_as(i: usize) -> u32 {
    64512 + i as u32
}

/// Node `i`'s address.
pub fn node_ip(i: usize) -> Result<Ipv4Addr> {
    Ok(Ipv4Addr::new(
        172,
        21,
        u8::try_from(i)
            .ok()
            .filter(|i| *i < EXTERNAL_SUBNET)
            .context("too many nodes")?,
        11,
    ))
}

/// The router's address in `host`'s subnet.
pub fn gateway(host: Ipv4Addr) -> Ipv4Addr {
    let [a, b, c, _] = host.octets();
    Ipv4Addr::new(a, b, c, 1)
}

/// The router as the lab runs it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RouterState {
    /// `bird` or `frr`.
    pub daemon: String,
    /// Its processes (teardown stops them).
    pub pids: Vec<u32>,
    /// Where its configuration, sockets and log are.
    pub dir: PathBuf,
}

impl RouterState {
    /// The router's routes, as its daemon shows them.
    pub fn routes(&self) -> Result<String> {
        self.ask(&["show", "route"], "show ip route bgp")
    }

    /// The next hops the router has for `prefix` (from BGP), as its
    /// daemon shows them: empty when it has no route.
    pub fn next_hops(&self, prefix: &str) -> Result<Vec<Ipv4Addr>> {
        let text = if self.daemon == "bird" {
            match self.ask(&["show", "route", prefix], "") {
                Ok(t) => t,
                // birdc fails a query for a prefix it has no route to.
                Err(e) if format!("{e}").contains("Network not found") => String::new(),
                Err(e) => return Err(e),
            }
        } else {
            let t = self.ask(&[], &format!("show ip route {prefix}"))?;
            if t.contains("Network not in table") {
                String::new()
            } else {
                t
            }
        };
        // BIRD: "via 172.21.0.11 on n0"; FRR: "* 172.21.0.11, via n0".
        let mut hops: Vec<Ipv4Addr> = text
            .split_whitespace()
            .collect::<Vec<_>>()
            .windows(2)
            .filter_map(|w| match (w[0], w[1]) {
                ("via", addr) => addr.parse().ok(),
                (addr, "via") => addr.trim_end_matches(',').parse().ok(),
                _ => None,
            })
            .collect();
        hops.sort();
        hops.dedup();
        Ok(hops)
    }

    /// The router's BGP sessions, as its daemon shows them.
    pub fn sessions(&self) -> Result<String> {
        self.ask(&["show", "protocols"], "show bgp summary")
    }

    /// Takes every session with the nodes down (`false`) or up again.
    pub fn bgp_sessions(&self, up: bool) -> Result<()> {
        if self.daemon == "bird" {
            let verb = if up { "enable" } else { "disable" };
            self.ask(&[verb, "\"node*\""], "")?;
        } else {
            let cmd = if up {
                "configure terminal\nrouter bgp 65000\nno bgp shutdown"
            } else {
                "configure terminal\nrouter bgp 65000\nbgp shutdown"
            };
            self.ask(&[], cmd)?;
        }
        Ok(())
    }

    fn ask(&self, bird: &[&str], vtysh: &str) -> Result<String> {
        let out = if self.daemon == "bird" {
            Command::new("birdc")
                .arg("-s")
                .arg(self.dir.join("bird.ctl"))
                .args(bird)
                .output()?
        } else {
            Command::new("vtysh")
                .arg("--vty_socket")
                .arg(&self.dir)
                .args(["-c", vtysh])
                .output()?
        };
        if !out.status.success() {
            bail!(
                "asking the router: {}{}",
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

fn bird_config(nodes: usize, dir: &Path) -> Result<String> {
    let mut c = String::new();
    writeln!(
        c,
        "log \"{}\" all;\nrouter id 172.21.255.1;\n\
         protocol device {{ scan time 2; }}\n\
         protocol direct {{ ipv4; }}\n\
         protocol kernel {{\n    ipv4 {{ import none; export where source = RTS_BGP; }};\n    merge paths on;\n}}",
        dir.join("bird.log").display()
    )?;
    for i in 0..nodes {
        let ip = node_ip(i)?;
        writeln!(
            c,
            "protocol bgp node{i} {{\n    local {} as {ROUTER_AS};\n    neighbor {ip} as {};\n    \
             connect retry time 2;\n    error wait time 1, 16;\n    \
             ipv4 {{ import all; export where source = RTS_BGP; next hop self; }};\n}}",
            gateway(ip),
            node_as(i)
        )?;
    }
    Ok(c)
}

fn frr_config(nodes: usize) -> Result<String> {
    let mut c = String::from(
        "frr defaults datacenter\nhostname lab-router\n!\nrouter bgp 65000\n bgp router-id 172.21.255.1\n no bgp ebgp-requires-policy\n no bgp network import-check\n",
    );
    for i in 0..nodes {
        writeln!(
            c,
            " neighbor {} remote-as {}\n neighbor {} timers connect 2",
            node_ip(i)?,
            node_as(i),
            node_ip(i)?
        )?;
    }
    c.push_str(" address-family ipv4 unicast\n");
    for i in 0..nodes {
        writeln!(c, "  neighbor {} next-hop-self", node_ip(i)?)?;
    }
    c.push_str(" exit-address-family\n!\n");
    Ok(c)
}

/// Starts the router's daemon in `netns` (configuration, sockets and log
/// under `dir`), peering with `nodes` nodes.
pub fn start_router(netns: &str, daemon: &str, nodes: usize, dir: &Path) -> Result<RouterState> {
    fs::create_dir_all(dir)?;
    let mut pids = Vec::new();
    match daemon {
        "bird" => {
            let conf = dir.join("bird.conf");
            fs::write(&conf, bird_config(nodes, dir)?)?;
            let pid_file = dir.join("bird.pid");
            let out = crate::in_netns(netns, "bird")
                .arg("-c")
                .arg(&conf)
                .arg("-s")
                .arg(dir.join("bird.ctl"))
                .arg("-P")
                .arg(&pid_file)
                .output()
                .context("starting bird (apt-get install bird2)")?;
            if !out.status.success() {
                bail!("bird: {}", String::from_utf8_lossy(&out.stderr).trim());
            }
            pids.push(read_pid(&pid_file)?);
        }
        "frr" => {
            // zebra installs the routes bgpd chose; both daemonize, as the
            // frr user (FRR's vty needs its group), with their
            // configuration, sockets and pid files in `dir`.
            fs::write(dir.join("zebra.conf"), "hostname lab-router\n")?;
            fs::write(dir.join("bgpd.conf"), frr_config(nodes)?)?;
            let status = Command::new("chown")
                .args(["-R", "frr:frr"])
                .arg(dir)
                .status()?;
            if !status.success() {
                bail!("chown frr {}: {status}", dir.display());
            }
            let zsock = dir.join("zserv.api");
            for (bin, extra) in [
                ("/usr/lib/frr/zebra", vec![]),
                ("/usr/lib/frr/bgpd", vec!["-p".to_owned(), "179".to_owned()]),
            ] {
                let name = Path::new(bin)
                    .file_name()
                    .context("name")?
                    .to_string_lossy()
                    .into_owned();
                let pid_file = dir.join(format!("{name}.pid"));
                let mut cmd = crate::in_netns(netns, bin);
                cmd.arg("-d")
                    .arg("-f")
                    .arg(dir.join(format!("{name}.conf")))
                    .arg("-i")
                    .arg(&pid_file)
                    .arg("-z")
                    .arg(&zsock)
                    .arg("--vty_socket")
                    .arg(dir)
                    .args(&extra)
                    .stdout(Stdio::null());
                let out = cmd
                    .output()
                    .with_context(|| format!("starting {bin} (apt-get install frr)"))?;
                if !out.status.success() {
                    bail!("{bin}: {}", String::from_utf8_lossy(&out.stderr).trim());
                }
                pids.push(read_pid(&pid_file)?);
            }
        }
        other => bail!("router {other:?}: bird or frr"),
    }
    Ok(RouterState {
        daemon: daemon.to_owned(),
        pids,
        dir: dir.to_owned(),
    })
}

fn read_pid(file: &Path) -> Result<u32> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok(t) = fs::read_to_string(file)
            && let Ok(pid) = t.trim().parse()
        {
            return Ok(pid);
        }
        if Instant::now() > deadline {
            bail!("no pid in {}", file.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Stops a daemon the lab (or a node's agent) started, by pid, if the
/// process still is `comm`.
pub fn stop_daemon(pid: u32, comms: &[&str]) {
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if !comms.contains(&comm.trim()) {
        return;
    }
    let Ok(pid) = i32::try_from(pid) else { return };
    // SAFETY: plain kill(2) of a process this lab started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline && Path::new(&format!("/proc/{pid}")).exists() {
        std::thread::sleep(Duration::from_millis(20));
    }
    if Path::new(&format!("/proc/{pid}")).exists() {
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}
