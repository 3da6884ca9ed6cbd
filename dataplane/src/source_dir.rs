//! The manifest-directory source: ordinary multi-document YAML (or JSON)
//! files, watched with inotify, so a person can edit a file and watch the
//! datapath follow.

use std::{
    collections::BTreeMap,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use serde::Deserialize as _;
use tokio::{io::unix::AsyncFd, sync::watch};
use tracing::{info, warn};

use crate::{
    cluster::{self, Key, Kind, Object, Store},
    telemetry,
};

struct FileState {
    stamp: (SystemTime, u64),
    objects: Vec<(Key, Object)>,
}

#[derive(Default)]
pub struct DirSource {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
    /// Objects defined twice, as last reported (reported once, not per scan).
    duplicates: std::collections::BTreeSet<Key>,
}

fn is_manifest(p: &Path) -> bool {
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

impl DirSource {
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            files: BTreeMap::new(),
            duplicates: Default::default(),
        }
    }

    /// Parses one file. `previous` is what it held when it last parsed:
    /// objects that turn invalid keep that version. Returns None when the
    /// file as a whole does not parse (its previous objects then stay).
    fn parse_file(
        path: &Path,
        text: &str,
        previous: &[(Key, Object)],
        errors: &mut u64,
    ) -> Option<Vec<(Key, Object)>> {
        let mut out = Vec::new();
        for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let value = match serde_yaml::Value::deserialize(doc) {
                Ok(serde_yaml::Value::Null) => continue,
                Ok(v) => v,
                Err(e) => {
                    *errors += 1;
                    warn!(file = %path.display(), "document {}: {e}; keeping the file's last good objects", i + 1);
                    return None;
                }
            };
            let json = match serde_json::to_value(&value) {
                Ok(j) => j,
                Err(e) => {
                    *errors += 1;
                    warn!(file = %path.display(), "document {}: {e}; skipped", i + 1);
                    continue;
                }
            };
            let api = json["apiVersion"].as_str().unwrap_or_default().to_owned();
            let kind_name = json["kind"].as_str().unwrap_or_default().to_owned();
            let Some(kind) = Kind::of(&api, &kind_name) else {
                *errors += 1;
                warn!(file = %path.display(), "document {}: unknown kind {kind_name:?} (apiVersion {api:?}); skipped", i + 1);
                continue;
            };
            match cluster::convert(kind, json) {
                Ok(obj) => out.push(obj),
                Err(inv) => {
                    *errors += 1;
                    match &inv.key {
                        Some(key) => {
                            let kept = previous.iter().find(|(k, _)| k == key).cloned();
                            warn!(file = %path.display(), "document {}: {inv}; {}", i + 1,
                                if kept.is_some() { "keeping its last good version" } else { "skipped" });
                            out.extend(kept);
                        }
                        None => {
                            warn!(file = %path.display(), "document {}: {kind_name}: {inv}; skipped", i + 1)
                        }
                    }
                }
            }
        }
        Some(out)
    }

    /// Rereads what changed and returns the store and how many problems were
    /// found (each already logged).
    pub fn scan(&mut self) -> (Store, u64) {
        let mut errors = 0;
        let mut seen = Vec::new();
        let mut paths: Vec<PathBuf> = match std::fs::read_dir(&self.dir) {
            Ok(d) => d
                .flatten()
                .map(|e| e.path())
                .filter(|p| is_manifest(p))
                .collect(),
            Err(e) => {
                warn!(dir = %self.dir.display(), "{e}; keeping the last good objects");
                errors += 1;
                self.files.keys().cloned().collect()
            }
        };
        paths.sort();
        for path in paths {
            seen.push(path.clone());
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            let stamp = (
                meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                meta.len(),
            );
            if self.files.get(&path).is_some_and(|f| f.stamp == stamp) {
                continue;
            }
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) => {
                    errors += 1;
                    warn!(file = %path.display(), "{e}; keeping the file's last good objects");
                    continue;
                }
            };
            let previous = self
                .files
                .get(&path)
                .map(|f| f.objects.as_slice())
                .unwrap_or_default();
            if let Some(objects) = Self::parse_file(&path, &text, previous, &mut errors) {
                self.files.insert(path, FileState { stamp, objects });
            } else if let Some(f) = self.files.get_mut(&path) {
                // Remember the broken version so it is not reparsed and
                // re-reported until it changes again.
                f.stamp = stamp;
            }
        }
        self.files.retain(|p, _| seen.contains(p));
        let mut store = Store::default();
        let mut duplicates = std::collections::BTreeSet::new();
        for (path, f) in &self.files {
            for (key, obj) in &f.objects {
                if store.objects.contains_key(key) {
                    if !self.duplicates.contains(key) {
                        errors += 1;
                        warn!(file = %path.display(), "{key} is defined in more than one place; the first (by file name) wins");
                    }
                    duplicates.insert(key.clone());
                    continue;
                }
                store.objects.insert(key.clone(), obj.clone());
            }
        }
        self.duplicates = duplicates;
        (store, errors)
    }
}

fn inotify(dir: &Path) -> std::io::Result<OwnedFd> {
    // SAFETY: plain syscalls; the fd is owned right away.
    let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())?;
    let mask = libc::IN_CLOSE_WRITE
        | libc::IN_MOVED_TO
        | libc::IN_MOVED_FROM
        | libc::IN_DELETE
        | libc::IN_CREATE
        | libc::IN_DELETE_SELF
        | libc::IN_MOVE_SELF;
    // SAFETY: valid fd and C string.
    if unsafe { libc::inotify_add_watch(owned.as_raw_fd(), path.as_ptr(), mask) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(owned)
}

/// Drains pending events; true when the directory itself went away.
fn drain(fd: &OwnedFd) -> bool {
    let mut buf = [0u8; 4096];
    let mut gone = false;
    loop {
        // SAFETY: reading into our buffer from our fd.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        let Ok(n) = usize::try_from(n) else {
            return gone;
        };
        if n == 0 {
            return gone;
        }
        let mut at = 0;
        while at + 16 <= n {
            let mask = u32::from_ne_bytes([buf[at + 4], buf[at + 5], buf[at + 6], buf[at + 7]]);
            let len = u32::from_ne_bytes([buf[at + 12], buf[at + 13], buf[at + 14], buf[at + 15]])
                as usize;
            if mask & (libc::IN_DELETE_SELF | libc::IN_MOVE_SELF | libc::IN_IGNORED) != 0 {
                gone = true;
            }
            at += 16 + len;
        }
    }
}

/// Publishes the directory's store now and after every change.
pub async fn run(dir: PathBuf, tx: watch::Sender<Option<Store>>, t: telemetry::Shared) {
    let mut source = DirSource::new(dir.clone());
    let mut warned = false;
    loop {
        let fd = match inotify(&dir) {
            Ok(fd) => fd,
            Err(e) => {
                if !warned {
                    warn!(dir = %dir.display(), "cannot watch the manifest directory: {e}; retrying");
                    warned = true;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if warned {
            info!(dir = %dir.display(), "watching the manifest directory");
            warned = false;
        }
        // SAFETY: the OwnedFd stays open and unchanged while AsyncFd owns it.
        let Ok(afd) = (unsafe { AsyncFd::register(fd) }) else {
            return;
        };
        loop {
            let (store, errors) = source.scan();
            for _ in 0..errors {
                telemetry::error(&t, "manifest_invalid");
            }
            tx.send_if_modified(|current| {
                let changed = current.as_ref() != Some(&store);
                if changed {
                    *current = Some(store);
                }
                changed
            });
            let Ok(mut guard) = afd.readable().await else {
                return;
            };
            guard.clear_ready();
            // Editors write in several steps: let them finish.
            tokio::time::sleep(Duration::from_millis(10)).await;
            if drain(afd.get_ref()) {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_files_and_documents_keep_the_last_good_state() {
        let dir = std::env::temp_dir().join(format!("dp-dir-source-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let node = |name: &str, cidr: &str| {
            format!(
                "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\nspec:\n  podCIDR: {cidr}\n"
            )
        };
        std::fs::write(
            dir.join("a.yaml"),
            format!(
                "{}---\n{}",
                node("n1", "10.1.1.0/24"),
                node("n2", "10.1.2.0/24")
            ),
        )
        .unwrap();
        std::fs::write(dir.join("ignored.txt"), "not a manifest").unwrap();
        let mut src = DirSource::new(dir.clone());
        let (store, errors) = src.scan();
        assert_eq!((store.count(Kind::Node), errors), (2, 0));

        // n2 turns invalid, an unknown kind appears: n2 keeps its last good version.
        std::thread::sleep(Duration::from_millis(10));
        std::fs::write(
            dir.join("a.yaml"),
            format!(
                "{}---\n{}---\napiVersion: v9\nkind: Gadget\nmetadata: {{name: g}}\n",
                node("n1", "10.1.1.0/24"),
                node("n2", "10.1.2.7/24")
            ),
        )
        .unwrap();
        let (store2, errors) = src.scan();
        assert_eq!(errors, 2);
        assert_eq!(store2, store);

        // A file that is not YAML at all: everything it had stays.
        std::fs::write(dir.join("a.yaml"), "kind: [unclosed").unwrap();
        let (store3, errors) = src.scan();
        assert_eq!(errors, 1);
        assert_eq!(store3, store);

        // The file goes: its objects go.
        std::fs::remove_file(dir.join("a.yaml")).unwrap();
        assert_eq!(src.scan().0.count(Kind::Node), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
