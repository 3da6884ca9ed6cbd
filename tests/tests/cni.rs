//! The CNI plugin, driven as a runtime drives it: binary on CNI_PATH,
//! `CNI_*` environment, config on stdin, JSON out. Needs root.

use std::{
    collections::HashSet,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use lab::{Lab, LabSpec, cni::Attachment, ping};
use serde_json::{Value, json};

fn lab_with(nodes: usize, pods: usize, f: impl FnOnce(&mut LabSpec)) -> Lab {
    let mut spec = LabSpec::new(nodes, pods).expect("lab spec");
    f(&mut spec);
    Lab::up(&spec).expect("lab up")
}

/// A fresh pod namespace and the attachment a runtime would use for it.
fn attachment(lab: &mut Lab, name: &str) -> Attachment {
    let netns = format!("{}-{name}", lab.state.nodes[0].netns);
    lab.add_netns(&netns).expect("netns");
    Attachment {
        container_id: format!("{}-{name}", lab.state.id),
        netns: PathBuf::from("/run/netns").join(&netns),
        ifname: "eth0".into(),
        args: vec![
            ("K8S_POD_NAMESPACE".into(), "default".into()),
            ("K8S_POD_NAME".into(), name.into()),
        ],
        runtime_config: Value::Null,
    }
}

fn netns_name(at: &Attachment) -> String {
    at.netns
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned()
}

fn result_ip(result: &Value) -> String {
    result["ips"][0]["address"]
        .as_str()
        .expect("address")
        .split('/')
        .next()
        .expect("ip")
        .to_owned()
}

#[test]
fn add_check_del_for_every_cni_version() {
    let mut lab = lab_with(1, 0, |_| {});
    let rt = lab.runtime(0);
    let baseline = lab.host_snapshot(0).expect("snapshot");
    let node_ip = lab.state.nodes[0].ip.to_string();

    let version = rt
        .exec_raw("dataplane-cni", &[("CNI_COMMAND", "VERSION")], b"")
        .expect("run")
        .expect("VERSION");
    assert_eq!(
        version["supportedVersions"],
        json!(["0.4.0", "1.0.0", "1.1.0"])
    );

    for v in ["0.4.0", "1.0.0", "1.1.0"] {
        let mut list = lab.conflist(0).expect("conflist");
        list["cniVersion"] = v.into();
        let at = attachment(&mut lab, &format!("v{}", v.replace('.', "")));
        let result = rt
            .add(&list, &at)
            .expect("run")
            .unwrap_or_else(|f| panic!("ADD {v}: {f}"));
        assert_eq!(result["cniVersion"], v);
        assert_eq!(result["ips"][0]["gateway"], "169.254.1.1");
        assert_eq!(
            result["routes"][0],
            json!({"dst": "0.0.0.0/0", "gw": "169.254.1.1"})
        );
        assert_eq!(
            result["ips"][0]["version"].as_str(),
            (v == "0.4.0").then_some("4"),
            "{v}: {result}"
        );
        let pod_if =
            &result["interfaces"][result["ips"][0]["interface"].as_u64().expect("index") as usize];
        assert_eq!(pod_if["name"], "eth0");
        assert_eq!(pod_if["sandbox"], at.netns.to_string_lossy().as_ref());
        assert_eq!(
            pod_if["mtu"].as_u64(),
            (v == "1.1.0").then_some(1450),
            "{v}: {result}"
        );
        let ip = result_ip(&result);
        assert!(ip.starts_with("10.244.0."), "{ip}");

        // Wired for real: the pod reaches its node with the MTU it was given.
        assert_eq!(
            ping(&netns_name(&at), &node_ip, 3, &[])
                .expect("ping")
                .received,
            3,
            "{v}"
        );
        let mtu = lab::run(Command::new("ip").args([
            "-n",
            &netns_name(&at),
            "-j",
            "link",
            "show",
            "eth0",
        ]))
        .expect("ip");
        let mtu: Value = serde_json::from_slice(&mtu.stdout).expect("json");
        assert_eq!(mtu[0]["mtu"], 1450);

        rt.check(&list, &at, &result)
            .expect("run")
            .unwrap_or_else(|f| panic!("CHECK {v}: {f}"));
        rt.del(&list, &at, Some(&result))
            .expect("run")
            .unwrap_or_else(|f| panic!("DEL {v}: {f}"));
        rt.del(&list, &at, Some(&result))
            .expect("run")
            .unwrap_or_else(|f| panic!("second DEL {v}: {f}"));
        let f = rt
            .check(&list, &at, &result)
            .expect("run")
            .expect_err("CHECK after DEL must fail");
        assert_eq!(f.code, 103, "{f}");
        assert_eq!(
            lab.host_snapshot(0).expect("snapshot"),
            baseline,
            "{v} left something behind"
        );
    }

    // DEL for a container that never existed, with its netns gone: success.
    let mut list = lab.conflist(0).expect("conflist");
    list["cniVersion"] = "1.1.0".into();
    let ghost = Attachment {
        container_id: "never-added".into(),
        netns: "/run/netns/does-not-exist".into(),
        ifname: "eth0".into(),
        args: vec![],
        runtime_config: Value::Null,
    };
    rt.del(&list, &ghost, None)
        .expect("run")
        .expect("DEL of an unknown container succeeds");
}

#[test]
fn status_and_add_when_the_agent_is_down() {
    let mut lab = lab_with(1, 0, |_| {});
    let rt = lab.runtime(0);
    let list = lab.conflist(0).expect("conflist");
    rt.status(&list)
        .expect("run")
        .expect("STATUS with a running agent");

    lab.stop_agent(0);
    let f = rt
        .status(&list)
        .expect("run")
        .expect_err("STATUS without agent");
    assert_eq!(f.code, 50, "{f}");
    let baseline = lab.host_snapshot(0).expect("snapshot");
    let at = attachment(&mut lab, "orphan");
    let f = rt
        .add(&list, &at)
        .expect("run")
        .expect_err("ADD without agent");
    assert_eq!(f.code, 11, "{f}");
    assert!(f.msg.contains("agent is not running"), "{f}");
    assert_eq!(
        lab.host_snapshot(0).expect("snapshot"),
        baseline,
        "a refused ADD left something"
    );
    let pod_links =
        lab::run(Command::new("ip").args(["-n", &netns_name(&at), "-o", "link", "show"]))
            .expect("ip");
    assert!(
        !String::from_utf8_lossy(&pod_links.stdout).contains("eth0"),
        "eth0 created in the pod"
    );
}

#[test]
fn bad_input_gets_the_right_code_and_changes_nothing() {
    let mut lab = lab_with(1, 1, |_| {});
    let rt = lab.runtime(0);
    let at = attachment(&mut lab, "bad");
    let netns = at.netns.to_string_lossy().into_owned();
    let baseline = lab.host_snapshot(0).expect("snapshot");
    let plugin_conf = |patch: &dyn Fn(&mut Value)| -> Vec<u8> {
        let list = lab.conflist(0).expect("conflist");
        let mut conf = list["plugins"][0].clone();
        conf["name"] = list["name"].clone();
        conf["cniVersion"] = list["cniVersion"].clone();
        patch(&mut conf);
        serde_json::to_vec(&conf).expect("json")
    };
    let good = plugin_conf(&|_| {});
    fn env(netns: &str) -> Vec<(&'static str, &str)> {
        vec![
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "bad-1"),
            ("CNI_NETNS", netns),
            ("CNI_IFNAME", "eth0"),
        ]
    }
    let full = env(&netns);
    let without = |key: &str| {
        full.iter()
            .copied()
            .filter(|(k, _)| *k != key)
            .collect::<Vec<_>>()
    };

    /// (what, environment, stdin, expected code, what the error must mention)
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, Vec<u8>, u64, &'a str);
    let cases: Vec<Case> = vec![
        (
            "malformed JSON",
            full.clone(),
            b"{\"cniVersion\": ".to_vec(),
            6,
            "not valid JSON",
        ),
        (
            "unknown cniVersion",
            full.clone(),
            plugin_conf(&|c| c["cniVersion"] = "7.0.0".into()),
            1,
            "7.0.0",
        ),
        (
            "missing CNI_NETNS",
            without("CNI_NETNS"),
            good.clone(),
            4,
            "CNI_NETNS",
        ),
        (
            "missing CNI_CONTAINERID",
            without("CNI_CONTAINERID"),
            good.clone(),
            4,
            "CNI_CONTAINERID",
        ),
        (
            "missing CNI_COMMAND",
            without("CNI_COMMAND"),
            good.clone(),
            4,
            "CNI_COMMAND",
        ),
        (
            "unknown command",
            {
                let mut e = full.clone();
                e[0] = ("CNI_COMMAND", "FROB");
                e
            },
            good.clone(),
            4,
            "FROB",
        ),
        (
            "netns that does not exist",
            env("/run/netns/nope-nope"),
            good.clone(),
            4,
            "nope-nope",
        ),
        (
            "missing name",
            full.clone(),
            plugin_conf(&|c| {
                c.as_object_mut().expect("obj").remove("name");
            }),
            7,
            "name",
        ),
        (
            "wrong type",
            full.clone(),
            plugin_conf(&|c| c["mtu"] = "big".into()),
            7,
            "mtu",
        ),
        (
            "bad subnet",
            full.clone(),
            plugin_conf(&|c| c["ipam"]["subnet"] = "10.244.0.7/24".into()),
            7,
            "ipam.subnet",
        ),
        (
            "unknown ipam field",
            full.clone(),
            plugin_conf(&|c| c["ipam"]["subnett"] = "x".into()),
            7,
            "subnett",
        ),
    ];
    for (what, env, stdin, code, mention) in cases {
        let f = rt
            .exec_raw("dataplane-cni", &env, &stdin)
            .expect("run")
            .expect_err(what);
        assert_eq!(f.code, code, "{what}: {f}");
        assert!(
            format!("{} {}", f.msg, f.details).contains(mention),
            "{what}: error does not mention {mention:?}: {f}"
        );
        assert_eq!(
            lab.host_snapshot(0).expect("snapshot"),
            baseline,
            "{what} changed the host"
        );
    }
    // The pod that was there still works.
    let pod = lab.pod("pod-0-0").clone();
    assert_eq!(
        ping(&pod.netns, &lab.state.nodes[0].ip.to_string(), 3, &[])
            .expect("ping")
            .received,
        3
    );
}

#[test]
fn fifty_concurrent_adds_get_distinct_addresses_and_dels_leave_nothing() {
    const N: usize = 50;
    let mut lab = lab_with(1, 0, |_| {});
    let rt = lab.runtime(0);
    let list = lab.conflist(0).expect("conflist");
    let baseline = lab.host_snapshot(0).expect("snapshot");
    let ats: Vec<Attachment> = (0..N)
        .map(|i| attachment(&mut lab, &format!("c{i}")))
        .collect();

    let results: Vec<Value> = std::thread::scope(|s| {
        let handles: Vec<_> = ats.iter().map(|at| s.spawn(|| rt.add(&list, at))).collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .expect("thread")
                    .expect("run")
                    .unwrap_or_else(|f| panic!("ADD: {f}"))
            })
            .collect()
    });
    let ips: HashSet<String> = results.iter().map(result_ip).collect();
    assert_eq!(
        ips.len(),
        N,
        "duplicate addresses handed out: {:?}",
        results.iter().map(result_ip).collect::<Vec<_>>()
    );
    let snap = lab.host_snapshot(0).expect("snapshot");
    assert_eq!(snap.reservations.len(), N, "{snap:?}");
    assert_eq!(snap.endpoints.len(), N);
    let dump = lab.dump(0, "dp_endpoints").expect("dump");
    let in_map: HashSet<String> = dump
        .iter()
        .map(|r| r["ip"].as_str().expect("ip").to_owned())
        .collect();
    assert_eq!(
        in_map, ips,
        "the endpoint map must hold exactly the allocated addresses"
    );

    std::thread::scope(|s| {
        let handles: Vec<_> = ats
            .iter()
            .zip(&results)
            .map(|(at, r)| s.spawn(|| rt.del(&list, at, Some(r))))
            .collect();
        for h in handles {
            h.join()
                .expect("thread")
                .expect("run")
                .unwrap_or_else(|f| panic!("DEL: {f}"));
        }
    });
    assert_eq!(lab.host_snapshot(0).expect("snapshot"), baseline);
    assert!(lab.dump(0, "dp_endpoints").expect("dump").is_empty());
}

#[test]
fn killed_mid_add_then_del_or_gc_leaves_a_clean_host() {
    let mut lab = lab_with(1, 1, |_| {});
    let list = lab.conflist(0).expect("conflist");
    let survivor = lab.pod("pod-0-0").clone();
    let baseline = lab.host_snapshot(0).expect("snapshot");
    for (point, cleanup) in [
        ("allocated", "DEL"),
        ("wired", "DEL"),
        ("allocated", "GC"),
        ("wired", "GC"),
    ] {
        let at = attachment(
            &mut lab,
            &format!("kill-{point}-{}", cleanup.to_lowercase()),
        );
        let mut rt = lab.runtime(0);
        rt.env.push(("DATAPLANE_CNI_PAUSE_AT".into(), point.into()));
        let mut conf = list["plugins"][0].clone();
        conf["name"] = list["name"].clone();
        conf["cniVersion"] = list["cniVersion"].clone();
        let mut child = rt
            .spawn("ADD", "dataplane-cni", &conf, Some(&at))
            .expect("spawn");
        let mut stderr = BufReader::new(child.stderr.take().expect("stderr"));
        let mut line = String::new();
        stderr.read_line(&mut line).expect("read");
        assert!(line.contains(&format!("paused at {point}")), "{line}");
        child.kill().expect("SIGKILL");
        child.wait().expect("wait");
        assert_ne!(
            lab.host_snapshot(0).expect("snapshot"),
            baseline,
            "{point}: the kill should leave state for cleanup to find"
        );

        let plain = lab.runtime(0);
        match cleanup {
            "DEL" => plain
                .del(&list, &at, None)
                .expect("run")
                .unwrap_or_else(|f| panic!("DEL after kill at {point}: {f}")),
            _ => plain
                .gc(&list, &[(&survivor.container_id, &survivor.ifname)])
                .expect("run")
                .unwrap_or_else(|f| panic!("GC after kill at {point}: {f}")),
        }
        assert_eq!(
            lab.host_snapshot(0).expect("snapshot"),
            baseline,
            "kill at {point} then {cleanup}"
        );
    }
    assert_eq!(
        ping(&survivor.netns, &lab.state.nodes[0].ip.to_string(), 3, &[])
            .expect("ping")
            .received,
        3
    );
}

#[test]
fn gc_releases_only_what_the_runtime_no_longer_has() {
    let lab = lab_with(1, 3, |_| {});
    let rt = lab.runtime(0);
    let list = lab.conflist(0).expect("conflist");
    let keep = lab.pod("pod-0-1").clone();
    rt.gc(&list, &[(&keep.container_id, &keep.ifname)])
        .expect("run")
        .expect("GC");
    let snap = lab.host_snapshot(0).expect("snapshot");
    assert_eq!(snap.reservations, vec![keep.ip.to_string()]);
    assert_eq!(snap.endpoints, vec![keep.container_id.clone()]);
    let ours: Vec<_> = snap.links.iter().filter(|l| l.starts_with("lxc")).collect();
    assert_eq!(ours, vec![&keep.host_ifname]);
    assert_eq!(
        ping(&keep.netns, &lab.state.nodes[0].ip.to_string(), 3, &[])
            .expect("ping")
            .received,
        3
    );
}

#[test]
fn exhausted_range_is_a_clear_error_and_leaves_nothing() {
    let mut lab = lab_with(1, 0, |_| {});
    let rt = lab.runtime(0);
    let mut list = lab.conflist(0).expect("conflist");
    list["plugins"][0]["ipam"]["rangeStart"] = "10.244.0.20".into();
    list["plugins"][0]["ipam"]["rangeEnd"] = "10.244.0.21".into();
    let a = attachment(&mut lab, "x1");
    let b = attachment(&mut lab, "x2");
    let c = attachment(&mut lab, "x3");
    let ra = rt.add(&list, &a).expect("run").expect("first");
    let rb = rt.add(&list, &b).expect("run").expect("second");
    assert_eq!(
        [result_ip(&ra), result_ip(&rb)],
        ["10.244.0.20", "10.244.0.21"]
    );
    let before = lab.host_snapshot(0).expect("snapshot");
    let f = rt
        .add(&list, &c)
        .expect("run")
        .expect_err("third must not fit");
    assert_eq!(f.code, 100, "{f}");
    assert!(
        f.msg.contains("no free address") && f.msg.contains("10.244.0.20"),
        "{f}"
    );
    assert_eq!(lab.host_snapshot(0).expect("snapshot"), before);
}

/// Serves "hello from <netns>" on `port` inside `netns` until `stop`.
fn serve(netns: String, port: u16, stop: &AtomicBool) {
    let ns = netns.clone();
    lab::in_netns_thread(&netns, || {
        let listener = lab::bind_retrying(|| TcpListener::bind(("0.0.0.0", port))).expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        while !stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((mut s, _)) => {
                    let _ = s.write_all(format!("hello from {ns}").as_bytes());
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    })
    .expect("server thread");
}

fn fetch(netns: &str, addr: SocketAddr) -> Result<String, String> {
    lab::in_netns_thread(netns, || {
        let mut s =
            TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(2)))
            .map_err(|e| e.to_string())?;
        let mut out = String::new();
        s.read_to_string(&mut out).map_err(|e| e.to_string())?;
        Ok(out)
    })
    .expect("client thread")
}

#[test]
fn chained_before_portmap_host_ports_work_and_del_removes_them() {
    let mut lab = lab_with(1, 0, |s| {
        s.cni_version = Some("1.0.0".into()); // what Debian's portmap speaks
        s.chain = vec!["portmap".into()];
    });
    let mappings = json!({ "portMappings": [{ "hostPort": 30080, "containerPort": 8080, "protocol": "tcp" }] });
    lab.add_pod_with(0, "web", mappings)
        .expect("ADD through the chain");
    let pod = lab.pod("web").clone();
    // portmap passes our result through.
    assert_eq!(result_ip(&pod.result), pod.ip.to_string());
    assert_eq!(pod.result["cniVersion"], "1.0.0");

    let stop = AtomicBool::new(false);
    let ext = lab.state.external.clone().expect("external host");
    let node_ip = lab.state.nodes[0].ip;
    std::thread::scope(|s| {
        s.spawn(|| serve(pod.netns.clone(), 8080, &stop));
        let target = SocketAddr::from((node_ip, 30080));
        let deadline = Instant::now() + Duration::from_secs(5);
        let reply = loop {
            match fetch(&ext.netns, target) {
                Ok(r) => break Ok(r),
                Err(e) if Instant::now() > deadline => break Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        assert_eq!(
            reply,
            Ok(format!("hello from {}", pod.netns)),
            "external -> node:30080 -> pod:8080"
        );

        lab.remove_pod("web").expect("DEL through the chain");
        assert!(
            fetch(&ext.netns, target).is_err(),
            "host port still forwarded after DEL"
        );
        stop.store(true, Ordering::Relaxed);
    });
    assert!(
        lab.host_snapshot(0)
            .expect("snapshot")
            .reservations
            .is_empty()
    );
}

#[test]
fn install_writes_the_plugin_and_conflist_atomically() {
    let spec = LabSpec::new(0, 0).expect("spec");
    let dir = std::env::temp_dir().join(format!("dp-cni-install-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (bin, conf) = (dir.join("bin"), dir.join("net.d"));
    for _ in 0..2 {
        let out = Command::new(&spec.cni_bin)
            .arg("install")
            .arg("--bin-dir")
            .arg(&bin)
            .arg("--conf-dir")
            .arg(&conf)
            .args([
                "--mtu",
                "1400",
                "--chain",
                "portmap",
                "--agent-socket",
                "/run/x.sock",
            ])
            .output()
            .expect("install");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let list: Value = serde_json::from_slice(
        &std::fs::read(conf.join("05-dataplane.conflist")).expect("conflist"),
    )
    .expect("json");
    // 1.0.0 by default: containerd 1.6 (Debian 12's) refuses 1.1.0 results.
    assert_eq!(list["cniVersion"], "1.0.0");
    assert_eq!(list["name"], "dataplane");
    assert_eq!(
        list["plugins"][0],
        json!({"type": "dataplane-cni", "agentSocket": "/run/x.sock", "mtu": 1400})
    );
    assert_eq!(list["plugins"][1]["type"], "portmap");
    let version = Command::new(bin.join("dataplane-cni"))
        .env("CNI_COMMAND", "VERSION")
        .output()
        .expect("run");
    assert!(String::from_utf8_lossy(&version.stdout).contains("supportedVersions"));
    let leftovers: Vec<_> = [&bin, &conf]
        .iter()
        .flat_map(|d| std::fs::read_dir(d).expect("dir").flatten())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let bad = Command::new(&spec.cni_bin)
        .args(["install", "--mtu"])
        .output()
        .expect("run");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--mtu needs a value"));
    std::fs::remove_dir_all(&dir).expect("cleanup");
}
