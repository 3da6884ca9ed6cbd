//! `dataplane agent --config PATH`: settings from a file or a mounted
//! ConfigMap.
//!
//! A key is an agent flag's long name and its value what the flag takes, so
//! a key means exactly what `dataplane agent --help` says of its flag, and
//! the flag's own parser checks it. A flag given on the command line wins.
//! Per-node settings (the node's name, address and pod CIDR) and one-shot
//! switches are not keys: a cluster-wide ConfigMap must not set them.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use clap::{ArgAction, Args as _, parser::ValueSource};

use super::AgentArgs;

/// Flags that are not config keys: per node, or about this invocation.
const NOT_KEYS: &[&str] = &["node", "node-ip", "pod-cidr", "config", "cleanup", "help"];

/// One key as read: its values (several for a list flag).
#[derive(Debug, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    pub values: Vec<String>,
}

fn command() -> clap::Command {
    AgentArgs::augment_args(clap::Command::new("agent"))
}

/// Every key a config may set, sorted.
pub fn keys() -> Vec<String> {
    let mut keys: Vec<String> = command()
        .get_arguments()
        .filter_map(|a| a.get_long())
        .filter(|l| !NOT_KEYS.contains(l))
        .map(str::to_owned)
        .collect();
    keys.sort();
    keys
}

/// Reads a config: a YAML file of `key: value` (a value may be a list for
/// a list flag) or a directory with a file per key, as a ConfigMap volume
/// is (its `..data` bookkeeping entries are skipped).
pub fn read(path: &Path) -> Result<Vec<Entry>> {
    let meta = std::fs::metadata(path).with_context(|| format!("--config {}", path.display()))?;
    let mut entries = if meta.is_dir() {
        read_dir(path)?
    } else {
        read_file(path)?
    };
    entries.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(entries)
}

fn read_dir(dir: &Path) -> Result<Vec<Entry>> {
    let mut entries = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("--config {}", dir.display()))? {
        let e = e?;
        let key = e.file_name().to_string_lossy().into_owned();
        if key.starts_with('.') {
            continue;
        }
        let file: PathBuf = e.path();
        // Follows the ConfigMap volume's symlinks.
        if !std::fs::metadata(&file)?.is_file() {
            continue;
        }
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("--config: reading {}", file.display()))?;
        entries.push(Entry {
            key,
            values: vec![text.trim().to_owned()],
        });
    }
    Ok(entries)
}

fn scalar(v: &serde_yaml_ng::Value) -> Option<String> {
    use serde_yaml_ng::Value;
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn read_file(path: &Path) -> Result<Vec<Entry>> {
    use serde_yaml_ng::Value;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--config: reading {}", path.display()))?;
    let doc: Value = serde_yaml_ng::from_str(&text)
        .with_context(|| format!("--config {}: not YAML", path.display()))?;
    let map = match doc {
        Value::Mapping(m) => m,
        Value::Null => return Ok(Vec::new()),
        _ => bail!("--config {}: expected a map of key: value", path.display()),
    };
    let mut entries = Vec::new();
    for (k, v) in map {
        let Some(key) = k.as_str().map(str::to_owned) else {
            bail!("--config {}: a key that is not a string", path.display());
        };
        let values = match &v {
            Value::Sequence(items) => items.iter().map(scalar).collect::<Option<Vec<_>>>(),
            v => scalar(v).map(|s| vec![s]),
        }
        .with_context(|| {
            format!(
                "--config {}: key {key}: expected a string, number, boolean or a list of them",
                path.display()
            )
        })?;
        entries.push(Entry { key, values });
    }
    Ok(entries)
}

/// Checks every entry (known key, each value accepted by its flag's
/// parser) and returns them as flags, leaving out those that `given` (the
/// agent subcommand's matches) has from the command line.
pub fn flags(path: &Path, entries: &[Entry], given: &clap::ArgMatches) -> Result<Vec<OsString>> {
    let cmd = command();
    let mut flags = Vec::new();
    for e in entries {
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(e.key.as_str()) && !NOT_KEYS.contains(&e.key.as_str()))
            .with_context(|| {
                format!(
                    "--config {}: unknown key {:?} (known: {})",
                    path.display(),
                    e.key,
                    keys().join(", ")
                )
            })?;
        // ConfigMap values cannot be null: empty stands for "not set".
        if e.values.iter().all(|v| v.trim().is_empty()) {
            continue;
        }
        let list = matches!(arg.get_action(), ArgAction::Append);
        // A list flag also takes one comma- or space-separated value, the
        // natural form in a ConfigMap.
        let values: Vec<String> = if list {
            e.values
                .iter()
                .flat_map(|v| v.split([',', ' ', '\n']))
                .filter(|v| !v.is_empty())
                .map(str::to_owned)
                .collect()
        } else if e.values.len() == 1 {
            e.values.clone()
        } else {
            bail!(
                "--config {}: key {} takes one value, not a list",
                path.display(),
                e.key
            );
        };
        for v in &values {
            // The flag alone through the agent's parser: its own checks.
            command()
                .mut_arg("node", |a| a.required(false))
                .try_get_matches_from(["agent".to_owned(), format!("--{}={v}", e.key)])
                .map_err(|err| {
                    let msg = err.to_string();
                    let msg = msg.lines().next().unwrap_or_default();
                    anyhow::anyhow!(
                        "--config {}: key {}: {}",
                        path.display(),
                        e.key,
                        msg.trim_start_matches("error: ")
                    )
                })?;
        }
        if matches!(
            given.value_source(arg.get_id().as_str()),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        ) {
            tracing::debug!(key = %e.key, "the command line overrides the config");
            continue;
        }
        flags.extend(
            values
                .iter()
                .map(|v| OsString::from(format!("--{}={v}", e.key))),
        );
    }
    Ok(flags)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::FromArgMatches as _;

    fn parse(argv: &[&str], config: &Path) -> Result<AgentArgs> {
        let m = command().try_get_matches_from(argv)?;
        let extra = flags(config, &read(config)?, &m)?;
        let mut all: Vec<OsString> = argv.iter().map(OsString::from).collect();
        all.extend(extra);
        let m = command().try_get_matches_from(all)?;
        Ok(AgentArgs::from_arg_matches(&m)?)
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("dp-config-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("temp dir");
        d
    }

    #[test]
    fn file_sets_and_flags_override() {
        let d = tmp("file");
        let f = d.join("config.yaml");
        std::fs::write(
            &f,
            "mode: native\nvni: 7\nmasquerade: false\nnon-masquerade-cidr: [192.168.0.0/16, 172.16.0.0/12]\nlog-level: debug\n",
        )
        .expect("write");
        let a = parse(&["agent", "--node", "n1", "--vni", "9"], &f).expect("parse");
        assert_eq!(a.mode, super::super::Mode::Native);
        assert_eq!(a.vni, 9, "the flag wins");
        assert!(!a.masquerade);
        assert_eq!(a.non_masquerade_cidrs, ["192.168.0.0/16", "172.16.0.0/12"]);
        assert_eq!(a.log_level, "debug");
        assert_eq!(a.vxlan_port, 8472, "unset keys keep the default");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn configmap_directory() {
        let d = tmp("dir");
        // A ConfigMap volume: keys are symlinks into a timestamped dir.
        let data = d.join("..2026_12_06_00_00_00.1");
        std::fs::create_dir(&data).expect("mkdir");
        std::fs::write(data.join("vxlan-port"), "4789\n").expect("write");
        std::fs::write(
            data.join("non-masquerade-cidr"),
            "10.0.0.0/8,192.168.0.0/16",
        )
        .expect("w");
        std::os::unix::fs::symlink(data.file_name().expect("name"), d.join("..data")).expect("ln");
        for k in ["vxlan-port", "non-masquerade-cidr"] {
            std::os::unix::fs::symlink(format!("..data/{k}"), d.join(k)).expect("ln");
        }
        let a = parse(&["agent", "--node", "n1"], &d).expect("parse");
        assert_eq!(a.vxlan_port, 4789);
        assert_eq!(a.non_masquerade_cidrs, ["10.0.0.0/8", "192.168.0.0/16"]);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn bad_keys_and_values_are_named() {
        let d = tmp("bad");
        let f = d.join("c.yaml");
        for (text, want) in [
            ("masqurade: false\n", "unknown key \"masqurade\""),
            ("node: other\n", "unknown key \"node\""),
            ("vni: lots\n", "key vni: invalid value 'lots'"),
            ("mode: bgp\n", "key mode: invalid value 'bgp'"),
            ("log-level: \"[\"\n", "key log-level"),
            ("vni: [1, 2]\n", "key vni takes one value"),
            ("- a\n", "expected a map"),
        ] {
            std::fs::write(&f, text).expect("write");
            let err = parse(&["agent", "--node", "n1"], &f)
                .err()
                .unwrap_or_else(|| panic!("{text:?} accepted"));
            let msg = format!("{err:#}");
            assert!(msg.contains(want), "{text:?}: {msg}");
            assert!(msg.contains("c.yaml"), "{text:?}: names the file: {msg}");
        }
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn keys_leave_out_per_node_flags() {
        let k = keys();
        for want in [
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
            assert!(k.iter().any(|x| x == want), "{want} missing from {k:?}");
        }
        for not in NOT_KEYS {
            assert!(!k.iter().any(|x| x == not), "{not} is a key");
        }
    }
}
