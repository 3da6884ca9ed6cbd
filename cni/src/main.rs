//! `dataplane-cni`: the CNI plugin.
//!
//! Speaks the CNI protocol (command in `CNI_COMMAND`, network config on
//! stdin, result or error as JSON on stdout). Pod wiring and IPAM land with
//! the CNI issue; until then only VERSION is answered and every other command
//! returns a spec-shaped error saying so.

use std::io::Write as _;

use serde::Serialize;

const SUPPORTED_VERSIONS: &[&str] = &["0.4.0", "1.0.0", "1.1.0"];
const CNI_VERSION: &str = "1.1.0";

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CniError {
    cni_version: &'static str,
    code: u32,
    msg: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    details: String,
}

fn print_json<T: Serialize>(value: &T) {
    let mut out = std::io::stdout().lock();
    // Nothing useful to do if stdout is gone: the runtime has given up on us.
    let _ = serde_json::to_writer(&mut out, value);
    let _ = out.write_all(b"\n");
}

fn main() {
    let command = std::env::var("CNI_COMMAND").unwrap_or_default();
    match command.as_str() {
        "VERSION" => print_json(&serde_json::json!({
            "cniVersion": CNI_VERSION,
            "supportedVersions": SUPPORTED_VERSIONS,
        })),
        other => {
            print_json(&CniError {
                cni_version: CNI_VERSION,
                // 4: "Invalid necessary environment variables" for an unknown
                // command; 100+ is plugin-specific for ones not yet built.
                code: if other.is_empty() { 4 } else { 100 },
                msg: if other.is_empty() {
                    "CNI_COMMAND is not set".into()
                } else {
                    format!("CNI_COMMAND {other} is not implemented by this build")
                },
                details: String::new(),
            });
            std::process::exit(1);
        }
    }
}
