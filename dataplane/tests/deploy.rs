//! The deploy manifests against the code they deploy: every manifest is
//! read strictly into its Kubernetes type, the DaemonSet's command lines
//! go through the agent's own parser with the ConfigMap as its config, the
//! ClusterRole is what the watchers use, and the image, the kustomization
//! and the DaemonSet name the same things.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use dataplane::{agent::config, cli::Cli, source_kube};
use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{ConfigMap, Container, Namespace, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use serde::de::DeserializeOwned;
use serde_json::Value;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .join("deploy")
}

fn documents(file: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(file).expect("read manifest");
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| {
            <Value as serde::Deserialize>::deserialize(d)
                .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// Fields of `orig` that the typed round trip lost or changed: k8s-openapi
/// ignores unknown fields, so this is what makes the reading strict.
fn lost(orig: &Value, round: &Value, path: &str, out: &mut Vec<String>) {
    match (orig, round) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                match b.get(k) {
                    Some(w) => lost(v, w, &format!("{path}.{k}"), out),
                    None => out.push(format!("{path}.{k}: unknown field")),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (v, w)) in a.iter().zip(b).enumerate() {
                lost(v, w, &format!("{path}[{i}]"), out);
            }
        }
        (a, b) if a != b => out.push(format!("{path}: {a} read as {b}")),
        _ => {}
    }
}

fn strict<T: DeserializeOwned + serde::Serialize>(doc: &Value, what: &str) -> Result<T, String> {
    let typed: T = serde_path_to_error::deserialize(doc.clone())
        .map_err(|e| format!("{what}: {}: {}", e.path(), e.inner()))?;
    let round = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    lost(doc, &round, "", &mut out);
    if out.is_empty() {
        Ok(typed)
    } else {
        Err(format!("{what}: {}", out.join("; ")))
    }
}

/// Every object of every manifest, checked strictly by kind.
#[derive(Default)]
struct Manifests {
    daemonsets: BTreeMap<String, DaemonSet>,
    configmaps: BTreeMap<String, ConfigMap>,
    cluster_roles: BTreeMap<String, ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
    service_accounts: Vec<ServiceAccount>,
    namespaces: Vec<Namespace>,
}

fn read(files: &[PathBuf]) -> Result<Manifests, String> {
    let mut m = Manifests::default();
    for file in files {
        for (i, doc) in documents(file).iter().enumerate() {
            let what = format!("{} document {}", file.display(), i + 1);
            let name = doc["metadata"]["name"].as_str().unwrap_or("").to_owned();
            match doc["kind"].as_str() {
                Some("DaemonSet") => {
                    m.daemonsets.insert(name, strict(doc, &what)?);
                }
                Some("ConfigMap") => {
                    m.configmaps.insert(name, strict(doc, &what)?);
                }
                Some("ClusterRole") => {
                    m.cluster_roles.insert(name, strict(doc, &what)?);
                }
                Some("ClusterRoleBinding") => m.bindings.push(strict(doc, &what)?),
                Some("ServiceAccount") => m.service_accounts.push(strict(doc, &what)?),
                Some("Namespace") => m.namespaces.push(strict(doc, &what)?),
                other => return Err(format!("{what}: unexpected kind {other:?}")),
            }
        }
    }
    Ok(m)
}

/// What a kustomization builds: its resource files (directories followed
/// to their own kustomizations), its `images` and its patch files.
struct Kustomization {
    files: Vec<PathBuf>,
    images: Vec<Value>,
    patches: Vec<PathBuf>,
}

fn kustomize(dir: &Path) -> Kustomization {
    let k = documents(&dir.join("kustomization.yaml"))
        .pop()
        .expect("kustomization");
    let mut out = Kustomization {
        files: Vec::new(),
        images: k["images"].as_array().cloned().unwrap_or_default(),
        patches: Vec::new(),
    };
    for r in k["resources"].as_array().expect("resources") {
        let path = dir
            .join(r.as_str().expect("resource path"))
            .canonicalize()
            .expect("resource exists");
        if path.is_dir() {
            let inner = kustomize(&path);
            out.files.extend(inner.files);
            out.images.extend(inner.images);
            out.patches.extend(inner.patches);
        } else {
            out.files.push(path);
        }
    }
    for p in k["patches"].as_array().into_iter().flatten() {
        out.patches
            .push(dir.join(p["path"].as_str().expect("patch path")));
    }
    out
}

fn installed() -> Manifests {
    read(&kustomize(&deploy_dir()).files).unwrap_or_else(|e| panic!("{e}"))
}

fn uninstall_file() -> PathBuf {
    deploy_dir().join("uninstall").join("uninstall.yaml")
}

#[test]
fn kustomization_applies_every_manifest_and_each_reads_strictly() {
    let k = kustomize(&deploy_dir());
    let base = deploy_dir().join("base");
    let mut on_disk: BTreeSet<PathBuf> = std::fs::read_dir(&base)
        .expect("deploy/base/")
        .map(|e| e.expect("entry").path().canonicalize().expect("path"))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    on_disk.remove(
        &base
            .join("kustomization.yaml")
            .canonicalize()
            .expect("path"),
    );
    assert_eq!(
        k.files.iter().cloned().collect::<BTreeSet<_>>(),
        on_disk,
        "kustomization resources vs deploy/base/*.yaml"
    );
    let m = installed();
    assert_eq!(m.namespaces.len(), 1);
    assert_eq!(m.service_accounts.len(), 1);
    assert_eq!(m.bindings.len(), 1);
    assert_eq!(m.cluster_roles.len(), 1);
    assert_eq!(m.configmaps.len(), 1);
    assert_eq!(m.daemonsets.len(), 1);
    read(&[uninstall_file()]).unwrap_or_else(|e| panic!("{e}"));
    // The image the kustomization sets is the one `cargo xtask image` tags.
    let img = &k.images[0];
    assert_eq!(img["name"], "dataplane");
    assert_eq!(img["newName"], "localhost/dataplane");
    assert_eq!(img["newTag"], env!("CARGO_PKG_VERSION"));

    // The check is strict: an unknown field or a wrong type is named.
    let ds = &documents(&deploy_dir().join("base/daemonset.yaml"))[0];
    let mut typo = ds.clone();
    typo["spec"]["template"]["spec"]["tolerations"][0]["operater"] = "Exists".into();
    let e = strict::<DaemonSet>(&typo, "typo").expect_err("unknown field accepted");
    assert!(
        e.contains(".spec.template.spec.tolerations[0].operater: unknown field"),
        "{e}"
    );
    let mut wrong = ds.clone();
    wrong["spec"]["template"]["spec"]["hostNetwork"] = "yes".into();
    let e = strict::<DaemonSet>(&wrong, "wrong").expect_err("wrong type accepted");
    assert!(e.contains("spec.template.spec.hostNetwork"), "{e}");
}

/// The ConfigMap as its volume presents it: a file per key.
fn config_dir(cm: &ConfigMap, extra: &[(&str, &str)], tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dp-deploy-config-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let data = cm.data.clone().unwrap_or_default();
    for (k, v) in data
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .chain(extra.iter().copied())
    {
        std::fs::write(dir.join(k), v).expect("write key");
    }
    dir
}

/// A container's command line with `$(VAR)` references resolved the way
/// the kubelet does, for the variables the container defines.
fn argv(c: &Container, vars: &[(&str, &str)]) -> Vec<String> {
    let env: BTreeSet<&str> = c.env.iter().flatten().map(|e| e.name.as_str()).collect();
    c.command
        .iter()
        .flatten()
        .chain(c.args.iter().flatten())
        .map(|a| {
            let mut a = a.clone();
            for (k, v) in vars {
                let r = format!("$({k})");
                if a.contains(&r) {
                    assert!(env.contains(k), "{}: {r} without env {k}", c.name);
                    a = a.replace(&r, v);
                }
            }
            assert!(!a.contains("$("), "{}: unresolved {a}", c.name);
            a
        })
        .collect()
}

fn agent_container(ds: &DaemonSet) -> &Container {
    let spec = ds.spec.as_ref().and_then(|s| s.template.spec.as_ref());
    spec.expect("pod spec")
        .containers
        .iter()
        .find(|c| c.name == "agent")
        .expect("agent container")
}

#[test]
fn daemonset_command_line_parses_with_the_agents_parser_and_configmap() {
    let m = installed();
    let ds = &m.daemonsets["dataplane"];
    let cm = &m.configmaps["dataplane-config"];
    let agent = agent_container(ds);
    let env = agent.env.as_ref().expect("env");
    let node_name = env
        .iter()
        .find(|e| e.name == "NODE_NAME")
        .expect("NODE_NAME");
    assert_eq!(
        node_name
            .value_from
            .as_ref()
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.as_str()),
        Some("spec.nodeName")
    );
    let dir = config_dir(cm, &[], "daemonset");
    let mut line = argv(agent, &[("NODE_NAME", "worker-1")]);
    // The config as this test has it, where the pod has the volume.
    let mount = agent
        .volume_mounts
        .iter()
        .flatten()
        .find(|v| v.name == "config")
        .expect("config volume mount");
    let flag = format!("--config={}", mount.mount_path);
    assert!(line.contains(&flag), "{line:?} lacks {flag}");
    line = line
        .into_iter()
        .map(|a| {
            if a == flag {
                format!("--config={}", dir.display())
            } else {
                a
            }
        })
        .collect();
    assert_eq!(line[0], "/usr/bin/dataplane");
    let cli = Cli::parse_with_config(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
    let a = cli.agent_args().expect("an agent command line");
    assert_eq!(a.node, "worker-1");
    assert!(matches!(a.source, dataplane::agent::Source::Kube));
    assert_eq!(a.mode, dataplane::agent::Mode::Vxlan);
    assert_eq!(a.vni, 1);
    assert_eq!(a.vxlan_port, 8472);
    assert_eq!(a.cluster_cidr, "10.244.0.0/16");
    assert_eq!(a.service_cidr, "10.96.0.0/12");
    assert!(a.masquerade);
    assert_eq!(a.pod_mtu, None, "empty keeps the default");

    // Every path the agent uses is inside something the pod mounts.
    let mounts: Vec<&str> = agent
        .volume_mounts
        .iter()
        .flatten()
        .map(|v| v.mount_path.as_str())
        .collect();
    let sysctl = a.sysctl_root.join("net");
    for (what, path) in [
        ("pin-root", a.pin_root.as_path()),
        ("state-dir", a.state_dir.as_path()),
        ("api-socket", a.api_socket.as_path()),
        ("cgroup-root", Path::new(&a.cgroup_root)),
        ("sysctl-root/net", sysctl.as_path()),
    ] {
        assert!(
            mounts.iter().any(|m| path.starts_with(m)),
            "{what} {} is in no volume mount {mounts:?}",
            path.display()
        );
    }
    // The probes ask the port the agent serves on.
    let port = a.metrics_addr.rsplit(':').next().expect("port");
    for (which, probe) in [
        ("liveness", &agent.liveness_probe),
        ("readiness", &agent.readiness_probe),
        ("startup", &agent.startup_probe),
    ] {
        let get = probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .unwrap_or_else(|| panic!("{which} probe"));
        assert_eq!(
            serde_json::to_value(&get.port).expect("port"),
            serde_json::json!(port.parse::<u16>().expect("number")),
            "{which}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);

    // The bpffs init container and the uninstall DaemonSet: same parser.
    let init = ds.spec.as_ref().and_then(|s| s.template.spec.as_ref());
    let init = init.and_then(|s| s.init_containers.as_ref()).expect("init");
    let bpffs = init
        .iter()
        .find(|c| c.name == "mount-bpf-fs")
        .expect("bpffs");
    Cli::parse_with_config(argv(bpffs, &[])).expect("mount-bpffs parses");
    let un = read(&[uninstall_file()]).expect("uninstall");
    let un = un.daemonsets.values().next().expect("uninstall DaemonSet");
    let c = &un
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("spec")
        .containers[0];
    Cli::parse_with_config(argv(c, &[("NODE_NAME", "worker-1")])).expect("uninstall parses");
}

#[test]
fn daemonset_carries_what_a_node_agent_needs() {
    let m = installed();
    let ds = &m.daemonsets["dataplane"];
    let spec = ds.spec.as_ref().expect("spec");
    let pod = spec.template.spec.as_ref().expect("pod spec");
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    let tolerates_all =
        pod.tolerations.iter().flatten().any(|t| {
            t.operator.as_deref() == Some("Exists") && t.key.is_none() && t.effect.is_none()
        });
    assert!(tolerates_all, "runs on every node, tainted ones included");
    let rolling = spec
        .update_strategy
        .as_ref()
        .and_then(|u| u.rolling_update.as_ref())
        .and_then(|r| r.max_unavailable.as_ref());
    assert_eq!(
        serde_json::to_value(rolling).expect("json"),
        serde_json::json!(1)
    );
    let sa = &m.service_accounts[0];
    assert_eq!(
        pod.service_account_name.as_ref(),
        Some(&sa.metadata.name.clone().expect("name"))
    );
    let agent = agent_container(ds);
    let res = agent.resources.as_ref().expect("resources");
    assert!(
        res.requests
            .as_ref()
            .is_some_and(|r| r.contains_key("memory"))
    );
    assert!(
        res.limits
            .as_ref()
            .is_some_and(|r| r.contains_key("memory"))
    );
    let sc = agent.security_context.as_ref().expect("securityContext");
    assert_ne!(sc.privileged, Some(true), "the agent is not privileged");
    let caps = sc.capabilities.as_ref().expect("capabilities");
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    let add: BTreeSet<&str> = caps.add.iter().flatten().map(String::as_str).collect();
    assert!(
        add.is_subset(&BTreeSet::from([
            "NET_ADMIN",
            "BPF",
            "PERFMON",
            "SYS_ADMIN"
        ])),
        "{add:?}"
    );
    // The install-cni init container writes where the runtime looks.
    let init = pod.init_containers.as_ref().expect("init containers");
    let cni = init
        .iter()
        .find(|c| c.name == "install-cni")
        .expect("install-cni");
    let line = argv(cni, &[]);
    assert_eq!(&line[..2], ["/usr/bin/dataplane-cni", "install"]);
    for (flag, volume, host) in [
        ("--bin-dir", "cni-bin", "/opt/cni/bin"),
        ("--conf-dir", "cni-conf", "/etc/cni/net.d"),
    ] {
        let value = line
            .iter()
            .find_map(|a| a.strip_prefix(&format!("{flag}=")))
            .unwrap_or_else(|| panic!("{flag}"));
        let mount = cni
            .volume_mounts
            .iter()
            .flatten()
            .find(|v| v.name == volume)
            .expect("mount");
        assert_eq!(mount.mount_path, value);
        let vol = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == volume)
            .expect("volume");
        assert_eq!(vol.host_path.as_ref().map(|h| h.path.as_str()), Some(host));
    }
}

#[test]
fn cluster_role_grants_exactly_what_the_watchers_use() {
    let m = installed();
    let role = &m.cluster_roles["dataplane"];
    let mut granted: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for rule in role.rules.iter().flatten() {
        assert!(rule.resource_names.is_none() && rule.non_resource_urls.is_none());
        for g in rule.api_groups.iter().flatten() {
            for r in rule.resources.iter().flatten() {
                granted
                    .entry((g.clone(), r.clone()))
                    .or_default()
                    .extend(rule.verbs.iter().cloned());
            }
        }
    }
    let used: BTreeMap<(String, String), BTreeSet<String>> = source_kube::rbac_rules()
        .into_iter()
        .map(|(g, r, v)| ((g, r), v.into_iter().collect()))
        .collect();
    assert_eq!(granted, used);
    assert_eq!(
        used.len(),
        dataplane::cluster::Kind::ALL.len(),
        "every kind of the model is watched"
    );
    // Bound to the agent's service account, in the agent's namespace.
    let b = &m.bindings[0];
    assert_eq!(b.role_ref.name, "dataplane");
    let subject = &b.subjects.as_ref().expect("subjects")[0];
    assert_eq!(subject.kind, "ServiceAccount");
    assert_eq!(
        Some(&subject.name),
        m.service_accounts[0].metadata.name.as_ref()
    );
    assert_eq!(subject.namespace, m.service_accounts[0].metadata.namespace);
}

#[test]
fn every_configmap_key_is_an_agent_setting_and_unknown_keys_are_named() {
    let m = installed();
    let cm = &m.configmaps["dataplane-config"];
    let keys = config::keys();
    let data = cm.data.as_ref().expect("data");
    for k in data.keys() {
        assert!(
            keys.contains(k),
            "ConfigMap key {k} is not an agent setting"
        );
    }
    for k in [
        "mode",
        "vni",
        "vxlan-port",
        "pod-mtu",
        "cluster-cidr",
        "service-cidr",
        "masquerade",
        "log-level",
        "metrics-addr",
    ] {
        assert!(data.contains_key(k), "the ConfigMap lacks {k}");
    }
    // Each documented: a comment right above it.
    let text = std::fs::read_to_string(deploy_dir().join("base/configmap.yaml")).expect("read");
    let lines: Vec<&str> = text.lines().collect();
    for k in data.keys() {
        let i = lines
            .iter()
            .position(|l| l.trim_start().starts_with(&format!("{k}:")))
            .expect("key line");
        let documented = lines[..i]
            .iter()
            .rev()
            .take_while(|l| l.trim_start().starts_with('#') || l.contains(": "))
            .any(|l| l.trim_start().starts_with('#'));
        assert!(documented, "{k} has no comment");
    }
    let dir = config_dir(cm, &[("masqurade", "false")], "unknown");
    let line = [
        "dataplane".to_owned(),
        "agent".into(),
        "--node=n".into(),
        format!("--config={}", dir.display()),
    ];
    let e = Cli::parse_with_config(&line)
        .expect_err("unknown key accepted")
        .to_string();
    assert!(e.contains("unknown key \"masqurade\""), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn image_entry_point_agrees_with_the_daemonsets() {
    let text = std::fs::read_to_string(deploy_dir().join("Containerfile")).expect("Containerfile");
    let instr = |name: &str| -> Vec<String> {
        text.lines()
            .filter(|l| l.starts_with(name))
            .map(|l| l[name.len()..].trim().to_owned())
            .collect()
    };
    assert_eq!(
        instr("FROM "),
        ["scratch"],
        "an empty base: nothing to pull"
    );
    let entry: Vec<String> =
        serde_json::from_str(&instr("ENTRYPOINT ")[0]).expect("exec-form ENTRYPOINT");
    let copies: Vec<String> = instr("COPY ");
    let in_image: BTreeSet<String> = copies
        .iter()
        .flat_map(|c| {
            let parts: Vec<&str> = c.split_whitespace().collect();
            let (dest, srcs) = parts.split_last().expect("COPY src dest");
            srcs.iter()
                .map(|s| {
                    format!(
                        "{dest}{}",
                        Path::new(s).file_name().expect("name").to_string_lossy()
                    )
                })
                .collect::<Vec<_>>()
        })
        .collect();
    let m = installed();
    let ds = &m.daemonsets["dataplane"];
    let agent = agent_container(ds);
    assert_eq!(agent.command.as_ref(), Some(&entry));
    let un = read(&[uninstall_file()]).expect("uninstall");
    let pod = ds
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("pod");
    let upod = un.daemonsets.values().next().and_then(|d| d.spec.as_ref());
    let upod = upod.and_then(|s| s.template.spec.as_ref()).expect("pod");
    for c in pod
        .containers
        .iter()
        .chain(pod.init_containers.iter().flatten())
        .chain(&upod.containers)
    {
        let cmd = &c.command.as_ref().expect("explicit command")[0];
        assert!(
            in_image.contains(cmd),
            "{}: {cmd} not in {in_image:?}",
            c.name
        );
        if c.image.as_deref() != Some("dataplane") {
            // Outside the kustomization: the tag xtask builds.
            assert_eq!(
                c.image.as_deref(),
                Some(&*format!(
                    "localhost/dataplane:{}",
                    env!("CARGO_PKG_VERSION")
                ))
            );
        }
    }
    // kubectl renders the kustomization where it is installed.
    if let Ok(out) = std::process::Command::new("kubectl")
        .args(["kustomize"])
        .arg(deploy_dir())
        .output()
    {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("image: localhost/dataplane:"), "{text}");
    } else {
        println!("kubectl is not installed: the kustomization was checked by this test alone");
    }
}

/// The overlays under deploy/examples/: each builds on deploy/base, and
/// the ConfigMap it patches still configures an agent that parses.
#[test]
fn example_overlays_build_on_the_base_and_their_config_parses() {
    let m = installed();
    let base_cm = &m.configmaps["dataplane-config"];
    let ds = &m.daemonsets["dataplane"];
    let mut seen = 0;
    for e in std::fs::read_dir(deploy_dir().join("examples")).expect("examples") {
        let dir = e.expect("entry").path();
        if !dir.join("kustomization.yaml").is_file() {
            continue;
        }
        seen += 1;
        let k = kustomize(&dir);
        assert_eq!(k.files, kustomize(&deploy_dir()).files, "{}", dir.display());
        let mut cm = base_cm.clone();
        let mut added_caps: Vec<String> = Vec::new();
        for p in &k.patches {
            for doc in documents(p) {
                if doc["kind"] == "DaemonSet" {
                    // Only the agent's capabilities, all of the base's kept.
                    assert_eq!(doc["metadata"]["name"], "dataplane");
                    let patch: DaemonSet =
                        strict(&doc, &p.display().to_string()).unwrap_or_else(|e| panic!("{e}"));
                    let c = &patch
                        .spec
                        .expect("spec")
                        .template
                        .spec
                        .expect("pod")
                        .containers;
                    assert_eq!(c.len(), 1, "{}", p.display());
                    assert_eq!(c[0].name, agent_container(ds).name);
                    let caps = |c: &k8s_openapi::api::core::v1::Container| {
                        c.security_context
                            .as_ref()
                            .and_then(|s| s.capabilities.as_ref())
                            .and_then(|c| c.add.clone())
                            .unwrap_or_default()
                    };
                    let (base, patched) = (caps(agent_container(ds)), caps(&c[0]));
                    for b in &base {
                        assert!(patched.contains(b), "{}: drops {b}", p.display());
                    }
                    added_caps.extend(patched.into_iter().filter(|c| !base.contains(c)));
                    continue;
                }
                assert_eq!(doc["kind"], "ConfigMap", "{}", p.display());
                assert_eq!(doc["metadata"]["name"], "dataplane-config");
                let patch: ConfigMap =
                    strict(&doc, &p.display().to_string()).unwrap_or_else(|e| panic!("{e}"));
                cm.data
                    .get_or_insert_with(Default::default)
                    .extend(patch.data.unwrap_or_default());
            }
        }
        let tag = dir
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        let conf = config_dir(&cm, &[], &tag);
        let mut line = argv(agent_container(ds), &[("NODE_NAME", "worker-1")]);
        for a in &mut line {
            if a.starts_with("--config=") {
                *a = format!("--config={}", conf.display());
            }
        }
        let cli =
            Cli::parse_with_config(&line).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let a = cli.agent_args().expect("agent");
        if dir.ends_with("kube-proxy-free") {
            assert_eq!(a.mode, dataplane::agent::Mode::Native);
            assert_eq!(a.k8s_api_server.as_deref(), Some("192.168.1.10:6443"));
        }
        if dir.ends_with("bgp") {
            assert_eq!(a.mode, dataplane::agent::Mode::Native);
            assert_eq!(a.bgp, dataplane::agent::OnOff::On);
            assert_eq!(a.bgp_asn, 64512);
            assert_eq!(
                a.bgp_peers
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>(),
                ["10.0.0.1:65000"]
            );
            assert!(a.bgp_advertise_services);
            // The BGP port is privileged.
            assert_eq!(added_caps, ["NET_BIND_SERVICE"]);
        } else {
            assert!(added_caps.is_empty(), "{}: {added_caps:?}", dir.display());
        }
        let _ = std::fs::remove_dir_all(&conf);
    }
    assert!(seen >= 1, "no overlay under deploy/examples");
}
