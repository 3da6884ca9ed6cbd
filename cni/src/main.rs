//! `dataplane-cni`: the CNI plugin (spec 1.1.0; 0.4.0 and 1.0.0 configs too).
//!
//! The runtime sets `CNI_COMMAND` and friends and passes the network config
//! on stdin; the result, or an error with a spec code, goes to stdout as
//! JSON. ADD wires a veth into the pod, gives it an address from the node's
//! pod CIDR and registers it with the node agent, which attaches the
//! datapath before ADD returns. `dataplane-cni install` puts the binary and
//! a conflist in place (the DaemonSet's init container runs it).

mod commands;
mod config;
mod error;
mod install;
mod ipam;
mod netlink;

use std::io::{Read as _, Write as _};

use config::{Env, NetConf, SUPPORTED_VERSIONS};
use error::{CniError, code};

/// What we answer VERSION with and report errors in when the config's own
/// version is unknown.
pub const CNI_VERSION: &str = "1.1.0";

/// The version `install` writes: every supported runtime accepts a 1.0.0
/// result (containerd 1.6's libcni refuses 1.1.0), as the big CNIs do.
pub const INSTALL_VERSION: &str = "1.0.0";

fn print_json(value: &serde_json::Value) {
    let mut out = std::io::stdout().lock();
    // Nothing useful to do if stdout is gone: the runtime has given up on us.
    let _ = serde_json::to_writer(&mut out, value);
    let _ = out.write_all(b"\n");
}

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("install") {
        if let Err(e) = install::run(&argv[2..]) {
            eprintln!("dataplane-cni install: {e}");
            std::process::exit(1);
        }
        return;
    }
    let env = Env::from_process();
    let mut stdin = Vec::new();
    let (version, outcome) = run(&env, &mut stdin);
    match outcome {
        Ok(Some(result)) => print_json(&result),
        Ok(None) => {}
        Err(e) => {
            print_json(&e.to_json(&version));
            std::process::exit(1);
        }
    }
}

/// Returns the version to report errors in, and the outcome.
fn run(env: &Env, stdin: &mut Vec<u8>) -> (String, error::Result<Option<serde_json::Value>>) {
    if env.command == "VERSION" {
        return (
            CNI_VERSION.into(),
            Ok(Some(
                serde_json::json!({ "cniVersion": CNI_VERSION, "supportedVersions": SUPPORTED_VERSIONS }),
            )),
        );
    }
    if let Err(e) = std::io::stdin().read_to_end(stdin) {
        return (
            CNI_VERSION.into(),
            Err(CniError::new(code::IO, "reading the network configuration from stdin").details(e)),
        );
    }
    // Errors are reported in the config's version when it has a usable one.
    let version = serde_json::from_slice::<serde_json::Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str().map(str::to_owned))
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| CNI_VERSION.into());
    let outcome = NetConf::parse(stdin).and_then(|conf| match env.command.as_str() {
        "ADD" => commands::add(env, &conf).map(Some),
        "DEL" => commands::del(env, &conf).map(|()| None),
        "CHECK" => commands::check(env, &conf).map(|()| None),
        "STATUS" => commands::status(&conf).map(|()| None),
        "GC" => commands::gc(&conf).map(|()| None),
        "" => Err(CniError::new(code::INVALID_ENV, "CNI_COMMAND is not set")),
        other => Err(CniError::new(
            code::INVALID_ENV,
            format!("CNI_COMMAND {other:?} is not a CNI command"),
        )),
    });
    (version, outcome)
}
