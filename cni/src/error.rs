//! CNI errors: a code from the spec (or 100+ for this plugin), a message and
//! details, printed as JSON on stdout.

use serde::Serialize;

/// Codes from the CNI specification, section "Error".
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const INVALID_ENV: u32 = 4;
    pub const IO: u32 = 5;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    // Plugin-specific (100+).
    pub const IPAM_EXHAUSTED: u32 = 100;
    pub const NETLINK: u32 = 101;
    pub const AGENT_REJECTED: u32 = 102;
    pub const CHECK_FAILED: u32 = 103;
}

#[derive(Debug, Serialize)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn details(mut self, details: impl std::fmt::Display) -> Self {
        self.details = details.to_string();
        self
    }

    pub fn to_json(&self, cni_version: &str) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        v["cniVersion"] = cni_version.into();
        v
    }
}

impl std::fmt::Display for CniError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{}] {}", self.code, self.msg)?;
        if !self.details.is_empty() {
            write!(f, ": {}", self.details)?;
        }
        Ok(())
    }
}

pub type Result<T> = std::result::Result<T, CniError>;

/// Attaches a code and message to any error.
pub trait Context<T> {
    fn code(self, code: u32, msg: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: std::fmt::Display> Context<T> for std::result::Result<T, E> {
    fn code(self, code: u32, msg: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| CniError::new(code, msg()).details(e))
    }
}
