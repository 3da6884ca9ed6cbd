//! Services in the lab: Service and EndpointSlice objects published to the
//! agents' source, a server that says which backend answered and whom it
//! saw, and clients that ask it.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

use crate::{Lab, in_netns_thread};

/// A Service object in namespace `default`: `spec` and `status` as the API
/// has them.
pub fn service(name: &str, spec: Value, status: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": spec,
        "status": status,
    })
}

/// An endpoint of a slice: which pod, and its conditions.
#[derive(Clone, Copy, Debug)]
pub struct Ep<'a> {
    pub pod: &'a str,
    pub ready: bool,
    pub terminating: bool,
}

impl<'a> Ep<'a> {
    pub fn ready(pod: &'a str) -> Self {
        Ep {
            pod,
            ready: true,
            terminating: false,
        }
    }
}

impl Lab {
    /// An EndpointSlice `name` of Service `service` with the pods `eps` (as
    /// the endpoint controller writes it: address, node, conditions) and
    /// `ports` (`[{"name": .., "port": .., "protocol": ..}]`).
    pub fn slice(&self, service: &str, name: &str, eps: &[Ep<'_>], ports: Value) -> Value {
        let endpoints: Vec<Value> = eps
            .iter()
            .map(|e| {
                let p = self.pod(e.pod);
                json!({
                    "addresses": [p.ip.to_string()],
                    "nodeName": self.state.nodes[p.node].name,
                    "targetRef": {"kind": "Pod", "namespace": p.namespace, "name": p.name},
                    "conditions": {"ready": e.ready, "serving": e.ready || e.terminating, "terminating": e.terminating},
                })
            })
            .collect();
        json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": "default",
                         "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4",
            "endpoints": endpoints,
            "ports": ports,
        })
    }

    /// Publishes the lab's Services and EndpointSlices (replacing the ones
    /// published before).
    pub fn set_services(&self, services: Vec<Value>, slices: Vec<Value>) -> Result<()> {
        self.publish("services.yaml", "Service", services)?;
        self.publish("endpointslices.yaml", "EndpointSlice", slices)
    }

    /// `dataplane service list -o json` on node `i`.
    pub fn frontends(&self, i: usize) -> Result<Vec<Value>> {
        let text = self.cli(i, &["service", "list", "-o", "json"])?;
        Ok(serde_json::from_str(&text)?)
    }

    /// Waits until node `i` serves `frontend` (`10.96.0.10:80/tcp`,
    /// `*:30080/tcp`) in `scope` with exactly `backends` backends; returns
    /// its row.
    pub fn wait_frontend(
        &self,
        i: usize,
        frontend: &str,
        scope: &str,
        backends: usize,
    ) -> Result<Value> {
        self.wait_frontend_where(i, frontend, scope, &format!("{backends} backends"), |b| {
            b.len() == backends
        })
    }

    /// Waits until node `i` serves `frontend` in `scope` with exactly the
    /// pods `pods` as backends (by address): unlike a count, this cannot be
    /// met by the state before a change that keeps the count.
    pub fn wait_backends(
        &self,
        i: usize,
        frontend: &str,
        scope: &str,
        pods: &[&str],
    ) -> Result<Value> {
        let mut want: Vec<String> = pods.iter().map(|p| self.pod(p).ip.to_string()).collect();
        want.sort();
        self.wait_frontend_where(i, frontend, scope, &format!("backends {pods:?}"), |b| {
            let mut have: Vec<&str> = b
                .iter()
                .filter_map(|v| v.as_str()?.split(':').next())
                .collect();
            have.sort_unstable();
            have == want
        })
    }

    fn wait_frontend_where(
        &self,
        i: usize,
        frontend: &str,
        scope: &str,
        what: &str,
        backends_ok: impl Fn(&[Value]) -> bool,
    ) -> Result<Value> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let rows = self.frontends(i)?;
            if let Some(r) = rows.iter().find(|r| {
                r["frontend"] == frontend
                    && r["scope"] == scope
                    && r["backends"].as_array().is_some_and(|b| backends_ok(b))
            }) {
                return Ok(r.clone());
            }
            if Instant::now() > deadline {
                bail!(
                    "node {i} has no {frontend} ({scope}) with {what}: {rows:#?}\n{}",
                    self.agent_log(i)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Node `i`'s Maglev table for the frontend `frontend` (external
    /// scope), as backend addresses (`ip:port`), read from the pinned maps.
    pub fn maglev_table(&self, i: usize, frontend: &str) -> Result<Vec<String>> {
        use aya::maps::{Array, HashOfMaps, IterableMap as _, Map, MapData};
        use dataplane_common::{MAP_MAGLEV, MapSpec};
        let row = self
            .frontends(i)?
            .into_iter()
            .find(|r| r["frontend"] == frontend && r["scope"] == "external")
            .with_context(|| format!("node {i} has no external {frontend}"))?;
        let id = row["id"].as_u64().context("id")? as u32;
        let backends: std::collections::BTreeMap<u64, String> = self
            .dump(i, "dp_backends")?
            .into_iter()
            .filter_map(|b| {
                let addr = b["backend"].as_str()?;
                Some((b["id"].as_u64()?, addr.rsplit_once('/')?.0.to_owned()))
            })
            .collect();
        let spec = MapSpec::by_name(MAP_MAGLEV).context("contract")?;
        let path = self.state.nodes[i].pin_dir.join(spec.pin_name());
        let outer: HashOfMaps<MapData, u32, Array<MapData, u32>> =
            HashOfMaps::try_from(Map::from_map_data(MapData::from_pin(&path)?)?)?;
        let inner = outer.get(&id, 0)?;
        let mut out = Vec::with_capacity(inner.len() as usize);
        for slot in 0..inner.map().info()?.max_entries() {
            let b = inner.get(&slot, 0)?;
            out.push(
                backends
                    .get(&u64::from(b))
                    .cloned()
                    .with_context(|| format!("slot {slot}: backend {b} is not in dp_backends"))?,
            );
        }
        Ok(out)
    }

    /// Waits until no node serves `frontend` any more.
    pub fn wait_no_frontend(&self, i: usize, frontend: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let rows = self.frontends(i)?;
            if !rows.iter().any(|r| r["frontend"] == frontend) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("node {i} still has {frontend}: {rows:#?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Serves on each of `ports` (TCP and UDP) in `netns` until `stop`: a TCP
/// connection is greeted with `<name> <peer>` and then each line it sends
/// is echoed back as `<name> <line>` (so a long stream keeps saying which
/// backend serves it); a UDP datagram is answered with `<name> <peer>`.
/// Each TCP connection gets a thread. Run it on a thread of its own.
pub fn identity_server(netns: &str, name: &str, ports: &[u16], stop: &AtomicBool) -> Result<()> {
    in_netns_thread(netns, || -> Result<()> {
        let mut tcp = Vec::new();
        let mut udp = Vec::new();
        for p in ports {
            let l = crate::bind_retrying(|| std::net::TcpListener::bind(("0.0.0.0", *p)))
                .with_context(|| format!("binding TCP {p} in {netns}"))?;
            l.set_nonblocking(true)?;
            tcp.push(l);
            let u = crate::bind_retrying(|| UdpSocket::bind(("0.0.0.0", *p)))
                .with_context(|| format!("binding UDP {p} in {netns}"))?;
            u.set_nonblocking(true)?;
            udp.push(u);
        }
        let mut buf = [0u8; 2048];
        std::thread::scope(|s| -> Result<()> {
            while !stop.load(Ordering::Relaxed) {
                let mut idle = true;
                for l in &tcp {
                    while let Ok((conn, peer)) = l.accept() {
                        idle = false;
                        s.spawn(move || serve_tcp(conn, peer, name, stop));
                    }
                }
                for u in &udp {
                    while let Ok((_, from)) = u.recv_from(&mut buf) {
                        idle = false;
                        let _ = u.send_to(format!("{name} {from}").as_bytes(), from);
                    }
                }
                if idle {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            Ok(())
        })
    })?
}

fn serve_tcp(conn: TcpStream, peer: SocketAddr, name: &str, stop: &AtomicBool) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_millis(200)));
    let mut w = match conn.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    if w.write_all(format!("{name} {peer}\n").as_bytes()).is_err() {
        return;
    }
    let mut r = BufReader::new(conn);
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) {
        match r.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) => {
                if w.write_all(format!("{name} {line}").as_bytes()).is_err() {
                    return;
                }
                line.clear();
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

/// Who answered, and whom it saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Who {
    pub name: String,
    pub peer: SocketAddr,
}

fn parse_who(text: &str) -> Result<Who> {
    let (name, peer) = text
        .trim_end()
        .split_once(' ')
        .with_context(|| format!("not an identity line: {text:?}"))?;
    Ok(Who {
        name: name.to_owned(),
        peer: peer.parse()?,
    })
}

/// A TCP socket from `src_port` (0: any).
fn tcp_socket(src_port: u16) -> Result<socket2::Socket> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    if src_port != 0 {
        crate::bind_retrying(|| s.bind(&SocketAddr::from(([0, 0, 0, 0], src_port)).into()))
            .with_context(|| format!("binding source port {src_port}"))?;
    }
    Ok(s)
}

/// Asks the [`identity_server`] at `to` over TCP from `netns` (from
/// `src_port` unless 0) who it is.
pub fn who(netns: &str, to: SocketAddr, src_port: u16) -> Result<Who> {
    in_netns_thread(netns, || -> Result<Who> {
        let s = tcp_socket(src_port)?;
        s.connect_timeout(&to.into(), Duration::from_secs(3))
            .with_context(|| format!("connecting to {to}"))?;
        let mut s: TcpStream = s.into();
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        let mut line = String::new();
        BufReader::new(&mut s).read_line(&mut line)?;
        // Closed with a RST-free shutdown: the flow ends cleanly.
        let _ = s.shutdown(std::net::Shutdown::Both);
        parse_who(&line)
    })?
}

/// `n` new TCP connections from `netns` to `to`, one after the other, each
/// asking who answers.
pub fn who_many(netns: &str, to: SocketAddr, n: usize) -> Result<Vec<Who>> {
    in_netns_thread(netns, || -> Result<Vec<Who>> {
        (0..n)
            .map(|_| {
                let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(3))
                    .with_context(|| format!("connecting to {to}"))?;
                s.set_read_timeout(Some(Duration::from_secs(3)))?;
                let mut line = String::new();
                BufReader::new(&mut s).read_line(&mut line)?;
                parse_who(&line)
            })
            .collect()
    })?
}

/// Asks over UDP (one datagram, retried while a neighbour resolves).
pub fn who_udp(netns: &str, to: SocketAddr, src_port: u16) -> Result<Who> {
    in_netns_thread(netns, || -> Result<Who> {
        let s = crate::bind_retrying(|| UdpSocket::bind(("0.0.0.0", src_port)))?;
        s.set_read_timeout(Some(Duration::from_millis(500)))?;
        let mut buf = [0u8; 512];
        for _ in 0..4 {
            s.send_to(b"who", to)?;
            if let Ok((n, _)) = s.recv_from(&mut buf) {
                return parse_who(&String::from_utf8_lossy(&buf[..n]));
            }
        }
        bail!("no UDP answer from {to}")
    })?
}

/// How a connection attempt ended, and how fast.
#[derive(Debug)]
pub enum Attempt {
    Answered(Who),
    Refused(Duration),
    Failed(String, Duration),
}

/// Connects once (no retries), to see how a refusal looks.
pub fn attempt(netns: &str, to: SocketAddr) -> Result<Attempt> {
    in_netns_thread(netns, || -> Result<Attempt> {
        let started = Instant::now();
        match TcpStream::connect_timeout(&to, Duration::from_secs(3)) {
            Ok(mut s) => {
                s.set_read_timeout(Some(Duration::from_secs(3)))?;
                let mut line = String::new();
                BufReader::new(&mut s).read_line(&mut line)?;
                Ok(Attempt::Answered(parse_who(&line)?))
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                Ok(Attempt::Refused(started.elapsed()))
            }
            Err(e) => Ok(Attempt::Failed(e.to_string(), started.elapsed())),
        }
    })?
}

/// A long-lived TCP stream to an [`identity_server`]: each `ask` sends a
/// line and reads which backend echoed it.
pub struct Stream {
    s: TcpStream,
    r: BufReader<TcpStream>,
    pub first: Who,
}

impl Stream {
    /// Opens it from the current thread's network namespace (use inside
    /// [`in_netns_thread`]).
    pub fn open(to: SocketAddr) -> Result<Stream> {
        let s = TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        let mut r = BufReader::new(s.try_clone()?);
        let mut line = String::new();
        r.read_line(&mut line)?;
        Ok(Stream {
            first: parse_who(&line)?,
            s,
            r,
        })
    }

    /// Sends `msg` and returns the name of the backend that echoed it.
    pub fn ask(&mut self, msg: &str) -> Result<String> {
        self.s.write_all(format!("{msg}\n").as_bytes())?;
        let mut line = String::new();
        self.r.read_line(&mut line)?;
        let (name, rest) = line
            .trim_end()
            .split_once(' ')
            .with_context(|| format!("bad echo {line:?}"))?;
        if rest != msg {
            bail!("echo {rest:?} for {msg:?}");
        }
        Ok(name.to_owned())
    }
}
