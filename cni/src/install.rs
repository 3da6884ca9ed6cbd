//! `dataplane-cni install`: what the DaemonSet's init container runs. Copies
//! this binary into the runtime's plugin directory and writes the conflist,
//! both atomically (temporary file, then rename), so a runtime never sees a
//! half-written plugin or config.

use std::{
    fs,
    path::{Path, PathBuf},
};

use serde_json::json;

const USAGE: &str = "usage: dataplane-cni install [--bin-dir DIR] [--conf-dir DIR] [--conf-name NAME] \
[--network NAME] [--agent-socket PATH] [--ipam-dir DIR] [--mtu N] [--cni-version V] [--chain PLUGIN]...";

struct Options {
    bin_dir: PathBuf,
    conf_dir: PathBuf,
    conf_name: String,
    network: String,
    agent_socket: String,
    ipam_dir: Option<String>,
    mtu: Option<u32>,
    cni_version: String,
    chain: Vec<String>,
}

fn parse(args: &[String]) -> Result<Options, String> {
    let mut o = Options {
        bin_dir: dataplane_common::api::CNI_BIN_DIR.into(),
        conf_dir: dataplane_common::api::CNI_CONF_DIR.into(),
        conf_name: dataplane_common::api::CNI_CONF_NAME.into(),
        network: "dataplane".into(),
        agent_socket: dataplane_common::api::DEFAULT_SOCKET.into(),
        ipam_dir: None,
        mtu: None,
        cni_version: crate::INSTALL_VERSION.into(),
        chain: Vec::new(),
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))
        };
        match flag.as_str() {
            "--bin-dir" => o.bin_dir = value()?.into(),
            "--conf-dir" => o.conf_dir = value()?.into(),
            "--conf-name" => o.conf_name = value()?,
            "--network" => o.network = value()?,
            "--agent-socket" => o.agent_socket = value()?,
            "--ipam-dir" => o.ipam_dir = Some(value()?),
            "--mtu" => o.mtu = Some(value()?.parse().map_err(|e| format!("--mtu: {e}"))?),
            "--cni-version" => {
                let v = value()?;
                if !crate::config::SUPPORTED_VERSIONS.contains(&v.as_str()) {
                    return Err(format!(
                        "--cni-version {v} is not one of {:?}",
                        crate::config::SUPPORTED_VERSIONS
                    ));
                }
                o.cni_version = v;
            }
            "--chain" => o.chain.push(value()?),
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    Ok(o)
}

fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = path
        .parent()
        .ok_or_else(|| format!("{} has no parent directory", path.display()))?;
    fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("x"),
        std::process::id()
    ));
    let result = (|| -> std::io::Result<()> {
        fs::write(&tmp, bytes)?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))?;
        fs::File::open(&tmp)?.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(|e| format!("writing {}: {e}", path.display()))
}

pub fn run(args: &[String]) -> Result<(), String> {
    let o = parse(args)?;
    let exe = std::env::current_exe().map_err(|e| format!("finding this binary: {e}"))?;
    let bytes = fs::read(&exe).map_err(|e| format!("reading {}: {e}", exe.display()))?;
    let bin = o.bin_dir.join(dataplane_common::api::CNI_PLUGIN);
    write_atomic(&bin, &bytes, 0o755)?;

    let mut plugin = json!({ "type": "dataplane-cni", "agentSocket": o.agent_socket });
    if let Some(mtu) = o.mtu {
        plugin["mtu"] = mtu.into();
    }
    if let Some(dir) = &o.ipam_dir {
        plugin["ipam"] = json!({ "dataDir": dir });
    }
    let mut plugins = vec![plugin];
    for name in &o.chain {
        plugins.push(match name.as_str() {
            "portmap" => json!({ "type": "portmap", "capabilities": { "portMappings": true } }),
            "bandwidth" => json!({ "type": "bandwidth", "capabilities": { "bandwidth": true } }),
            other => json!({ "type": other }),
        });
    }
    let conflist = json!({ "cniVersion": o.cni_version, "name": o.network, "plugins": plugins });
    let conf = o.conf_dir.join(&o.conf_name);
    let text = serde_json::to_string_pretty(&conflist).map_err(|e| e.to_string())? + "\n";
    write_atomic(&conf, text.as_bytes(), 0o644)?;
    eprintln!("installed {} and {}", bin.display(), conf.display());
    Ok(())
}
