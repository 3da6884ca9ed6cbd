//! The lab as a tool, through its command line (the `dataplane-lab`
//! binary, which `cargo xtask lab` is too): manifests in, a running
//! cluster, probes and matrices out, changes applied as `kubectl` would,
//! and nothing left behind. Needs root.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_dataplane-lab");

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples")
}

/// A lab made through the command line, removed when the test ends
/// (also when it fails).
struct Tool {
    name: String,
}

impl Tool {
    fn up(tag: &str, args: &[&str]) -> (Tool, Output) {
        let mut b = [0u8; 3];
        std::io::Read::read_exact(
            &mut std::fs::File::open("/dev/urandom").expect("urandom"),
            &mut b,
        )
        .expect("random");
        let name = format!("t-{tag}-{:02x}{:02x}{:02x}", b[0], b[1], b[2]);
        let tool = Tool { name };
        let out = tool.raw(&[&["up", "--name", &tool.name], args].concat());
        assert!(
            out.status.success(),
            "lab up failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (tool, out)
    }

    /// The command with `--lab <name>`; its whole output.
    fn raw(&self, args: &[&str]) -> Output {
        // Before the verb: after `exec … --` it would be the command's.
        Command::new(BIN)
            .args(["--lab", &self.name])
            .args(args)
            .output()
            .expect("running dataplane-lab")
    }

    /// The command, which must succeed; its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.raw(args);
        assert!(
            out.status.success(),
            "lab {args:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf8")
    }

    fn json(&self, args: &[&str]) -> Value {
        let text = self.ok(&[args, &["-o", "json"]].concat());
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {text}"))
    }

    fn status(&self) -> Value {
        self.json(&["status"])
    }

    /// The matrix as `allowed[from][to]`, and its table text.
    fn matrix(&self, extra: &[&str]) -> (BTreeMap<String, BTreeMap<String, bool>>, String) {
        let m = self.json(&[&["matrix"], extra].concat());
        let allowed = serde_json::from_value(m["allowed"].clone()).expect("allowed");
        (allowed, self.ok(&[&["matrix"], extra].concat()))
    }

    fn probe(&self, from: &str, to: &str, port: &str) -> (Value, i32) {
        let out = self.raw(&["probe", from, to, port, "-o", "json"]);
        let code = out.status.code().expect("exit code");
        let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "probe {from} {to} {port}: not JSON ({e}): {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (v, code)
    }
}

impl Drop for Tool {
    fn drop(&mut self) {
        let _ = Command::new(BIN).args(["down", &self.name]).output();
    }
}

/// The table `lab matrix` prints for `pods` where `allowed(from, to)`.
fn table(pods: &[&str], allowed: impl Fn(&str, &str) -> bool) -> String {
    let mut out = format!("80/TCP:\n-\t{}\n", pods.join("\t"));
    for from in pods {
        let row: Vec<&str> = pods
            .iter()
            .map(|to| if allowed(from, to) { "." } else { "X" })
            .collect();
        out.push_str(&format!("{from}\t{}\n", row.join("\t")));
    }
    out
}

const SHOP: [&str; 5] = [
    "ops/monitor",
    "shop/api-0",
    "shop/api-1",
    "shop/db",
    "shop/frontend",
];

/// Every pod's app label in the shop example.
fn app(pod: &str, relabelled: bool) -> &'static str {
    match pod {
        "ops/monitor" => "monitor",
        "shop/db" => "db",
        "shop/frontend" if !relabelled => "frontend",
        _ => "api",
    }
}

/// What `shop-policies.yaml` allows on 80: the db only from the api, the
/// api only from the frontend and the ops namespace; a pod always reaches
/// itself.
fn shop_policy(from: &str, to: &str, relabelled: bool) -> bool {
    from == to
        || match app(to, relabelled) {
            "db" => app(from, relabelled) == "api",
            "api" => app(from, relabelled) == "frontend" || from.starts_with("ops/"),
            _ => true,
        }
}

/// Pids of live processes whose command line contains `needle`.
fn processes_with(needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").expect("proc").flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline"))
            && cmd.windows(needle.len()).any(|w| w == needle.as_bytes())
        {
            out.push(pid);
        }
    }
    out
}

fn assert_gone(status: &Value) {
    let id = status["id"].as_str().expect("id");
    let netns = String::from_utf8(
        Command::new("ip")
            .args(["netns", "list"])
            .output()
            .expect("ip")
            .stdout,
    )
    .expect("utf8");
    assert!(!netns.contains(id), "namespaces left: {netns}");
    for n in status["nodes"].as_array().expect("nodes") {
        let pins = Path::new(n["pin_dir"].as_str().expect("pin dir"));
        assert!(!pins.exists(), "pins left in {}", pins.display());
        assert!(
            pins.parent().is_some_and(|p| !p.exists()),
            "the lab's pin root is left"
        );
        if let Some(cg) = n["cgroup"].as_str() {
            assert!(!Path::new(cg).exists(), "cgroup {cg} left");
        }
        let sock = Path::new(n["api_socket"].as_str().expect("socket"));
        assert!(!sock.exists(), "run directory left");
    }
    // Agents (their command line names the lab's run directory) and pod
    // servers (they name the lab's namespaces).
    let left = processes_with(id);
    assert!(left.is_empty(), "processes of the lab left: {left:?}");
}

#[test]
fn manifests_in_matrix_out_and_kubectl_style_changes() {
    let shop = examples().join("shop");
    let (lab, up) = Tool::up("shop", &["--manifests", shop.to_str().expect("path")]);
    let up = String::from_utf8_lossy(&up.stdout);
    assert!(
        up.contains("node node-0") && up.contains("pod shop/db"),
        "{up}"
    );

    // What runs where.
    let st = lab.status();
    let nodes = st["nodes"].as_array().expect("nodes");
    assert_eq!(
        nodes
            .iter()
            .map(|n| n["name"].as_str().expect("name"))
            .collect::<Vec<_>>(),
        ["node-0", "node-1"]
    );
    for n in nodes {
        assert_eq!(n["agent_running"], true, "{n}");
        assert!(Path::new(n["pin_dir"].as_str().expect("pins")).is_dir());
    }
    let pods = st["pods"].as_array().expect("pods");
    let mut names: Vec<&str> = pods
        .iter()
        .map(|p| p["name"].as_str().expect("name"))
        .collect();
    names.sort_unstable();
    assert_eq!(names, SHOP);
    for p in pods {
        // Scheduled over both nodes, each address from its node's CIDR,
        // the manifest's labels.
        let node = p["node"].as_str().expect("node");
        let i: usize = node.trim_start_matches("node-").parse().expect("index");
        assert!(
            p["ip"]
                .as_str()
                .expect("ip")
                .starts_with(&format!("10.244.{i}.")),
            "{p}"
        );
        assert!(p["labels"]["app"].is_string(), "{p}");
    }
    assert!(
        pods.iter().any(|p| p["node"] == "node-0") && pods.iter().any(|p| p["node"] == "node-1")
    );
    assert_eq!(st["external"]["address"], "172.20.0.100");

    // No policy: everyone reaches everyone, and the matrix agrees with
    // one probe per pair.
    let (allowed, text) = lab.matrix(&[]);
    assert_eq!(text, table(&SHOP, |_, _| true));
    for from in SHOP {
        for to in SHOP {
            let (r, code) = lab.probe(from, to, "80/tcp");
            assert_eq!(r["verdict"] == "allowed", allowed[from][to], "{r}");
            assert_eq!(code, if allowed[from][to] { 0 } else { 1 });
            assert_eq!(r["answered_by"], to, "{r}");
        }
    }

    // The Service: its ClusterIP as the lab allocated it, from every node,
    // a pod and the external host (NodePort on each node).
    let (r, code) = lab.probe("shop/frontend", "svc/shop/api", "80/TCP");
    assert_eq!(
        (code, &r["address"], &r["protocol"]),
        (0, &Value::from("10.96.1.1:80"), &Value::from("TCP")),
        "{r}"
    );
    let backends = ["shop/api-0", "shop/api-1"];
    assert!(
        backends.contains(&r["answered_by"].as_str().expect("answered")),
        "{r}"
    );
    for from in ["node/node-0", "node/node-1"] {
        let (r, code) = lab.probe(from, "svc/shop/api", "80/tcp");
        assert_eq!(code, 0, "{r}");
        assert!(
            backends.contains(&r["answered_by"].as_str().expect("answered")),
            "{r}"
        );
    }
    for node in ["node/node-0", "node/node-1"] {
        let (r, code) = lab.probe("external", node, "30080/tcp");
        assert_eq!(code, 0, "{r}");
        assert!(
            backends.contains(&r["answered_by"].as_str().expect("answered")),
            "{r}"
        );
    }
    // A port the Service does not declare is dialled, and refused.
    let (r, code) = lab.probe("shop/frontend", "svc/shop/api", "81/tcp");
    assert_eq!((code, r["verdict"].as_str()), (1, Some("denied")), "{r}");
    assert_eq!(r["address"], "10.96.1.1:81");
    // Text form, and usage errors.
    let out = lab.ok(&["probe", "shop/frontend", "shop/db", "80/tcp"]);
    assert!(
        out.starts_with("allowed shop/frontend -> shop/db (10.244."),
        "{out}"
    );
    assert!(out.contains("answered by shop/db"), "{out}");
    for bad in [
        ["shop/nope", "shop/db", "80/tcp"],
        ["shop/db", "svc/shop/nope", "80/tcp"],
        ["shop/db", "shop/api-0", "80/sctp"],
        ["shop/db", "shop/api-0", "http"],
    ] {
        let out = lab.raw(&[&["probe"], &bad[..]].concat());
        assert_eq!(out.status.code(), Some(2), "{bad:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("lab: error:"),
            "{bad:?}"
        );
    }

    // Policies take effect as NetworkPolicy says.
    let policies = examples().join("shop-policies.yaml");
    let out = lab.ok(&["apply", "-f", policies.to_str().expect("path")]);
    assert!(
        out.contains("networkpolicy/db-from-api -n shop created"),
        "{out}"
    );
    let with_policy = table(&SHOP, |f, t| shop_policy(f, t, false));
    let (allowed, text) = lab.matrix(&[]);
    assert_eq!(text, with_policy);
    // The matrix agrees with single probes under policy too.
    for from in SHOP {
        for to in SHOP {
            let (r, code) = lab.probe(from, to, "80/tcp");
            assert_eq!(code == 0, allowed[from][to], "{from} -> {to}: {r}");
        }
    }
    // Applied again: nothing changes.
    let out = lab.ok(&["apply", "-f", policies.to_str().expect("path")]);
    assert!(
        out.contains("networkpolicy/db-from-api -n shop unchanged"),
        "{out}"
    );

    // Bad input is refused whole, naming file, document and field, and the
    // lab stays as it was.
    let objects_before = lab.status();
    let dir = tempdir("bad");
    let cases: [(&str, &str); 5] = [
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: bad, namespace: shop}\nspec:\n  ports: [{port: 70000}]\n",
            "document 1: Service shop/bad: spec.ports[0].port: port 70000 is out of range",
        ),
        (
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: fine}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: shop}\nspec: {nodeName: node-9, containers: []}\n",
            "document 2: Pod shop/p: spec.nodeName: no node \"node-9\"",
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: dup, namespace: shop}\nspec:\n  clusterIP: 10.96.1.1\n  ports: [{port: 80}]\n",
            "document 1: Service shop/dup: spec.clusterIP: 10.96.1.1 is already allocated to Service shop/api",
        ),
        (
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n",
            "document 1: unknown kind \"Deployment\"",
        ),
        (
            "apiVersion: v1\nkind: Pod\nmetadata: {name: q, namespace: shop}\nspec:\n  containers: [{name: c, ports: [{containerPort: eighty}]}]\n",
            "document 1: Pod: spec.containers[0].ports[0].containerPort: invalid type",
        ),
    ];
    for (i, (text, want)) in cases.iter().enumerate() {
        let f = dir.join(format!("bad{i}.yaml"));
        std::fs::write(&f, text).expect("write");
        let out = lab.raw(&["apply", "-f", f.to_str().expect("path")]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(
            err.contains(&format!("{}: {want}", f.display())),
            "{err}\nwanted {want}"
        );
    }
    assert_eq!(lab.status()["pods"], objects_before["pods"]);
    assert_eq!(
        lab.matrix(&[]).1,
        with_policy,
        "bad input changed the matrix"
    );

    // A relabelled namespace: ops loses the api (its selector was on the
    // namespace's team label), and gets it back.
    let ns = dir.join("ns.yaml");
    std::fs::write(
        &ns,
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: ops, labels: {team: audit}}\n",
    )
    .expect("write");
    lab.ok(&["apply", "-f", ns.to_str().expect("path")]);
    let (allowed, _) = lab.matrix(&[]);
    assert!(
        !allowed["ops/monitor"]["shop/api-0"] && !allowed["ops/monitor"]["shop/api-1"],
        "{allowed:?}"
    );
    std::fs::write(
        &ns,
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: ops, labels: {team: ops}}\n",
    )
    .expect("write");
    lab.ok(&["apply", "-f", ns.to_str().expect("path")]);
    assert_eq!(lab.matrix(&[]).1, with_policy);

    // A relabelled pod: the matrix follows its new labels.
    let relabel = examples().join("shop-relabel.yaml");
    let out = lab.ok(&["apply", "-f", relabel.to_str().expect("path")]);
    assert!(out.contains("pod/frontend -n shop configured"), "{out}");
    assert_eq!(
        lab.matrix(&[]).1,
        table(&SHOP, |f, t| shop_policy(f, t, true))
    );

    // Deleting the policies restores reachability.
    let out = lab.ok(&["delete", "-f", policies.to_str().expect("path")]);
    assert!(
        out.contains("networkpolicy/api-from-frontend -n shop deleted"),
        "{out}"
    );
    assert_eq!(lab.matrix(&[]).1, table(&SHOP, |_, _| true));

    // A pod deleted is unwired (its namespace and server go), a new one
    // wired and served.
    let db = lab.status()["pods"]
        .as_array()
        .expect("pods")
        .iter()
        .find(|p| p["name"] == "shop/db")
        .cloned()
        .expect("db");
    let netns = db["netns"].as_str().expect("netns").to_owned();
    let server = db["server_pid"].as_u64().expect("server pid");
    let f = dir.join("db.yaml");
    std::fs::write(
        &f,
        "apiVersion: v1\nkind: Pod\nmetadata: {name: db, namespace: shop}\n",
    )
    .expect("write");
    let out = lab.ok(&["delete", "-f", f.to_str().expect("path")]);
    assert!(out.contains("pod/db -n shop deleted"), "{out}");
    assert!(
        !Path::new("/run/netns").join(&netns).exists(),
        "netns {netns} left"
    );
    assert!(!Path::new(&format!("/proc/{server}")).exists() || processes_with(&netns).is_empty());
    let f = dir.join("cache.yaml");
    std::fs::write(
        &f,
        "apiVersion: v1\nkind: Pod\nmetadata: {name: cache, namespace: ops, labels: {app: cache}}\nspec:\n  nodeName: node-1\n  containers: [{name: c, ports: [{containerPort: 80}, {containerPort: 53, protocol: UDP}]}]\n",
    )
    .expect("write");
    lab.ok(&["apply", "-f", f.to_str().expect("path")]);
    let (allowed, _) = lab.matrix(&[]);
    assert_eq!(
        allowed.keys().map(String::as_str).collect::<Vec<_>>(),
        [
            "ops/cache",
            "ops/monitor",
            "shop/api-0",
            "shop/api-1",
            "shop/frontend"
        ]
    );
    assert!(
        allowed.values().all(|row| row.values().all(|a| *a)),
        "{allowed:?}"
    );
    // UDP: only the new pod serves 53.
    let (udp, text) = lab.matrix(&["--port", "53", "--protocol", "udp"]);
    assert!(text.starts_with("53/UDP:\n"), "{text}");
    for (from, row) in &udp {
        for (to, a) in row {
            assert_eq!(*a, to == "ops/cache", "{from} -> {to} on 53/udp");
        }
    }

    // exec: the command's output and exit status, in the pod's namespace
    // and its node's cgroup.
    let out = lab.ok(&[
        "exec",
        "ops/cache",
        "--",
        "ip",
        "-4",
        "-o",
        "addr",
        "show",
        "eth0",
    ]);
    let cache_ip = lab.status()["pods"]
        .as_array()
        .expect("pods")
        .iter()
        .find(|p| p["name"] == "ops/cache")
        .map(|p| p["ip"].as_str().expect("ip").to_owned())
        .expect("cache");
    assert!(out.contains(&format!("inet {cache_ip}/32")), "{out}");
    let cgroup = lab.ok(&["exec", "ops/cache", "--", "cat", "/proc/self/cgroup"]);
    let node1 = &lab.status()["nodes"][1]["cgroup"];
    let node1 = node1.as_str().expect("cgroup");
    let tail = node1.rsplit('/').next().expect("name");
    assert!(
        cgroup.lines().any(|l| l == format!("0::/{tail}")),
        "{cgroup}"
    );
    assert_eq!(
        lab.raw(&["exec", "node/node-0", "--", "sh", "-c", "exit 3"])
            .status
            .code(),
        Some(3)
    );
    assert_eq!(
        lab.raw(&["exec", "external", "--", "true"]).status.code(),
        Some(0)
    );
    assert_eq!(
        lab.raw(&["exec", "nobody/here", "--", "true"])
            .status
            .code(),
        Some(2)
    );

    // Down: nothing left.
    let st = lab.status();
    lab.ok(&["down"]);
    assert_gone(&st);
}

#[test]
fn a_quick_lab_in_native_mode_and_node_objects_from_manifests() {
    // No manifests: pods default/pod-<node>-<j> serving TCP and UDP 80.
    let (lab, _) = Tool::up(
        "quick",
        &["--nodes", "2", "--mode", "native", "--pods-per-node", "2"],
    );
    let st = lab.status();
    assert_eq!(st["mode"], "native");
    let pods = [
        "default/pod-0-0",
        "default/pod-0-1",
        "default/pod-1-0",
        "default/pod-1-1",
    ];
    assert_eq!(lab.matrix(&[]).1, table(&pods, |_, _| true));
    let (udp, _) = lab.matrix(&["--protocol", "UDP"]);
    assert!(udp.values().all(|r| r.values().all(|a| *a)), "{udp:?}");
    // A pod on another node by its bare name (default namespace), and a
    // node's address.
    let (r, code) = lab.probe("pod-0-0", "pod-1-1", "80/udp");
    assert_eq!(
        (code, r["answered_by"].as_str()),
        (0, Some("default/pod-1-1")),
        "{r}"
    );
    let (r, code) = lab.probe("external", "node/node-0", "80/tcp");
    assert_eq!((code, r["verdict"].as_str()), (1, Some("denied")), "{r}");
    // Status of every lab lists this one.
    let all = lab.ok(&["status", "--all"]);
    assert!(all.contains(&format!("lab {} ", lab.name)), "{all}");
    lab.ok(&["down"]);
    assert_gone(&st);

    // Node objects in the manifests name the nodes and their CIDRs.
    let dir = tempdir("nodes");
    std::fs::write(
        dir.join("nodes.yaml"),
        "apiVersion: v1\nkind: Node\nmetadata: {name: worker-a, labels: {zone: a}}\nspec: {podCIDR: 10.244.7.0/24}\n---\napiVersion: v1\nkind: Node\nmetadata: {name: worker-b}\n",
    )
    .expect("write");
    std::fs::write(
        dir.join("pod.yaml"),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  nodeName: worker-a\n  containers: [{name: c, ports: [{containerPort: 80}]}]\n",
    )
    .expect("write");
    let bad = Command::new(BIN)
        .args([
            "up",
            "--nodes",
            "3",
            "--manifests",
            dir.to_str().expect("path"),
        ])
        .output()
        .expect("run");
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&bad.stderr)
            .contains("--nodes 3: the manifests define 2 Node objects (worker-a, worker-b)"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    let (lab, _) = Tool::up("nodes", &["--manifests", dir.to_str().expect("path")]);
    let st = lab.status();
    let nodes: Vec<(&str, &str)> = st["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| {
            (
                n["name"].as_str().expect("name"),
                n["pod_cidr"].as_str().expect("cidr"),
            )
        })
        .collect();
    // worker-b had none: the lowest free /24.
    assert_eq!(
        nodes,
        [("worker-a", "10.244.7.0/24"), ("worker-b", "10.244.0.0/24")]
    );
    assert!(
        st["pods"][0]["ip"]
            .as_str()
            .expect("ip")
            .starts_with("10.244.7."),
        "{st}"
    );
    let (r, code) = lab.probe("node/worker-b", "default/p", "80/tcp");
    assert_eq!(code, 0, "{r}");
    lab.ok(&["down"]);
    assert_gone(&st);
}

#[test]
fn bad_manifests_at_up_build_nothing() {
    let dir = tempdir("badup");
    std::fs::write(
        dir.join("a.yaml"),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: []}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec:\n  type: NodePort\n  ports: [{port: 80, nodePort: 80}]\n",
    )
    .expect("write");
    let out = Command::new(BIN)
        .args([
            "up",
            "--name",
            "never-built",
            "--manifests",
            dir.to_str().expect("path"),
        ])
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("a.yaml: document 2: Service default/s: spec.ports[0].nodePort: 80 is outside the range 30000-32767"),
        "{err}"
    );
    let listed = Command::new(BIN)
        .args(["status", "--all"])
        .output()
        .expect("run");
    assert!(!String::from_utf8_lossy(&listed.stdout).contains("never-built"));
    // A lab that does not exist: a lab error.
    let out = Command::new(BIN)
        .args(["matrix", "--lab", "no-such-lab"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no lab named no-such-lab"));
}

/// A scratch directory of this process, removed when dropped.
struct TempDir(PathBuf);

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempdir(tag: &str) -> TempDir {
    let dir = std::env::temp_dir().join(format!("dp-labtool-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("tempdir");
    TempDir(dir)
}
