//! The manifest-directory source: ordinary multi-document YAML (or JSON)
//! files, watched with inotify, so a person can edit a file and watch the
//! datapath follow.
//!
//! Only files that changed are reparsed, and only the objects they define
//! or used to define are compared, so one edit costs the size of its file,
//! not the size of the directory.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    hash::{Hash as _, Hasher as _},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use futures_util::StreamExt as _;
use inotify::{EventMask, Inotify, WatchMask};
use serde::Deserialize as _;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::{
    cluster::{self, Key, Kind, Object, Update},
    telemetry,
};

/// When a file last changed, as far as its metadata can tell: inode,
/// status-change time (which, unlike mtime, no one can set back) and size.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Stamp {
    ino: u64,
    ctime: (i64, i64),
    len: u64,
}

/// How long after its last change a file's stamp is not trusted alone:
/// timestamps move in coarse ticks, so two same-size writes within one tick
/// (a script replacing a document) look alike. Such a file is read again
/// and compared by content.
const SETTLE: Duration = Duration::from_secs(2);

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Self {
        Stamp {
            ino: meta.ino(),
            ctime: (meta.ctime(), meta.ctime_nsec()),
            len: meta.len(),
        }
    }

    /// Whether a change could still hide behind this stamp.
    fn is_settled(&self) -> bool {
        let Ok(now) = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH) else {
            return false;
        };
        let changed = Duration::new(
            u64::try_from(self.ctime.0).unwrap_or(0),
            u32::try_from(self.ctime.1).unwrap_or(0),
        );
        now.checked_sub(changed).is_some_and(|age| age > SETTLE)
    }
}

fn content_hash(text: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}

/// The objects of one file, by key.
type Objects = BTreeMap<Key, Object>;

/// What is wrong with one document of a file.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    /// 1-based, in the file.
    pub document: usize,
    pub message: String,
    #[serde(skip)]
    pub outcome: Outcome,
}

/// What the source does about a problem.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The document is left out.
    Skipped,
    /// The object keeps the version it had before.
    KeptLastGood,
    /// The file does not parse: all of its last good objects stay.
    FileKept,
}

impl Outcome {
    fn says(self) -> &'static str {
        match self {
            Outcome::Skipped => "skipped",
            Outcome::KeptLastGood => "keeping its last good version",
            Outcome::FileKept => "keeping the file's last good objects",
        }
    }
}

impl Problem {
    fn new(index: usize, message: String, outcome: Outcome) -> Self {
        Problem {
            document: index + 1,
            message,
            outcome,
        }
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "document {}: {}", self.document, self.message)
    }
}

/// Every problem the directory source would report in the manifests at
/// `paths` (files, or directories whose manifest files are read in name
/// order), without applying anything: `dataplane validate`.
pub fn check(paths: &[PathBuf]) -> anyhow::Result<Vec<(PathBuf, Problem)>> {
    use anyhow::Context as _;
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            files.extend(files_in(p).with_context(|| format!("reading {}", p.display()))?);
        } else {
            files.push(p.clone());
        }
    }
    let mut out = Vec::new();
    for f in files {
        let text =
            std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?;
        let mut problems = Vec::new();
        DirSource::parse_file(&text, None, &mut problems);
        out.extend(problems.into_iter().map(|p| (f.clone(), p)));
    }
    Ok(out)
}

struct FileState {
    stamp: Stamp,
    /// Of the text last parsed.
    hash: u64,
    objects: Objects,
}

pub struct DirSource {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
    /// The files defining each object; the first by name wins.
    owners: HashMap<Key, BTreeSet<PathBuf>>,
    /// Objects defined twice, as last reported (reported once, not per scan).
    duplicates: BTreeSet<Key>,
}

use dataplane_common::manifest::{files_in, is_manifest};

/// `apiVersion` and `kind` of a document: read first, to know what to
/// parse the document as.
#[derive(serde::Deserialize)]
struct TypeMeta {
    #[serde(rename = "apiVersion", default)]
    api_version: String,
    #[serde(default)]
    kind: String,
}

/// A file of JSON documents (`kubectl get -o json` output, possibly
/// several separated by `---` lines), to be parsed as JSON, straight into
/// the typed objects: several times faster than going through YAML. `None`
/// when any document is not a JSON object (then the file is read as YAML,
/// which also covers JSON with YAML around it).
fn json_documents(text: &str) -> Option<Vec<(usize, TypeMeta, &str)>> {
    if !text.trim_start().starts_with('{') {
        return None;
    }
    let mut docs = Vec::new();
    let mut start = 0;
    let mut pieces = Vec::new();
    for (at, line) in text
        .match_indices('\n')
        .map(|(i, _)| i)
        .zip(text.lines().skip(1))
    {
        if line.trim_end() == "---" {
            pieces.push(&text[start..at]);
            start = at + 1 + line.len();
        }
    }
    pieces.push(&text[start..]);
    for (i, piece) in pieces.into_iter().enumerate() {
        if piece.trim().is_empty() {
            continue;
        }
        // Checks the whole document's syntax, without building anything.
        docs.push((i, serde_json::from_str(piece).ok()?, piece));
    }
    Some(docs)
}

impl DirSource {
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            files: BTreeMap::new(),
            owners: HashMap::new(),
            duplicates: BTreeSet::new(),
        }
    }

    /// Parses one file. `previous` is what it held when it last parsed:
    /// objects that turn invalid keep that version. Returns None when the
    /// file as a whole does not parse (its previous objects then stay).
    /// Every problem found goes to `problems`.
    fn parse_file(
        text: &str,
        previous: Option<&BTreeMap<Key, Object>>,
        problems: &mut Vec<Problem>,
    ) -> Option<BTreeMap<Key, Object>> {
        let mut out = BTreeMap::new();
        let mut take = |problems: &mut Vec<Problem>,
                        i: usize,
                        api: &str,
                        kind_name: &str,
                        converted: Option<_>| {
            let Some(converted) = converted else {
                problems.push(Problem::new(
                    i,
                    format!("unknown kind {kind_name:?} (apiVersion {api:?})"),
                    Outcome::Skipped,
                ));
                return;
            };
            match converted {
                Ok((k, o)) => {
                    out.insert(k, o);
                }
                Err(inv) => {
                    let inv: cluster::Invalid = inv;
                    match &inv.key {
                        Some(key) => {
                            let kept = previous.and_then(|p| p.get(key)).cloned();
                            let outcome = if kept.is_some() {
                                Outcome::KeptLastGood
                            } else {
                                Outcome::Skipped
                            };
                            problems.push(Problem::new(i, inv.to_string(), outcome));
                            if let Some(o) = kept {
                                out.insert(key.clone(), o);
                            }
                        }
                        None => problems.push(Problem::new(
                            i,
                            format!("{kind_name}: {inv}"),
                            Outcome::Skipped,
                        )),
                    }
                }
            }
        };
        if let Some(docs) = json_documents(text) {
            for (i, meta, piece) in docs {
                let converted = Kind::of(&meta.api_version, &meta.kind).map(|kind| {
                    cluster::convert(kind, &mut serde_json::Deserializer::from_str(piece))
                });
                take(problems, i, &meta.api_version, &meta.kind, converted);
            }
            return Some(out);
        }
        for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
            let json = match serde_yaml_ng::Value::deserialize(doc) {
                Ok(serde_yaml_ng::Value::Null) => continue,
                Ok(v) => match serde_json::to_value(&v) {
                    Ok(j) => j,
                    Err(e) => {
                        problems.push(Problem::new(i, e.to_string(), Outcome::Skipped));
                        continue;
                    }
                },
                Err(e) => {
                    problems.push(Problem::new(i, e.to_string(), Outcome::FileKept));
                    return None;
                }
            };
            let api = json["apiVersion"].as_str().unwrap_or_default().to_owned();
            let kind_name = json["kind"].as_str().unwrap_or_default().to_owned();
            let converted = Kind::of(&api, &kind_name).map(|kind| cluster::convert(kind, json));
            take(problems, i, &api, &kind_name, converted);
        }
        Some(out)
    }

    /// Rereads the files that changed and returns what changed, and how
    /// many problems were found (each already logged).
    pub fn scan(&mut self) -> (Vec<Update>, u64) {
        let mut errors = 0;
        let paths: BTreeSet<PathBuf> = match std::fs::read_dir(&self.dir) {
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
        // First read what changed, then note what each affected object was
        // (the winning definition), then apply: no copy of every object is
        // kept besides the files' own.
        let gone: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|p| !paths.contains(*p))
            .cloned()
            .collect();
        // None: the file does not parse (its last good objects stay).
        let mut parsed: Vec<(PathBuf, Stamp, u64, Option<Objects>)> = Vec::new();
        for path in paths {
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            let stamp = Stamp::of(&meta);
            if self
                .files
                .get(&path)
                .is_some_and(|f| f.stamp == stamp && stamp.is_settled())
            {
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
            let hash = content_hash(&text);
            if let Some(f) = self.files.get_mut(&path)
                && f.hash == hash
            {
                f.stamp = stamp;
                continue;
            }
            let previous = self.files.get(&path).map(|f| &f.objects);
            let mut problems = Vec::new();
            let objects = Self::parse_file(&text, previous, &mut problems);
            for p in &problems {
                errors += 1;
                warn!(file = %path.display(), "{p}; {}", p.outcome.says());
            }
            parsed.push((path, stamp, hash, objects));
        }
        let mut affected: BTreeSet<Key> = BTreeSet::new();
        for path in &gone {
            affected.extend(self.files[path].objects.keys().cloned());
        }
        for (path, _, _, objects) in &parsed {
            if let Some(objects) = objects {
                affected.extend(objects.keys().cloned());
                if let Some(old) = self.files.get(path) {
                    affected.extend(old.objects.keys().cloned());
                }
            }
        }
        let before: Vec<Option<Object>> =
            affected.iter().map(|k| self.winner(k).cloned()).collect();

        for path in gone {
            if let Some(f) = self.files.remove(&path) {
                self.disown(&path, f.objects.keys());
            }
        }
        for (path, stamp, hash, objects) in parsed {
            match objects {
                Some(objects) => {
                    if let Some(old) = self.files.remove(&path) {
                        self.disown(&path, old.objects.keys());
                    }
                    for k in objects.keys() {
                        self.owners
                            .entry(k.clone())
                            .or_default()
                            .insert(path.clone());
                    }
                    self.files.insert(
                        path,
                        FileState {
                            stamp,
                            hash,
                            objects,
                        },
                    );
                }
                // Remember the broken version so it is not reparsed and
                // re-reported until it changes again.
                None => {
                    if let Some(f) = self.files.get_mut(&path) {
                        f.stamp = stamp;
                        f.hash = hash;
                    }
                }
            }
        }
        let mut updates = Vec::new();
        for (key, before) in affected.into_iter().zip(before) {
            let owners = self.owners.get(&key);
            if owners.is_some_and(|o| o.len() > 1) {
                if self.duplicates.insert(key.clone()) {
                    errors += 1;
                    let files: Vec<String> = owners
                        .into_iter()
                        .flatten()
                        .map(|p| p.display().to_string())
                        .collect();
                    warn!(
                        "{key} is defined in more than one place ({}); the first (by file name) wins",
                        files.join(", ")
                    );
                }
            } else {
                self.duplicates.remove(&key);
            }
            match self.winner(&key) {
                Some(obj) if before.as_ref() != Some(obj) => {
                    updates.push(Update::Upsert(key, obj.clone()));
                }
                Some(_) => {}
                None if before.is_some() => updates.push(Update::Delete(key)),
                None => {}
            }
        }
        (updates, errors)
    }

    /// The definition of `key` in effect: from the first file defining it.
    fn winner(&self, key: &Key) -> Option<&Object> {
        let path = self.owners.get(key)?.first()?;
        self.files.get(path)?.objects.get(key)
    }

    fn disown<'a>(&mut self, path: &Path, keys: impl Iterator<Item = &'a Key>) {
        for k in keys {
            if let Some(o) = self.owners.get_mut(k) {
                o.remove(path);
                if o.is_empty() {
                    self.owners.remove(k);
                }
            }
        }
    }
}

/// Reports the directory's objects now and every change after; `Synced`
/// follows the first read.
pub async fn run(
    dir: PathBuf,
    tx: mpsc::Sender<Update>,
    mut barriers: mpsc::UnboundedReceiver<u64>,
    t: telemetry::Shared,
) {
    let mut source = DirSource::new(dir.clone());
    let mut warned = false;
    let mut synced = false;
    // Sync barriers to pass on behind the next scan's updates.
    let mut barrier: Option<u64> = None;
    loop {
        let watch = Inotify::init().and_then(|ino| {
            ino.watches().add(
                &dir,
                WatchMask::CLOSE_WRITE
                    | WatchMask::MOVED_TO
                    | WatchMask::MOVED_FROM
                    | WatchMask::DELETE
                    | WatchMask::CREATE
                    | WatchMask::DELETE_SELF
                    | WatchMask::MOVE_SELF,
            )?;
            ino.into_event_stream([0u8; 4096])
        });
        let mut events = match watch {
            Ok(s) => s,
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
        loop {
            let (updates, errors) = source.scan();
            for _ in 0..errors {
                telemetry::error(&t, "manifest_invalid");
            }
            for u in updates {
                if tx.send(u).await.is_err() {
                    return;
                }
            }
            if !synced {
                if tx.send(Update::Synced).await.is_err() {
                    return;
                }
                synced = true;
            }
            if let Some(b) = barrier.take()
                && tx.send(Update::Barrier(b)).await.is_err()
            {
                return;
            }
            let first = tokio::select! {
                e = events.next() => e,
                Some(b) = barriers.recv() => {
                    // A sync: scan now, whatever inotify has said so far.
                    let mut b = b;
                    while let Ok(more) = barriers.try_recv() {
                        b = b.max(more);
                    }
                    barrier = Some(b);
                    continue;
                }
            };
            let Some(Ok(first)) = first else {
                break;
            };
            // Editors write in several steps: let them finish.
            tokio::time::sleep(Duration::from_millis(10)).await;
            let mut gone = first
                .mask
                .intersects(EventMask::DELETE_SELF | EventMask::MOVE_SELF | EventMask::IGNORED);
            while let Some(Some(Ok(e))) = futures_util::FutureExt::now_or_never(events.next()) {
                gone |= e
                    .mask
                    .intersects(EventMask::DELETE_SELF | EventMask::MOVE_SELF | EventMask::IGNORED);
            }
            if gone {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_documents_take_the_fast_path_and_anything_else_yaml() {
        let docs = json_documents("{\"kind\": \"Pod\"}\n---\n{\"b\": [2]}\n---\n\n").expect("json");
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0].1.kind, "Pod");
        assert_eq!(docs[1].2.trim(), "{\"b\": [2]}");
        // A YAML document among them: the whole file is YAML.
        assert!(json_documents("{\"a\": 1}\n---\nb: 2\n").is_none());
        assert!(json_documents("a: {}\n").is_none());
        assert!(json_documents("{\"a\": 1}\n{\"b\": 2}\n").is_none());
        // "---" inside a JSON string is not a separator.
        let docs = json_documents("{\"a\": \"x\\n---\\ny\"}\n").expect("json");
        assert_eq!(docs.len(), 1);
    }

    fn kinds(updates: &[Update]) -> Vec<String> {
        updates
            .iter()
            .map(|u| match u {
                Update::Upsert(k, _) => format!("+{}", k.name),
                Update::Delete(k) => format!("-{}", k.name),
                other => format!("{other:?}"),
            })
            .collect()
    }

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
        let (updates, errors) = src.scan();
        assert_eq!(
            (kinds(&updates), errors),
            (vec!["+n1".into(), "+n2".into()], 0)
        );

        // n2 turns invalid, an unknown kind appears: n2 keeps its last good
        // version, so nothing changes.
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
        let (updates, errors) = src.scan();
        assert_eq!((updates.len(), errors), (0, 2));

        // A file that is not YAML at all: everything it had stays.
        std::fs::write(dir.join("a.yaml"), "kind: [unclosed").unwrap();
        let (updates, errors) = src.scan();
        assert_eq!((updates.len(), errors), (0, 1));

        // A second file defines n1 too: the first by name keeps it; when
        // a.yaml goes, b.yaml's version takes over and n2 goes.
        std::fs::write(dir.join("b.yaml"), node("n1", "10.1.9.0/24")).unwrap();
        let (updates, errors) = src.scan();
        assert_eq!((updates.len(), errors), (0, 1));
        std::fs::remove_file(dir.join("a.yaml")).unwrap();
        let (updates, _) = src.scan();
        assert_eq!(kinds(&updates), ["+n1", "-n2"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_same_size_rewrite_with_the_same_times_is_seen() {
        let dir = std::env::temp_dir().join(format!("dp-dir-stamp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let node = |cidr: &str| {
            format!("apiVersion: v1\nkind: Node\nmetadata:\n  name: n1\nspec:\n  podCIDR: {cidr}\n")
        };
        let path = dir.join("a.yaml");
        let write = |text: String| {
            let f = std::fs::File::create(&path).unwrap();
            std::io::Write::write_all(&mut &f, text.as_bytes()).unwrap();
            // The same mtime each time, as two writes in one tick get.
            f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000))
                .unwrap();
        };
        write(node("10.1.1.0/24"));
        let mut src = DirSource::new(dir.clone());
        assert_eq!(kinds(&src.scan().0), ["+n1"]);
        write(node("10.1.2.0/24"));
        assert_eq!(kinds(&src.scan().0), ["+n1"], "same size, same mtime");
        // Read again while fresh, but the same text is not reparsed.
        write(node("10.1.2.0/24"));
        assert_eq!(src.scan(), (vec![], 0));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
