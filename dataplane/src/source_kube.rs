//! The Kubernetes API source: one kube-rs watcher per kind (list, then
//! watch from the list's resourceVersion, with bookmarks; a relist on 410
//! Gone and a backoff on errors are the watcher's), each converting objects
//! straight into the model so full objects are never held.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Debug,
    path::PathBuf,
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

pub async fn client(kubeconfig: Option<&PathBuf>) -> Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("--kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("--kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("no in-cluster config and no kubeconfig")?,
    };
    Ok(Client::try_from(config)?)
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
                warn!(kind = kind.name(), "watch: {e}");
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
    macro_rules! spawn {
        ($ty:ty, $kind:expr) => {{
            let (c, u, t) = (client.clone(), utx.clone(), t.clone());
            tokio::spawn(async move { watch_kind::<$ty>(c, $kind, u, t).await });
        }};
    }
    spawn!(Node, Kind::Node);
    spawn!(Namespace, Kind::Namespace);
    spawn!(Pod, Kind::Pod);
    spawn!(Service, Kind::Service);
    spawn!(EndpointSlice, Kind::EndpointSlice);
    spawn!(NetworkPolicy, Kind::NetworkPolicy);
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
        if !synced && listed.len() == Kind::ALL.len() {
            synced = true;
            if tx.send(Update::Synced).await.is_err() {
                return;
            }
        }
    }
}
