//! The Kubernetes source: the real kube-rs client in the agent against a
//! test API server speaking list/watch over HTTP. Needs root.

use std::time::{Duration, Instant};

use lab::{Lab, LabSpec, ping};
use serde_json::{Value, json};

fn kube_lab(nodes: usize, pods: usize) -> Lab {
    let mut spec = LabSpec::new(nodes, pods).expect("spec");
    spec.source = "kube".into();
    Lab::up(&spec).expect("lab")
}

fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn has_endpoint(lab: &Lab, node: usize, ip: &str) -> bool {
    lab.dump(node, "dp_endpoints")
        .expect("dump")
        .iter()
        .any(|r| r["ip"] == ip)
}

fn pod(name: &str, node: &str, ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "web"},
           "spec": {"nodeName": node, "containers": []}, "status": {"podIPs": [{"ip": ip}]}})
}

/// `dataplane_errors_total{kind="kube_watch"}` on node `node` (0 before
/// the first error, or while /metrics does not answer).
fn watch_errors(lab: &Lab, node: usize) -> f64 {
    lab.metric(node, "dataplane_errors_total{kind=\"kube_watch\"}")
        .ok()
        .flatten()
        .unwrap_or(0.0)
}

fn count(requests: &[String], prefix: &str, watch: bool) -> usize {
    requests
        .iter()
        .filter(|r| r.starts_with(&format!("GET {prefix}")) && r.contains("watch=true") == watch)
        .count()
}

#[test]
fn nodes_and_pods_from_the_api_server() {
    let lab = kube_lab(2, 1);
    let (a, c) = (lab.pod("pod-0-0").clone(), lab.pod("pod-1-0").clone());
    // Nodes came through list/watch: pods on the two nodes reach each other.
    assert_eq!(
        ping(&a.netns, &c.ip.to_string(), 3, &[])
            .expect("ping")
            .received,
        3
    );
    wait_for("the remote pod from its Pod object", || {
        has_endpoint(&lab, 0, &c.ip.to_string())
    });

    let api = lab.api.as_ref().expect("api server");
    let requests = api.requests();
    for collection in [
        "/api/v1/nodes",
        "/api/v1/pods",
        "/api/v1/namespaces",
        "/api/v1/services",
        "/apis/discovery.k8s.io/v1/endpointslices",
        "/apis/networking.k8s.io/v1/networkpolicies",
    ] {
        assert!(
            count(&requests, collection, false) >= 2,
            "no list of {collection} per agent: {requests:#?}"
        );
        assert!(
            count(&requests, collection, true) >= 2,
            "no watch of {collection} per agent: {requests:#?}"
        );
    }
    assert!(
        requests
            .iter()
            .any(|r| r.contains("watch=true") && r.contains("allowWatchBookmarks=true")),
        "bookmarks not asked for"
    );

    // A change through the API reaches the maps; a deletion removes it.
    let n1 = lab.state.nodes[1].name.clone();
    api.apply(pod("new", &n1, "10.244.1.66")).expect("apply");
    wait_for("an added Pod", || has_endpoint(&lab, 0, "10.244.1.66"));
    api.delete("Pod", "web", "new").expect("delete");
    wait_for("a deleted Pod", || !has_endpoint(&lab, 0, "10.244.1.66"));

    // An invalid object is refused by name and field; the rest goes on.
    api.apply(pod("broken", &n1, "10.244.1.999"))
        .expect("apply");
    wait_for("the refusal in the log", || {
        lab.agent_log(0)
            .contains("Pod web/broken: status.podIPs: \"10.244.1.999\"")
    });
    assert_eq!(
        ping(&a.netns, &c.ip.to_string(), 3, &[])
            .expect("ping")
            .received,
        3
    );
}

#[test]
fn watches_survive_drops_410_and_an_outage() {
    let lab = kube_lab(2, 1);
    let (a, c) = (lab.pod("pod-0-0").clone(), lab.pod("pod-1-0").clone());
    let api = lab.api.as_ref().expect("api server");
    let n1 = lab.state.nodes[1].name.clone();
    wait_for("the remote pod", || {
        has_endpoint(&lab, 0, &c.ip.to_string())
    });

    // A dropped connection: the watch resumes and misses nothing.
    let watches = count(&api.requests(), "/api/v1/pods", true);
    api.drop_watches();
    api.apply(pod("after-drop", &n1, "10.244.1.70"))
        .expect("apply");
    wait_for("a Pod added around a dropped watch", || {
        has_endpoint(&lab, 0, "10.244.1.70")
    });
    assert!(
        count(&api.requests(), "/api/v1/pods", true) > watches,
        "the watch did not reconnect"
    );

    // Bookmarks let a resumed watch start from the latest version: once
    // every watch (six kinds, two agents) has had one at the current version.
    let rv = api.resource_version();
    wait_for("a bookmark on every watch", || {
        api.bookmarks_since(rv) >= 12
    });
    let before = api.requests().len();
    api.drop_watches();
    wait_for("watches to resume", || api.requests().len() >= before + 12);
    let resumed: Vec<String> = api.requests()[before..]
        .iter()
        .filter(|r| r.contains("watch=true"))
        .cloned()
        .collect();
    assert!(
        resumed
            .iter()
            .all(|r| !r.contains("resourceVersion=0&") && r.contains("resourceVersion=")),
        "{resumed:#?}"
    );

    // 410 Gone: history compacted while a change happens; the agent relists.
    let lists = count(&api.requests(), "/api/v1/pods", false);
    api.set_down(true);
    api.apply(pod("during-outage", &n1, "10.244.1.71"))
        .expect("apply");
    api.delete("Pod", "web", "after-drop").expect("delete");
    api.compact();
    // While the API server is down the datapath is left as it was, even
    // after the agent has failed to reach it.
    let errors = || watch_errors(&lab, 0);
    let seen = errors();
    wait_for("the agent to hit the outage", || errors() >= seen + 6.0);
    assert!(
        has_endpoint(&lab, 0, "10.244.1.70"),
        "an outage must not remove state"
    );
    assert!(!has_endpoint(&lab, 0, "10.244.1.71"));
    assert_eq!(
        ping(&a.netns, &c.ip.to_string(), 3, &[])
            .expect("ping")
            .received,
        3,
        "forwarding during the outage"
    );
    api.set_down(false);
    wait_for("the relisted state", || {
        has_endpoint(&lab, 0, "10.244.1.71") && !has_endpoint(&lab, 0, "10.244.1.70")
    });
    assert!(
        count(&api.requests(), "/api/v1/pods", false) > lists,
        "no relist after 410"
    );
    // The outage was seen: watch errors logged by kind and counted.
    let log = lab.agent_log(0);
    assert!(
        log.lines()
            .any(|l| l.contains("WARN") && l.contains("watch: ") && l.contains("kind=\"Pod\"")),
        "no watch error logged for Pods during the outage:\n{log}"
    );
    let (_, metrics) = lab::http_get(
        &lab.state.nodes[0].netns,
        std::net::SocketAddr::from(([127, 0, 0, 1], 9963)),
        "/metrics",
    )
    .expect("metrics");
    let errors: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("dataplane_errors_total{kind=\"kube_watch\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    assert!(errors >= 1.0, "watch errors not counted:\n{metrics}");
}

/// Services and EndpointSlices through list/watch: a backend change and a
/// deletion reach the datapath as watch events.
#[test]
fn services_and_endpoint_slices_from_the_api_server() {
    use lab::services::{Ep, identity_server, service, who};
    use std::sync::atomic::{AtomicBool, Ordering};
    let lab = kube_lab(2, 2);
    let svc = service(
        "web",
        json!({"type": "NodePort", "clusterIP": "10.96.0.10",
               "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080}]}),
        json!({}),
    );
    let ports = json!([{"name": "http", "port": 8080, "protocol": "TCP"}]);
    let both = [Ep::ready("pod-0-1"), Ep::ready("pod-1-1")];
    lab.set_services(
        vec![svc.clone()],
        vec![lab.slice("web", "web-1", &both, ports.clone())],
    )
    .expect("publish");
    for i in 0..2 {
        lab.wait_frontend(i, "10.96.0.10:80/tcp", "internal", 2)
            .expect("frontend");
    }
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        for p in ["pod-0-1", "pod-1-1"] {
            let (ns, stop) = (lab.pod(p).netns.clone(), &stop);
            s.spawn(move || identity_server(&ns, p, &[8080], stop).expect("server"));
        }
        std::thread::sleep(Duration::from_millis(100));
        let to = std::net::SocketAddr::from(([10, 96, 0, 10], 80));
        let client = lab.pod("pod-0-0").netns.clone();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let w = who(&client, to, 0).expect("through the ClusterIP");
            assert!(w.name == "pod-0-1" || w.name == "pod-1-1", "{w:?}");
            // One endpoint leaves (a watch event on the slice).
            lab.set_services(
                vec![svc.clone()],
                vec![lab.slice("web", "web-1", &both[1..], ports.clone())],
            )
            .expect("publish");
            for i in 0..2 {
                lab.wait_frontend(i, "10.96.0.10:80/tcp", "internal", 1)
                    .expect("frontend");
            }
            for _ in 0..10 {
                assert_eq!(who(&client, to, 0).expect("who").name, "pod-1-1");
            }
            // The Service goes.
            lab.set_services(vec![], vec![]).expect("publish");
            for i in 0..2 {
                lab.wait_no_frontend(i, "10.96.0.10:80/tcp").expect("gone");
            }
        }));
        stop.store(true, Ordering::Relaxed);
        if let Err(e) = r {
            std::panic::resume_unwind(e);
        }
    });
}

/// The agent as a DaemonSet pod runs it: in-cluster config (node 0 from
/// `KUBERNETES_SERVICE_HOST`/`_PORT`, node 1 from `--k8s-api-server`), the
/// service account's token and CA against an HTTPS API server that
/// enforces the ClusterRole of `deploy/base/rbac.yaml`. Then a wrong token and a
/// missing grant: each a clear error, retried, with the datapath forwarding.
#[test]
fn in_cluster_config_tls_token_and_the_deploy_cluster_role() {
    let rbac = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/base/rbac.yaml"),
    )
    .expect("deploy/base/rbac.yaml");
    let rules = lab::apiserver::cluster_role_rules(&rbac).expect("ClusterRole");
    let mut spec = LabSpec::new(2, 1).expect("spec");
    spec.source = "kube".into();
    spec.kube_in_cluster = Some(Some(rules.clone()));
    let lab = Lab::up(&spec).expect("lab");
    let (a, c) = (lab.pod("pod-0-0").clone(), lab.pod("pod-1-0").clone());
    let api = lab.api.as_ref().expect("api server");
    let reach = || {
        ping(&a.netns, &c.ip.to_string(), 3, &[])
            .expect("ping")
            .received
    };
    assert_eq!(reach(), 3);
    wait_for("the remote pod from its Pod object", || {
        has_endpoint(&lab, 0, &c.ip.to_string())
    });
    assert!(lab.agent_log(1).contains("listed"));

    // Every request was allowed, and together they used every grant: the
    // ClusterRole is neither too narrow nor wider than the agent's use.
    let access = api.access();
    assert!(access.iter().all(|x| x.code == 200), "{access:#?}");
    let used: std::collections::BTreeSet<(String, String, String)> = access
        .iter()
        .map(|x| (x.group.clone(), x.resource.clone(), x.verb.clone()))
        .collect();
    let granted: std::collections::BTreeSet<(String, String, String)> = rules
        .iter()
        .flat_map(|(g, r, verbs)| verbs.iter().map(|v| (g.clone(), r.clone(), v.clone())))
        .collect();
    assert_eq!(used, granted);

    // A token the server no longer takes: every reconnect gets 401, the
    // log says what to check, the agent keeps retrying, packets flow.

    api.set_token(Some("a-rotated-token".into()));
    api.drop_watches();
    let refused = || api.access().iter().filter(|x| x.code == 401).count();
    wait_for("401s", || refused() >= 6);
    let first = refused();
    wait_for("the clear error in the log", || {
        lab.agent_log(0).contains(
            "the API server refused the agent's credentials (401 Unauthorized): check the service account token",
        )
    });
    wait_for("retries", || refused() > first + 6);
    assert!(watch_errors(&lab, 0) >= 1.0);
    assert_eq!(reach(), 3, "forwarding with the API refusing the agent");
    // A restart with the token refused: the datapath is adopted and keeps
    // forwarding while the watches retry.
    let mut lab = lab;
    lab.signal_agent(1, libc::SIGTERM).expect("stop");
    lab.start_agent_again(1).expect("start");
    let api = lab.api.as_ref().expect("api server");
    assert_eq!(reach(), 3, "forwarding after a restart without the API");

    // The right token again: the watches recover and changes flow.
    let token = std::fs::read_to_string(lab.service_account_dir().join("token")).expect("token");
    api.set_token(Some(token));
    let n1 = lab.state.nodes[1].name.clone();
    api.apply(pod("after-401", &n1, "10.244.1.80"))
        .expect("apply");
    wait_for("a Pod after the token works again", || {
        has_endpoint(&lab, 0, "10.244.1.80")
    });

    // A ClusterRole without NetworkPolicies: 403, named, retried; the
    // other kinds go on.
    let without: Vec<_> = rules
        .iter()
        .filter(|(_, r, _)| r != "networkpolicies")
        .cloned()
        .collect();
    api.set_rules(Some(without));
    api.drop_watches();
    wait_for("the 403 in the log", || {
        lab.agent_log(0).contains(
            "the API server forbids listing or watching networkpolicies (403 Forbidden): the ClusterRole must grant list and watch on it",
        )
    });
    api.apply(pod("during-403", &n1, "10.244.1.81"))
        .expect("apply");
    wait_for("a Pod while NetworkPolicies are forbidden", || {
        has_endpoint(&lab, 0, "10.244.1.81")
    });
    assert_eq!(reach(), 3);
}
