//! A Kubernetes API server for tests: enough of the real list/watch HTTP
//! protocol for kube-rs watchers, with the failure modes a real one has.
//!
//! - `GET <collection>`: a List with `metadata.resourceVersion`.
//! - `GET <collection>?watch=true&resourceVersion=N`: a chunked stream of
//!   watch events after N, BOOKMARKs every `bookmark_every` when asked for,
//!   and an ERROR event with a 410 Status when N is older than the
//!   compaction point (the client must relist).
//! - Test controls: change objects, drop every open watch, compact, go down
//!   (connections closed without an answer) and come back.
//! - Optionally what a real one checks before any of that: HTTPS with a
//!   certificate from its own CA, a bearer token (401 otherwise), and RBAC
//!   rules (403 for a verb on a resource they do not grant). Every request
//!   is recorded as the (verb, group, resource) RBAC judges it by.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Read, Write},
    net::{IpAddr, SocketAddr, TcpListener},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use serde_json::{Value, json};

/// (collection path, List kind, item kind, apiVersion)
const RESOURCES: &[(&str, &str, &str, &str)] = &[
    ("/api/v1/nodes", "NodeList", "Node", "v1"),
    ("/api/v1/namespaces", "NamespaceList", "Namespace", "v1"),
    ("/api/v1/pods", "PodList", "Pod", "v1"),
    ("/api/v1/services", "ServiceList", "Service", "v1"),
    (
        "/apis/discovery.k8s.io/v1/endpointslices",
        "EndpointSliceList",
        "EndpointSlice",
        "discovery.k8s.io/v1",
    ),
    (
        "/apis/networking.k8s.io/v1/networkpolicies",
        "NetworkPolicyList",
        "NetworkPolicy",
        "networking.k8s.io/v1",
    ),
];

/// (API group, resource, verbs) as a ClusterRole's rules grant them.
pub type Rule = (String, String, Vec<String>);

/// What the server checks before it answers.
#[derive(Default)]
pub struct Security {
    pub tls: Option<Tls>,
    /// The bearer token a request must carry.
    pub token: Option<String>,
    /// RBAC: what requests may do (None: anything).
    pub rules: Option<Vec<Rule>>,
}

/// A CA and a serving certificate it signed, for the server's address.
pub struct Tls {
    /// The CA certificate clients trust (the service account's `ca.crt`).
    pub ca_pem: String,
    config: Arc<rustls::ServerConfig>,
}

impl Tls {
    pub fn generate(ip: IpAddr) -> Result<Tls> {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "dataplane lab CA");
        let ca = ca.self_signed(&ca_key)?;
        let key = KeyPair::generate()?;
        let mut leaf = CertificateParams::new(vec![ip.to_string()])?;
        leaf.distinguished_name
            .push(DnType::CommonName, "kube-apiserver");
        let leaf = leaf.signed_by(&key, &ca, &ca_key)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone(), ca.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )?;
        Ok(Tls {
            ca_pem: ca.pem(),
            config: Arc::new(config),
        })
    }
}

/// One request as RBAC sees it, and the status it got.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Access {
    pub verb: String,
    pub group: String,
    pub resource: String,
    pub code: u16,
}

/// Reads the rules of a ClusterRole manifest (the first ClusterRole in a
/// multi-document YAML file).
pub fn cluster_role_rules(yaml: &str) -> Result<Vec<Rule>> {
    for doc in serde_yaml_ng::Deserializer::from_str(yaml) {
        let v = <Value as serde::Deserialize>::deserialize(doc)?;
        if v["kind"] != "ClusterRole" {
            continue;
        }
        let strs = |v: &Value| -> Vec<String> {
            v.as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default()
        };
        let mut rules = Vec::new();
        for rule in v["rules"].as_array().context("ClusterRole without rules")? {
            for g in strs(&rule["apiGroups"]) {
                for r in strs(&rule["resources"]) {
                    rules.push((g.clone(), r, strs(&rule["verbs"])));
                }
            }
        }
        return Ok(rules);
    }
    anyhow::bail!("no ClusterRole")
}

/// The (verb, group, resource) of a request, as the API server's request
/// info resolves it for the paths served here.
fn access_of(method: &str, path: &str, watching: bool) -> (String, String, String) {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match parts.as_slice() {
        ["api", _version, rest @ ..] => (String::new(), rest),
        ["apis", group, _version, rest @ ..] => ((*group).to_owned(), rest),
        _ => (String::new(), &[][..]),
    };
    let named = rest.len() > 1;
    let resource = rest.first().copied().unwrap_or_default().to_owned();
    let verb = match (method, watching, named) {
        ("GET", true, _) => "watch",
        ("GET", false, false) => "list",
        ("GET", false, true) => "get",
        ("POST", ..) => "create",
        ("PUT", ..) => "update",
        ("PATCH", ..) => "patch",
        ("DELETE", ..) => "delete",
        _ => "unknown",
    };
    (verb.to_owned(), group, resource)
}

struct Event {
    rv: u64,
    path: &'static str,
    kind: &'static str,
    object: Value,
}

#[derive(Default)]
struct State {
    rv: u64,
    /// (collection, namespace, name) -> object
    objects: BTreeMap<(&'static str, String, String), Value>,
    events: Vec<Event>,
    /// Watches from before this resourceVersion get 410 Gone.
    compacted: u64,
    /// Bumped to end every open watch.
    generation: u64,
    down: bool,
    requests: Vec<String>,
    /// The resourceVersion of every BOOKMARK sent.
    bookmarks: Vec<u64>,
    token: Option<String>,
    rules: Option<Vec<Rule>>,
    access: Vec<Access>,
}

pub struct ApiServer {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn resource_of(
    item_kind: &str,
) -> Option<&'static (&'static str, &'static str, &'static str, &'static str)> {
    RESOURCES.iter().find(|r| r.2 == item_kind)
}

impl ApiServer {
    /// Listens on `addr` in `netns` (by `ip netns` name), plain HTTP and
    /// open to anyone.
    pub fn start(netns: &str, addr: SocketAddr) -> Result<ApiServer> {
        Self::start_with(netns, addr, Security::default())
    }

    /// As [`ApiServer::start`], checking what `security` asks.
    pub fn start_with(netns: &str, addr: SocketAddr, security: Security) -> Result<ApiServer> {
        let file = crate::netns_file(netns)?;
        let tls = security.tls.map(|t| t.config);
        let state = Arc::new(Mutex::new(State {
            rv: 1,
            token: security.token,
            rules: security.rules,
            ..State::default()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (st, sp) = (state.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            // This thread stays in the netns.
            if let Err(e) = crate::enter_netns(&file) {
                let _ = ready_tx.send(Err(e));
                return;
            }
            let listener = match TcpListener::bind(addr) {
                Ok(l) => l,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let _ = listener.set_nonblocking(true);
            let _ = ready_tx.send(Ok(()));
            while !sp.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let (st, sp, tls) = (st.clone(), sp.clone(), tls.clone());
                        std::thread::spawn(move || {
                            let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
                            match tls {
                                Some(cfg) => {
                                    if let Ok(server) = rustls::ServerConnection::new(cfg) {
                                        let _ =
                                            serve(rustls::StreamOwned::new(server, conn), &st, &sp);
                                    }
                                }
                                None => {
                                    let _ = serve(conn, &st, &sp);
                                }
                            }
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        ready_rx.recv().context("API server thread")??;
        Ok(ApiServer {
            addr,
            state,
            stop,
            thread: Some(thread),
        })
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut st)
    }

    /// Creates or replaces an object (its `kind` picks the collection).
    pub fn apply(&self, mut object: Value) -> Result<()> {
        let kind = object["kind"]
            .as_str()
            .context("object without kind")?
            .to_owned();
        let (path, _, item_kind, api) =
            *resource_of(&kind).with_context(|| format!("unknown kind {kind}"))?;
        let ns = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let name = object["metadata"]["name"]
            .as_str()
            .context("object without name")?
            .to_owned();
        object["apiVersion"] = api.into();
        self.with(|st| {
            st.rv += 1;
            object["metadata"]["resourceVersion"] = st.rv.to_string().into();
            let key = (path, ns, name);
            let kind = if st.objects.contains_key(&key) {
                "MODIFIED"
            } else {
                "ADDED"
            };
            st.objects.insert(key, object.clone());
            let rv = st.rv;
            st.events.push(Event {
                rv,
                path,
                kind,
                object,
            });
            let _ = item_kind;
        });
        Ok(())
    }

    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> Result<()> {
        let (path, ..) = *resource_of(kind).with_context(|| format!("unknown kind {kind}"))?;
        self.with(|st| {
            if let Some(mut object) =
                st.objects
                    .remove(&(path, namespace.to_owned(), name.to_owned()))
            {
                st.rv += 1;
                object["metadata"]["resourceVersion"] = st.rv.to_string().into();
                let rv = st.rv;
                st.events.push(Event {
                    rv,
                    path,
                    kind: "DELETED",
                    object,
                });
            }
        });
        Ok(())
    }

    /// Ends every open watch, as a load balancer or API server restart does.
    pub fn drop_watches(&self) {
        self.with(|st| st.generation += 1);
    }

    /// Forgets history: watches resuming from before now get 410 Gone.
    pub fn compact(&self) {
        self.with(|st| {
            st.rv += 1;
            st.compacted = st.rv;
            st.generation += 1;
        });
    }

    /// Down: every connection is closed without an answer.
    pub fn set_down(&self, down: bool) {
        self.with(|st| {
            st.down = down;
            st.generation += 1;
        });
    }

    /// Request lines received so far (`GET /api/v1/pods?watch=true&...`).
    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.with(|st| st.rv)
    }

    /// How many BOOKMARKs carried a resourceVersion of at least `rv`.
    pub fn bookmarks_since(&self, rv: u64) -> usize {
        self.with(|st| st.bookmarks.iter().filter(|b| **b >= rv).count())
    }

    pub fn requests(&self) -> Vec<String> {
        self.with(|st| st.requests.clone())
    }

    /// Every request as RBAC judged it, with its status code.
    pub fn access(&self) -> Vec<Access> {
        self.with(|st| st.access.clone())
    }

    /// The RBAC rules from now on (None: anything goes).
    pub fn set_rules(&self, rules: Option<Vec<Rule>>) {
        self.with(|st| st.rules = rules);
    }

    /// The bearer token requests must carry from now on (open watches go
    /// on, as a real server's do until they end).
    pub fn set_token(&self, token: Option<String>) {
        self.with(|st| st.token = token);
    }

    /// A kubeconfig pointing at this server.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: lab\n  cluster:\n    server: http://{}\ncontexts:\n- name: lab\n  context:\n    cluster: lab\n    user: lab\ncurrent-context: lab\nusers:\n- name: lab\n  user: {{}}\n",
            self.addr
        )
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.drop_watches();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn query(target: &str) -> (String, BTreeMap<String, String>) {
    let (path, q) = target.split_once('?').unwrap_or((target, ""));
    let params = q
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    (path.to_owned(), params)
}

fn respond(conn: &mut impl Write, code: &str, body: &Value) -> std::io::Result<()> {
    let body = body.to_string();
    write!(
        conn,
        "HTTP/1.1 {code}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    conn.flush()
}

fn chunk(conn: &mut impl Write, value: &Value) -> std::io::Result<()> {
    let line = format!("{value}\n");
    write!(conn, "{:x}\r\n{line}\r\n", line.len())?;
    conn.flush()
}

fn failure(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn serve<S: Read + Write>(
    stream: S,
    state: &Mutex<State>,
    stop: &AtomicBool,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut bearer = None;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
                break;
            }
            if let Some((name, value)) = h.split_once(':')
                && name.eq_ignore_ascii_case("authorization")
            {
                bearer = value.trim().strip_prefix("Bearer ").map(str::to_owned);
            }
        }
        let conn = reader.get_mut();
        let request = line.trim().to_owned();
        let lock = || state.lock().unwrap_or_else(|p| p.into_inner());
        {
            let mut st = lock();
            st.requests.push(request.clone());
            if st.down {
                return Ok(()); // closed without an answer
            }
        }
        let target = request.split_whitespace().nth(1).unwrap_or("/").to_owned();
        let (path, params) = query(&target);
        let watching = matches!(params.get("watch").map(String::as_str), Some("true" | "1"));
        let method = request.split_whitespace().next().unwrap_or("GET");
        let (verb, group, resource) = access_of(method, &path, watching);
        let denied = {
            let mut st = lock();
            let denied = if st.token.is_some() && bearer != st.token {
                Some((
                    401,
                    "401 Unauthorized",
                    failure(401, "Unauthorized", "Unauthorized"),
                ))
            } else if let Some(rules) = &st.rules
                && !rules
                    .iter()
                    .any(|(g, r, verbs)| *g == group && *r == resource && verbs.contains(&verb))
            {
                let message = format!(
                    "{resource} is forbidden: User \"system:serviceaccount:dataplane-system:dataplane\" cannot {verb} resource \"{resource}\" in API group \"{group}\" at the cluster scope"
                );
                Some((403, "403 Forbidden", failure(403, "Forbidden", &message)))
            } else {
                None
            };
            st.access.push(Access {
                verb: verb.clone(),
                group: group.clone(),
                resource: resource.clone(),
                code: denied.as_ref().map_or(200, |d| d.0),
            });
            denied
        };
        if let Some((_, status, body)) = denied {
            respond(conn, status, &body)?;
            continue;
        }
        let Some(&(path, list_kind, item_kind, api)) = RESOURCES.iter().find(|r| r.0 == path)
        else {
            respond(
                conn,
                "404 Not Found",
                &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404}),
            )?;
            continue;
        };
        if !watching {
            let st = lock();
            let items: Vec<Value> = st
                .objects
                .iter()
                .filter(|(k, _)| k.0 == path)
                .map(|(_, v)| v.clone())
                .collect();
            let body = json!({"kind": list_kind, "apiVersion": api, "metadata": {"resourceVersion": st.rv.to_string()}, "items": items});
            drop(st);
            respond(conn, "200 OK", &body)?;
            continue;
        }
        let mut from: u64 = params
            .get("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let bookmarks = params
            .get("allowWatchBookmarks")
            .is_some_and(|v| v == "true");
        let timeout = params
            .get("timeoutSeconds")
            .and_then(|v| v.parse().ok())
            .unwrap_or(300u64);
        write!(
            conn,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )?;
        let (generation, compacted) = {
            let st = lock();
            (st.generation, st.compacted)
        };
        if from < compacted {
            chunk(
                conn,
                &json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {},
                "status": "Failure", "message": format!("too old resource version: {from} ({compacted})"), "reason": "Expired", "code": 410}}),
            )?;
            write!(conn, "0\r\n\r\n")?;
            return Ok(());
        }
        let started = Instant::now();
        let mut last_bookmark = Instant::now();
        loop {
            let (events, now_rv, ended): (Vec<Value>, u64, bool) = {
                let st = lock();
                let events = st
                    .events
                    .iter()
                    .filter(|e| e.path == path && e.rv > from)
                    .map(|e| json!({"type": e.kind, "object": e.object}))
                    .collect();
                (events, st.rv, st.generation != generation || st.down)
            };
            if ended || stop.load(Ordering::Relaxed) {
                // End the stream mid-flight, like a dropped connection.
                return Ok(());
            }
            for e in events {
                chunk(conn, &e)?;
            }
            from = now_rv.max(from);
            if bookmarks && last_bookmark.elapsed() > Duration::from_millis(500) {
                chunk(
                    conn,
                    &json!({"type": "BOOKMARK", "object": {"kind": item_kind, "apiVersion": api, "metadata": {"resourceVersion": from.to_string()}}}),
                )?;
                lock().bookmarks.push(from);
                last_bookmark = Instant::now();
            }
            if started.elapsed() > Duration::from_secs(timeout) {
                write!(conn, "0\r\n\r\n")?;
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
