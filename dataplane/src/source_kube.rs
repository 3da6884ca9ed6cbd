//! The Kubernetes API source: one kube-rs watcher per kind (list, then
//! watch from the list's resourceVersion, with bookmarks; a relist on 410
//! Gone and a backoff on errors are the watcher's), each converting objects
//! straight into the model so full objects are never held.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Debug,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use futures_util::StreamExt as _;
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod, Service},
    discovery::v1::EndpointSlice,
    networking::v1::NetworkPolicy,
};
use kube::{
    Api, Client, Resource,
    runtime::{WatchStreamExt as _, watcher},
};
use serde::{Serialize, de::DeserializeOwned};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::{
    cluster::{self, Key, Kind, Object, Update},
    telemetry,
};

pub async fn client(
    kubeconfig: Option<&PathBuf>,
    api_server: Option<&str>,
    service_account: &Path,
) -> Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("--kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("--kubeconfig {}", path.display()))?
        }
        None if api_server.is_some() || std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() => {
            in_cluster(api_server, service_account)?
        }
        None => kube::Config::infer()
            .await
            .context("not in a cluster (no KUBERNETES_SERVICE_HOST) and no kubeconfig")?,
    };
    Ok(Client::try_from(config)?)
}

/// The in-cluster config, as kube's own but with the service account's
/// directory a setting (tests point it at their own token and CA).
pub fn in_cluster(api_server: Option<&str>, dir: &Path) -> Result<kube::Config> {
    let authority = match api_server {
        Some(a) => a.to_owned(),
        None => {
            let host =
                std::env::var("KUBERNETES_SERVICE_HOST").context("KUBERNETES_SERVICE_HOST")?;
            let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
            if host.contains(':') {
                format!("[{host}]:{port}")
            } else {
                format!("{host}:{port}")
            }
        }
    };
    let url: http::Uri = format!("https://{authority}")
        .parse()
        .with_context(|| format!("API server address {authority:?}"))?;
    let ca_file = dir.join("ca.crt");
    let ca = std::fs::read(&ca_file)
        .with_context(|| format!("the service account's CA {}", ca_file.display()))?;
    let certs: Vec<Vec<u8>> = pem::parse_many(&ca)
        .with_context(|| format!("{}: not PEM", ca_file.display()))?
        .into_iter()
        .filter(|p| p.tag() == "CERTIFICATE")
        .map(pem::Pem::into_contents)
        .collect();
    if certs.is_empty() {
        anyhow::bail!("{}: no certificate in it", ca_file.display());
    }
    let token = dir.join("token");
    // Read once here for a clear error; kube rereads the file as it goes.
    std::fs::metadata(&token)
        .with_context(|| format!("the service account's token {}", token.display()))?;
    let mut config = kube::Config::new(url);
    config.root_cert = Some(certs);
    config.root_cert_file = Some(ca_file);
    config.auth_info.token_file = Some(token.to_string_lossy().into_owned());
    if let Ok(ns) = std::fs::read_to_string(dir.join("namespace")) {
        config.default_namespace = ns.trim().to_owned();
    }
    Ok(config)
}

/// A watched kind: the model's kind, the API resource and how the agent
/// starts its watcher. `WATCHED` is the one list: the watchers started
/// and the RBAC rules the deploy manifests must grant both come from it.
pub struct Watched {
    pub kind: Kind,
    /// API group (`""` for the core group) and resource (plural).
    pub group: fn() -> String,
    pub resource: fn() -> String,
    start: fn(Client, Kind, mpsc::Sender<Update>, telemetry::Shared),
}

/// What a kube-rs watcher asks of the API server: a list, then watches.
pub const WATCH_VERBS: &[&str] = &["list", "watch"];

fn start<K>(c: Client, kind: Kind, tx: mpsc::Sender<Update>, t: telemetry::Shared)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Serialize + Debug + Send + 'static,
{
    tokio::spawn(async move { watch_kind::<K>(c, kind, tx, t).await });
}

macro_rules! watched {
    ($($ty:ty => $kind:expr),* $(,)?) => {
        &[$(Watched {
            kind: $kind,
            group: || <$ty as Resource>::group(&()).into_owned(),
            resource: || <$ty as Resource>::plural(&()).into_owned(),
            start: start::<$ty>,
        }),*]
    };
}

pub const WATCHED: &[Watched] = watched![
    Node => Kind::Node,
    Namespace => Kind::Namespace,
    Pod => Kind::Pod,
    Service => Kind::Service,
    EndpointSlice => Kind::EndpointSlice,
    NetworkPolicy => Kind::NetworkPolicy,
];

/// The RBAC rules the agent needs: (API group, resource, verbs), sorted.
pub fn rbac_rules() -> Vec<(String, String, Vec<String>)> {
    let mut rules: Vec<_> = WATCHED
        .iter()
        .map(|w| {
            (
                (w.group)(),
                (w.resource)(),
                WATCH_VERBS.iter().map(|v| (*v).to_owned()).collect(),
            )
        })
        .collect();
    rules.sort();
    rules
}

/// A watch error in an operator's words: a refused token or a missing
/// RBAC grant says what to check.
fn explain_watch_error(kind: Kind, e: &watcher::Error) -> String {
    let status = match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => Some(s.code),
        watcher::Error::WatchError(s) => Some(s.code),
        _ => None,
    };
    let resource = WATCHED
        .iter()
        .find(|w| w.kind == kind)
        .map(|w| (w.resource)())
        .unwrap_or_default();
    match status {
        Some(401) => format!(
            "the API server refused the agent's credentials (401 Unauthorized): check the service account token (--service-account-dir) or the kubeconfig; retrying: {e}"
        ),
        Some(403) => format!(
            "the API server forbids listing or watching {resource} (403 Forbidden): the ClusterRole must grant list and watch on it (deploy/base/rbac.yaml); retrying: {e}"
        ),
        _ => format!("{e}; retrying"),
    }
}

/// Converts one object; an invalid one is logged and, if its key is known,
/// its last good version (in `current`) stays.
fn convert<K: Serialize>(
    kind: Kind,
    obj: &K,
    current: &BTreeMap<Key, Object>,
    t: &telemetry::Shared,
) -> Option<(Key, Object)> {
    let value = serde_json::to_value(obj).ok()?;
    match cluster::convert(kind, value) {
        Ok(o) => Some(o),
        Err(inv) => {
            telemetry::error(t, "object_invalid");
            let kept = inv
                .key
                .as_ref()
                .and_then(|k| current.get(k).map(|o| (k.clone(), o.clone())));
            warn!(
                "{inv}; {}",
                if kept.is_some() {
                    "keeping its last good version"
                } else {
                    "skipped"
                }
            );
            kept
        }
    }
}

async fn watch_kind<K>(client: Client, kind: Kind, tx: mpsc::Sender<Update>, t: telemetry::Shared)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Serialize + Debug + Send + 'static,
{
    let api: Api<K> = Api::all(client);
    let mut stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut current: BTreeMap<Key, Object> = BTreeMap::new();
    let mut listing: Option<BTreeMap<Key, Object>> = None;
    while let Some(event) = stream.next().await {
        let update = match event {
            Ok(watcher::Event::Init) => {
                listing = Some(BTreeMap::new());
                None
            }
            Ok(watcher::Event::InitApply(obj)) => {
                if let Some((k, o)) = convert(kind, &obj, &current, &t) {
                    listing.get_or_insert_with(BTreeMap::new).insert(k, o);
                }
                None
            }
            Ok(watcher::Event::InitDone) => {
                current = listing.take().unwrap_or_default();
                info!(kind = kind.name(), objects = current.len(), "listed");
                Some(Update::Replace(
                    kind,
                    current
                        .iter()
                        .map(|(k, o)| (k.clone(), o.clone()))
                        .collect(),
                ))
            }
            Ok(watcher::Event::Apply(obj)) => convert(kind, &obj, &current, &t).map(|(k, o)| {
                current.insert(k.clone(), o.clone());
                Update::Upsert(k, o)
            }),
            Ok(watcher::Event::Delete(obj)) => {
                let value = serde_json::to_value(&obj).unwrap_or_default();
                cluster::convert(kind, value).ok().map(|(k, _)| {
                    current.remove(&k);
                    Update::Delete(k)
                })
            }
            Err(e) => {
                // The backoff retries; the datapath keeps what it has.
                telemetry::error(&t, "kube_watch");
                warn!(
                    kind = kind.name(),
                    "watch: {}",
                    explain_watch_error(kind, &e)
                );
                None
            }
        };
        if let Some(u) = update
            && tx.send(u).await.is_err()
        {
            return;
        }
    }
}

/// Runs the watchers and forwards their changes; `Synced` follows once
/// every kind has been listed.
pub async fn run(client: Client, tx: mpsc::Sender<Update>, t: telemetry::Shared) {
    let (utx, mut urx) = mpsc::channel(1024);
    for w in WATCHED {
        (w.start)(client.clone(), w.kind, utx.clone(), t.clone());
    }
    drop(utx);

    let mut listed: BTreeSet<Kind> = BTreeSet::new();
    let mut synced = false;
    while let Some(u) = urx.recv().await {
        if let Update::Replace(kind, _) = &u {
            listed.insert(*kind);
        }
        if tx.send(u).await.is_err() {
            return;
        }
        if !synced && listed.len() == WATCHED.len() {
            synced = true;
            if tx.send(Update::Synced).await.is_err() {
                return;
            }
        }
    }
}
