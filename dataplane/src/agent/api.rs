//! The local API: newline-delimited JSON over a Unix socket (see
//! `dataplane_common::api`). Endpoint adds and deletes run one at a time,
//! their slow part (attaching programs) on a blocking thread, so neither a
//! burst of CNI ADDs nor a slow attach holds up the reconciler.

use std::{path::Path, sync::Arc, time::Instant};

use anyhow::{Context as _, Result, bail};
use dataplane_common::api::{AgentStatus, EndpointStatus, Request, Response};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
};
use tracing::{debug, warn};

use super::{Agent, endpoints, lock};
use crate::telemetry;

/// How long a `sync` waits for the reconciler.
const SYNC_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

pub(super) fn bind(socket: &Path) -> Result<UnixListener> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::remove_file(socket) {
        Ok(()) => debug!("removed stale socket {}", socket.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e).with_context(|| format!("removing stale {}", socket.display()));
        }
    }
    UnixListener::bind(socket).with_context(|| format!("binding {}", socket.display()))
}

pub(super) async fn serve(stream: UnixStream, agent: Arc<Agent>) -> Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read).read_line(&mut line).await?;
    let response = match serde_json::from_str::<Request>(&line) {
        Ok(request) => handle(&agent, request).await,
        Err(e) => Response::Error {
            message: format!("malformed request: {e}"),
        },
    };
    let mut out = serde_json::to_string(&response)?;
    out.push('\n');
    write.write_all(out.as_bytes()).await?;
    Ok(())
}

async fn handle(agent: &Arc<Agent>, request: Request) -> Response {
    let started = Instant::now();
    let changes = matches!(
        request,
        Request::EndpointAdd(_) | Request::EndpointDel { .. }
    );
    let response = match handle_request(agent, request).await {
        Ok(r) => r,
        Err(e) if e.downcast_ref::<endpoints::NotReady>().is_some() => Response::NotReady {
            message: format!("{e:#}"),
        },
        Err(e) => Response::Error {
            message: format!("{e:#}"),
        },
    };
    if changes {
        telemetry::reconciled(&agent.telemetry, "endpoint", started.elapsed());
    }
    match &response {
        Response::Error { message } => {
            telemetry::error(&agent.telemetry, "api_request");
            warn!("API request refused: {message}");
        }
        Response::NotReady { message } => debug!("API request deferred: {message}"),
        _ => {}
    }
    response
}

async fn handle_request(agent: &Arc<Agent>, request: Request) -> Result<Response> {
    Ok(match request {
        Request::Status => {
            let ready = agent.update_ready()?;
            // From the kernel each time: an operator may have detached it.
            let xdp = match super::network::xdp_mode(agent).await {
                Ok(mode) => mode.to_owned(),
                Err(e) => format!("unknown ({e:#})"),
            };
            // One lock at a time: an attach in progress holds the programs.
            let attach_mode = lock(&agent.datapath)?.mode().name().to_owned();
            let endpoints = lock(&agent.registry)?.len();
            let st = lock(&agent.status)?;
            Response::Status(Box::new(AgentStatus {
                node: agent.node.clone(),
                version: env!("CARGO_PKG_VERSION").to_owned(),
                attach_mode,
                pin_dir: agent.pin_dir.display().to_string(),
                endpoints,
                pod_cidr: st.own_cidr.map(|c| c.to_string()),
                pod_mtu: agent.pod_mtu,
                mode: agent.net.mode.name().to_owned(),
                node_ip: agent.net.node_ip.to_string(),
                nodes: st.nodes,
                ready,
                xdp,
                cgroup: agent.cgroup.as_ref().map(|c| c.display().to_string()),
                frontends: st.frontends,
                backends: st.backends,
                frontends_empty: st.frontends_empty,
                masquerade: agent.net.masquerade,
            }))
        }
        Request::Bgp => {
            let Some(bgp) = &agent.bgp else {
                bail!("BGP is off on this node (--bgp on starts it)");
            };
            let reader = bgp.reader();
            tokio::task::spawn_blocking(move || -> Result<Response> {
                Ok(Response::Bgp(Box::new(reader.status()?)))
            })
            .await
            .context("bgp worker")??
        }
        Request::EndpointAdd(spec) => {
            let _one = agent.api_lock.lock().await;
            endpoints::add(agent, spec).await?;
            Response::Ok
        }
        Request::EndpointDel { container_id } => {
            let _one = agent.api_lock.lock().await;
            let a = agent.clone();
            tokio::task::spawn_blocking(move || endpoints::remove(&a, &container_id))
                .await
                .context("endpoint worker")??;
            endpoints::save_registry(agent)?;
            Response::Ok
        }
        Request::CtFlush => {
            let a = agent.clone();
            let removed = tokio::task::spawn_blocking(move || super::services::flush(&a))
                .await
                .context("conntrack worker")??;
            Response::Flushed { removed }
        }
        Request::NatFlush => {
            let a = agent.clone();
            let removed = tokio::task::spawn_blocking(move || super::services::flush_nat(&a))
                .await
                .context("conntrack worker")??;
            Response::Flushed { removed }
        }
        Request::Prefilter { add, delete } => {
            let mut pf = super::lock(&agent.prefilter)?;
            let mut want = pf.1.clone();
            // All or nothing: one bad prefix changes nothing.
            for c in &add {
                want.insert(crate::maps::prefilter::parse_cidr(c)?);
            }
            for c in &delete {
                want.remove(&crate::maps::prefilter::parse_cidr(c)?);
            }
            let (added, removed) = pf.0.set(&want)?;
            pf.1 = want;
            tracing::info!(added, removed, total = pf.1.len(), "prefilter changed");
            Response::Prefilter {
                cidrs: pf.1.iter().map(ToString::to_string).collect(),
            }
        }
        Request::PolicyGet { namespace, name } => {
            Response::Policy(Box::new(super::policy::view(agent, &namespace, &name)?))
        }
        Request::Sync => {
            let n = agent
                .barrier_seq
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
                + 1;
            let mut passed = agent.barrier_passed.subscribe();
            agent
                .barrier_requests
                .send(n)
                .map_err(|_| anyhow::anyhow!("the cluster source has stopped"))?;
            tokio::time::timeout(SYNC_WAIT, passed.wait_for(|p| *p >= n))
                .await
                .map_err(|_| {
                    anyhow::anyhow!(
                        "the cluster state was not applied within {} s (is the state complete? see the agent's log)",
                        SYNC_WAIT.as_secs()
                    )
                })?
                .context("reconciler")?;
            Response::Ok
        }
        Request::Resolve { name } => {
            let d = lock(&agent.directory)?;
            let ips = match name.strip_prefix("svc/") {
                Some(svc) => {
                    let (ns, n) = svc.split_once('/').ok_or_else(|| {
                        anyhow::anyhow!("{name:?}: expected svc/<namespace>/<name>")
                    })?;
                    d.services.get(&(ns.to_owned(), n.to_owned())).cloned()
                }
                None => {
                    let (ns, n) = name.split_once('/').unwrap_or(("default", name.as_str()));
                    d.pods.get(&(ns.to_owned(), n.to_owned())).cloned()
                }
            };
            match ips {
                Some(ips) if !ips.is_empty() => Response::Addresses { ips },
                Some(_) => anyhow::bail!("{name} has no address yet"),
                None => anyhow::bail!("the agent knows no {name}"),
            }
        }
        Request::Identities => Response::Identities {
            identities: super::policy::identities(agent)?,
        },
        Request::EndpointList => {
            let mut endpoints: Vec<_> = lock(&agent.registry)?
                .values()
                .map(|e| EndpointStatus {
                    spec: e.spec.clone(),
                    ifindex: e.ifindex,
                })
                .collect();
            endpoints.sort_by(|a, b| a.spec.container_id.cmp(&b.spec.container_id));
            Response::Endpoints { endpoints }
        }
    })
}
