//! The DaemonSet's promises, kept on real nodes: the agent runs with
//! exactly the capabilities `deploy/base/daemonset.yaml` gives it, behind a
//! read-only `/proc/sys` as in a container, and each of those capabilities
//! is needed; `dataplane uninstall` removes everything from a node. Needs
//! root.

use std::{path::PathBuf, process::Command};

use lab::{Lab, LabSpec, ping};
use serde_json::Value;

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_owned()
}

/// The agent container's added capabilities, from the manifest.
fn daemonset_capabilities() -> Vec<String> {
    let text =
        std::fs::read_to_string(workspace().join("deploy/base/daemonset.yaml")).expect("read");
    let ds: Value = serde_yaml_ng::from_str(&text).expect("yaml");
    let agent = ds["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers")
        .iter()
        .find(|c| c["name"] == "agent")
        .expect("agent container")
        .clone();
    let caps = &agent["securityContext"]["capabilities"];
    assert_eq!(caps["drop"], serde_json::json!(["ALL"]));
    caps["add"]
        .as_array()
        .expect("add")
        .iter()
        .map(|c| c.as_str().expect("name").to_lowercase())
        .collect()
}

/// What a container does to the agent: the node's network namespace
/// entered for it, `/proc/sys` read-only with the host's `/proc/sys/net`
/// mounted writable at `sysctls` (as the DaemonSet mounts it), no new
/// privileges, and only `caps` (as uid 0 without them, which is what
/// `capabilities: {drop: [ALL], add: …}` gives).
fn container_like(caps: &[String], sysctls: &std::path::Path) -> Vec<String> {
    let script = r#"set -e
mkdir -p "$SYSCTLS/net"
mount --bind /proc/sys/net "$SYSCTLS/net"
mount --bind /proc/sys /proc/sys
mount -o remount,bind,ro /proc/sys
exec setpriv --no-new-privs --inh-caps=-all --ambient-caps=-all --bounding-set="$CAPS" -- "$@""#;
    let bounding = std::iter::once("-all".to_owned())
        .chain(caps.iter().map(|c| format!("+{c}")))
        .collect::<Vec<_>>()
        .join(",");
    // nsenter, not `ip netns exec`, which would remount /sys without the
    // bpffs and cgroup mounts a DaemonSet's volumes provide.
    vec![
        "nsenter".into(),
        "--net=/run/netns/{netns}".into(),
        "unshare".into(),
        "--mount".into(),
        "--propagation".into(),
        "private".into(),
        "env".into(),
        format!("SYSCTLS={}", sysctls.display()),
        format!("CAPS={bounding}"),
        "sh".into(),
        "-c".into(),
        script.into(),
        "sh".into(),
    ]
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dp-deploy-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

fn lab_with(caps: &[String], sysctls: &std::path::Path, sysctl_flag: bool) -> anyhow::Result<Lab> {
    let mut spec = LabSpec::new(2, 1)?;
    spec.agent_wrapper = container_like(caps, sysctls);
    // As the ConfigMap has it.
    spec.agent_args.push("--uplink=auto".into());
    if sysctl_flag {
        spec.agent_args
            .push(format!("--sysctl-root={}", sysctls.display()));
    }
    Lab::up(&spec)
}

#[test]
fn agent_runs_with_exactly_the_daemonsets_capabilities() {
    let caps = daemonset_capabilities();
    assert!(!caps.contains(&"sys_admin".to_owned()), "{caps:?}");
    let sysctls = temp_dir("sysctls");
    {
        let lab = lab_with(&caps, &sysctls, true).expect("lab with the DaemonSet's capabilities");
        let (a, b) = (lab.pod("pod-0-0").clone(), lab.pod("pod-1-0").clone());
        assert_eq!(
            ping(&a.netns, &b.ip.to_string(), 3, &[])
                .expect("ping")
                .received,
            3,
            "pods across nodes"
        );
        // The agent really ran with those and no more.
        let pid = lab.state.nodes[0].agent_pid.expect("pid");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        let eff = status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .map(|v| u64::from_str_radix(v.trim(), 16).expect("hex"))
            .expect("CapEff");
        // CAP_NET_ADMIN 12, CAP_PERFMON 38, CAP_BPF 39.
        let want: u64 = caps
            .iter()
            .map(|c| match c.as_str() {
                "net_admin" => 1 << 12,
                "perfmon" => 1 << 38,
                "bpf" => 1 << 39,
                other => panic!("unexpected capability {other}"),
            })
            .sum();
        assert_eq!(eff, want, "CapEff {eff:#x}");
    }
    // Each one is needed: without it the agent refuses to start, saying
    // what it could not do.
    for missing in &caps {
        let fewer: Vec<String> = caps.iter().filter(|c| *c != missing).cloned().collect();
        let e = lab_with(&fewer, &sysctls, true)
            .err()
            .unwrap_or_else(|| panic!("the agent ran without {missing}"));
        let msg = format!("{e:#}");
        assert!(msg.contains("exited"), "without {missing}: {msg}");
        println!(
            "without {missing}: {}",
            msg.lines().rev().take(4).collect::<Vec<_>>().join(" / ")
        );
    }
    // A container's /proc/sys is read-only: the host's, mounted where
    // --sysctl-root says, is what makes the agent work there.
    let e = lab_with(&caps, &sysctls, false)
        .err()
        .expect("the agent wrote to a read-only /proc/sys");
    assert!(
        format!("{e:#}").contains("/proc/sys/net/ipv4/ip_forward"),
        "{e:#}"
    );
    let _ = std::fs::remove_dir_all(&sysctls);
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().expect("run");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn ip_out(args: &[&str]) -> String {
    run(Command::new("ip").args(args)).1
}

#[test]
fn uninstall_removes_the_dataplane_from_a_node() {
    let spec = LabSpec::new(2, 1).expect("spec");
    let mut lab = Lab::up(&spec).expect("lab");
    let (a, b) = (lab.pod("pod-0-0").clone(), lab.pod("pod-1-0").clone());
    assert_eq!(
        ping(&a.netns, &b.ip.to_string(), 2, &[])
            .expect("ping")
            .received,
        2
    );
    let node = lab.state.nodes[0].clone();
    let state_dir = lab.state.run_dir.join(format!("{}-state", node.name));
    // What the install-cni init container puts on a node.
    let cni = temp_dir("cni");
    let (ok, out) = run(Command::new(&spec.cni_bin).args([
        "install",
        "--bin-dir",
        &cni.join("bin").display().to_string(),
        "--conf-dir",
        &cni.join("net.d").display().to_string(),
    ]));
    assert!(ok, "{out}");
    let uninstall = |lab: &Lab| {
        run(Command::new(&lab.state.dataplane_bin).args([
            "--netns",
            &node.netns,
            "uninstall",
            "--node",
            &node.name,
            "--pin-root",
            &lab.state.pin_root.display().to_string(),
            "--state-dir",
            &state_dir.display().to_string(),
            "--api-socket",
            &node.api_socket.display().to_string(),
            "--cni-bin-dir",
            &cni.join("bin").display().to_string(),
            "--cni-conf-dir",
            &cni.join("net.d").display().to_string(),
            "--ipam-dir",
            &node.ipam_dir.display().to_string(),
        ]))
    };
    // Never under a running agent.
    let (ok, out) = uninstall(&lab);
    assert!(!ok && out.contains("an agent answers on"), "{out}");
    assert!(node.pin_dir.exists());

    // The agent gone (as after `kubectl delete -k deploy/`): the datapath
    // still forwards, until the uninstall.
    lab.signal_agent(0, libc::SIGKILL).expect("stop");
    assert_eq!(
        ping(&a.netns, &b.ip.to_string(), 2, &[])
            .expect("ping")
            .received,
        2
    );
    let links_before = std::fs::read_dir(node.pin_dir.join("links"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert!(links_before > 0);
    let (ok, out) = uninstall(&lab);
    assert!(ok, "{out}");
    println!("{out}");
    assert!(
        out.contains(&format!("removed: {links_before} links")),
        "{out}"
    );

    // Nothing is left on the node.
    assert!(!node.pin_dir.exists(), "pins left");
    assert!(
        lab.state.nodes[1].pin_dir.exists(),
        "the other node's pins went too"
    );
    let links = ip_out(&["-n", &node.netns, "-d", "link", "show"]);
    for dev in ["dp_vxlan", "dp_host", "dp_net"] {
        assert!(!links.contains(dev), "{dev} left:\n{links}");
    }
    assert!(!links.contains("prog/xdp"), "XDP left:\n{links}");
    let routes = ip_out(&["-n", &node.netns, "route", "show", "proto", "205"]);
    assert!(routes.trim().is_empty(), "routes left: {routes}");
    let (_, net) =
        run(Command::new("ip").args(["netns", "exec", &node.netns, "bpftool", "net", "show"]));
    for prog in dataplane_common::PROGRAMS {
        assert!(
            !net.contains(prog.name),
            "{} still attached:\n{net}",
            prog.name
        );
    }
    for f in [
        cni.join("bin/dataplane-cni"),
        cni.join("net.d/05-dataplane.conflist"),
        node.ipam_dir.clone(),
        state_dir.join("endpoints.json"),
    ] {
        assert!(!f.exists(), "{} left", f.display());
    }
    // The node's pods lost their network with it; the other node is as it was.
    assert_eq!(
        ping(&a.netns, &b.ip.to_string(), 2, &[])
            .expect("ping")
            .received,
        0
    );
    assert!(lab.state.nodes[1].pin_dir.join("links").exists());
    // A second run finds nothing to do.
    let (ok, out) = uninstall(&lab);
    assert!(
        ok && out.contains("removed: 0 links, 0 clsact filters, 0 routes, devices []"),
        "{out}"
    );
    let _ = std::fs::remove_dir_all(&cni);
}
