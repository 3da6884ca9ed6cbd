//! Where things are pinned on bpffs, for any valid Kubernetes node name.
//!
//! bpffs refuses names that contain a dot (`EPERM` from mkdir or pin), yet
//! node names are DNS subdomains (`ip-10-0-1-23.ec2.internal`), and
//! interface names may carry dots too (`eth0.100`). Each path component is
//! therefore escaped (`%` and `.` percent-encoded); names too long to fit
//! one component after escaping are shortened with a hash. The mapping is a
//! pure function of the name, so the CLI finds a node's pins from the name.

use std::path::{Path, PathBuf};

/// bpffs (like most filesystems) caps a name at 255 bytes.
const NAME_MAX: usize = 255;

/// One bpffs path component for `name`.
pub fn escape(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        match c {
            '%' => out.push_str("%25"),
            '.' => out.push_str("%2e"),
            '/' => out.push_str("%2f"),
            c => out.push(c),
        }
    }
    if out.len() <= NAME_MAX {
        return out;
    }
    // Keep a readable prefix; the hash keeps distinct names apart.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let mut cut = NAME_MAX - 17;
    while !out.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}~{h:016x}", &out[..cut])
}

/// The inverse of [`escape`], for display; `None` for hashed names.
pub fn unescape(component: &str) -> Option<String> {
    if component.contains('~') {
        return None;
    }
    Some(
        component
            .replace("%2e", ".")
            .replace("%2f", "/")
            .replace("%25", "%"),
    )
}

/// `<root>/<node, escaped>`: where one node's agent pins its maps and links.
pub fn pin_dir(root: &Path, node: &str) -> PathBuf {
    root.join(escape(node))
}

/// Checks `name` is a valid Kubernetes node name (an RFC 1123 subdomain),
/// so every node the API server accepts is accepted here, and nothing else.
pub fn validate_node_name(name: &str) -> Result<(), String> {
    let bad = |why: &str| {
        Err(format!(
            "{name:?} is not a valid Kubernetes node name: {why}"
        ))
    };
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.len() > 253 {
        return bad("it is longer than 253 characters");
    }
    for label in name.split('.') {
        if label.is_empty() {
            return bad("it has an empty label (two dots, or a dot at an end)");
        }
        if label.len() > 63 {
            return bad("a label is longer than 63 characters");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return bad("only lowercase letters, digits, '-' and '.' are allowed");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return bad("a label starts or ends with '-'");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dots_are_escaped_and_come_back() {
        for name in ["node-1", "ip-10-0-1-23.ec2.internal", "a%b.c"] {
            let e = escape(name);
            assert!(!e.contains('.'), "{e}");
            assert_eq!(unescape(&e).as_deref(), Some(name));
        }
        assert_eq!(escape("node1.example.com"), "node1%2eexample%2ecom");
        assert_ne!(escape("eth0.1"), escape("eth0_1"));
    }

    #[test]
    fn long_names_fit_one_component() {
        let a = format!("{}.x", "a.".repeat(125));
        let b = format!("{}.y", "a.".repeat(125));
        let (ea, eb) = (escape(&a), escape(&b));
        assert!(ea.len() <= NAME_MAX && eb.len() <= NAME_MAX);
        assert_ne!(ea, eb);
        assert_eq!(unescape(&ea), None);
    }

    #[test]
    fn node_names() {
        for ok in ["n0", "node1.example.com", "ip-10-0-1-23.ec2.internal"] {
            assert!(validate_node_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Node", "a..b", "-a", "a_b", ".a", &"x".repeat(64)] {
            assert!(validate_node_name(bad).is_err(), "{bad}");
        }
    }
}
