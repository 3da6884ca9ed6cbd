//! Runs CNI plugins the way a runtime (libcni) does: the plugin binary found
//! on CNI_PATH, `CNI_*` in the environment, the network config on stdin, the
//! result or error as JSON on stdout. Conflists run in order on ADD (each
//! plugin gets the previous result as `prevResult`) and in reverse on DEL,
//! CHECK likewise with the cached result. The plugin runs in the node's
//! network namespace, as a runtime on that node would run it.

use std::{
    io::Write as _,
    path::PathBuf,
    process::{Child, Command, Stdio},
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

/// A plugin's answer when it failed: the spec error object and exit status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniFailure {
    pub code: u64,
    pub msg: String,
    pub details: String,
    pub stderr: String,
}

impl std::fmt::Display for CniFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CNI error {}: {} ({}) {}",
            self.code, self.msg, self.details, self.stderr
        )
    }
}

impl std::error::Error for CniFailure {}

/// What the runtime knows about one attachment.
#[derive(Debug, Clone)]
pub struct Attachment {
    pub container_id: String,
    pub netns: PathBuf,
    pub ifname: String,
    /// `CNI_ARGS` pairs, e.g. K8S_POD_NAME.
    pub args: Vec<(String, String)>,
    /// `runtimeConfig` for plugins that declare capabilities (portMappings, ...).
    pub runtime_config: Value,
}

#[derive(Debug, Clone)]
pub struct Runtime {
    /// Directories searched for plugin binaries.
    pub cni_path: Vec<PathBuf>,
    /// Network namespace the plugins run in (`ip netns` name), or the caller's.
    pub netns: Option<String>,
    /// Extra environment for every plugin run (fault injection in tests).
    pub env: Vec<(String, String)>,
}

impl Runtime {
    fn find(&self, plugin: &str) -> Result<PathBuf> {
        self.cni_path
            .iter()
            .map(|d| d.join(plugin))
            .find(|p| p.is_file())
            .with_context(|| format!("plugin {plugin:?} not found in {:?}", self.cni_path))
    }

    /// Starts one plugin run and returns the child (stdin already written),
    /// for tests that need to interfere with a run in flight.
    pub fn spawn(
        &self,
        command: &str,
        plugin: &str,
        conf: &Value,
        at: Option<&Attachment>,
    ) -> Result<Child> {
        let bin = self.find(plugin)?;
        let mut cmd = match &self.netns {
            Some(ns) => crate::in_netns(ns, &bin),
            None => Command::new(&bin),
        };
        cmd.env("CNI_COMMAND", command)
            .env("CNI_PATH", std::env::join_paths(&self.cni_path)?)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(at) = at {
            let args: Vec<String> = at.args.iter().map(|(k, v)| format!("{k}={v}")).collect();
            cmd.env("CNI_CONTAINERID", &at.container_id)
                .env("CNI_NETNS", &at.netns)
                .env("CNI_IFNAME", &at.ifname)
                .env("CNI_ARGS", args.join(";"));
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("running {}", bin.display()))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(&serde_json::to_vec(conf)?)?;
        }
        Ok(child)
    }

    /// One plugin run with raw environment control: `env` pairs replace the
    /// attachment's (for bad-input tests). Returns stdout JSON or the failure.
    pub fn exec_raw(
        &self,
        plugin: &str,
        env: &[(&str, &str)],
        stdin: &[u8],
    ) -> Result<std::result::Result<Value, CniFailure>> {
        let bin = self.find(plugin)?;
        let mut cmd = match &self.netns {
            Some(ns) => crate::in_netns(ns, &bin),
            None => Command::new(&bin),
        };
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn()?;
        if let Some(mut s) = child.stdin.take() {
            s.write_all(stdin)?;
        }
        finish(child)
    }

    fn exec(
        &self,
        command: &str,
        plugin: &str,
        conf: &Value,
        at: Option<&Attachment>,
    ) -> Result<std::result::Result<Value, CniFailure>> {
        finish(self.spawn(command, plugin, conf, at)?)
    }

    /// The config a plugin of a conflist sees: its own object plus the list's
    /// name and version, the previous result, and runtimeConfig for its
    /// declared capabilities.
    fn plugin_conf(
        list: &Value,
        plugin: &Value,
        prev: Option<&Value>,
        at: Option<&Attachment>,
    ) -> Value {
        let mut conf = plugin.clone();
        conf["name"] = list["name"].clone();
        conf["cniVersion"] = list["cniVersion"].clone();
        if let Some(prev) = prev {
            conf["prevResult"] = prev.clone();
        }
        if let (Some(caps), Some(at)) = (plugin["capabilities"].as_object(), at) {
            let mut rc = json!({});
            for (cap, enabled) in caps {
                if enabled.as_bool() == Some(true) && !at.runtime_config[cap].is_null() {
                    rc[cap] = at.runtime_config[cap].clone();
                }
            }
            conf["runtimeConfig"] = rc;
        }
        conf
    }

    fn plugins(list: &Value) -> Result<Vec<Value>> {
        list["plugins"]
            .as_array()
            .cloned()
            .context("conflist has no plugins array")
    }

    pub fn add(
        &self,
        list: &Value,
        at: &Attachment,
    ) -> Result<std::result::Result<Value, CniFailure>> {
        let mut prev: Option<Value> = None;
        for plugin in Self::plugins(list)? {
            let conf = Self::plugin_conf(list, &plugin, prev.as_ref(), Some(at));
            match self.exec("ADD", plugin_type(&plugin)?, &conf, Some(at))? {
                Ok(result) => prev = Some(result),
                Err(f) => return Ok(Err(f)),
            }
        }
        prev.context("empty conflist").map(Ok)
    }

    /// DEL in reverse order with the cached ADD result; like libcni, the
    /// first failure ends it.
    pub fn del(
        &self,
        list: &Value,
        at: &Attachment,
        cached: Option<&Value>,
    ) -> Result<std::result::Result<(), CniFailure>> {
        for plugin in Self::plugins(list)?.iter().rev() {
            let conf = Self::plugin_conf(list, plugin, cached, Some(at));
            if let Err(f) = self.exec("DEL", plugin_type(plugin)?, &conf, Some(at))? {
                return Ok(Err(f));
            }
        }
        Ok(Ok(()))
    }

    pub fn check(
        &self,
        list: &Value,
        at: &Attachment,
        cached: &Value,
    ) -> Result<std::result::Result<(), CniFailure>> {
        for plugin in Self::plugins(list)? {
            let conf = Self::plugin_conf(list, &plugin, Some(cached), Some(at));
            if let Err(f) = self.exec("CHECK", plugin_type(&plugin)?, &conf, Some(at))? {
                return Ok(Err(f));
            }
        }
        Ok(Ok(()))
    }

    /// STATUS (1.1.0): every plugin of the list.
    pub fn status(&self, list: &Value) -> Result<std::result::Result<(), CniFailure>> {
        for plugin in Self::plugins(list)? {
            let conf = Self::plugin_conf(list, &plugin, None, None);
            if let Err(f) = self.exec("STATUS", plugin_type(&plugin)?, &conf, None)? {
                return Ok(Err(f));
            }
        }
        Ok(Ok(()))
    }

    /// GC (1.1.0) with the attachments the runtime still has.
    pub fn gc(
        &self,
        list: &Value,
        valid: &[(&str, &str)],
    ) -> Result<std::result::Result<(), CniFailure>> {
        let valid: Vec<Value> = valid
            .iter()
            .map(|(c, i)| json!({ "containerID": c, "ifname": i }))
            .collect();
        for plugin in Self::plugins(list)? {
            let mut conf = Self::plugin_conf(list, &plugin, None, None);
            conf["cni.dev/valid-attachments"] = valid.clone().into();
            if let Err(f) = self.exec("GC", plugin_type(&plugin)?, &conf, None)? {
                return Ok(Err(f));
            }
        }
        Ok(Ok(()))
    }
}

fn plugin_type(plugin: &Value) -> Result<&str> {
    plugin["type"].as_str().context("plugin without a type")
}

/// Collects a run: success is exit 0 (stdout JSON, or null when empty);
/// failure must be a non-zero exit with a spec error object on stdout.
pub fn finish(child: Child) -> Result<std::result::Result<Value, CniFailure>> {
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if out.status.success() {
        if stdout.trim().is_empty() {
            return Ok(Ok(Value::Null));
        }
        return Ok(Ok(serde_json::from_str(&stdout).with_context(|| {
            format!("plugin printed non-JSON: {stdout:?}")
        })?));
    }
    let err: Value = serde_json::from_str(&stdout).with_context(|| {
        format!(
            "plugin failed ({}) without a JSON error: stdout {stdout:?} stderr {stderr:?}",
            out.status
        )
    })?;
    let Some(code) = err["code"].as_u64() else {
        bail!("plugin error without a code: {err}");
    };
    Ok(Err(CniFailure {
        code,
        msg: err["msg"].as_str().unwrap_or_default().to_owned(),
        details: err["details"].as_str().unwrap_or_default().to_owned(),
        stderr,
    }))
}
