//! Which files of a manifest directory hold manifests: the agent's
//! directory source, `dataplane validate` and the lab read the same ones.

use std::{
    io,
    path::{Path, PathBuf},
};

/// A manifest file: `*.yaml`, `*.yml` or `*.json`, not hidden (editors'
/// and atomic writers' temporary files start with a dot).
pub fn is_manifest(p: &Path) -> bool {
    let hidden = p
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'));
    !hidden
        && matches!(
            p.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "json")
        )
}

/// The manifest files of directory `dir`, in name order.
pub fn files_in(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| is_manifest(p))
        .collect();
    out.sort();
    Ok(out)
}
