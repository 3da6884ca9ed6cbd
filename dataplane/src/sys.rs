//! Small Linux facilities the agent and CLI need: entering a network
//! namespace, making sure bpffs is mounted, finding cgroup v2, interface
//! indexes from the current network namespace (never from /sys, which
//! belongs to the mount namespace and may describe another network
//! namespace), the three link syscalls aya does not expose for every
//! link kind, and batched map reads and writes (one syscall for many
//! entries, which aya does not offer).

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// Moves this (still single-threaded) process into a network namespace, by
/// `ip netns` name or by path. Only the network namespace changes: bpffs pins
/// and Unix sockets stay shared with the caller's mount namespace.
///
/// Already there (a wrapper such as `ip netns exec` entered it), it does
/// nothing: setns takes CAP_SYS_ADMIN, which the agent does not otherwise
/// need.
pub fn enter_netns(name_or_path: &str) -> Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let file = dataplane_common::netns::open(name_or_path)
        .with_context(|| format!("opening network namespace {name_or_path}"))?;
    let target = file.metadata()?;
    let current = std::fs::metadata("/proc/self/ns/net")?;
    if (target.dev(), target.ino()) == (current.dev(), current.ino()) {
        return Ok(());
    }
    dataplane_common::netns::enter(&file).with_context(|| format!("setns({name_or_path})"))
}

fn fs_magic(path: &Path) -> Result<i64> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())?;
    // SAFETY: zeroed statfs is a valid out-parameter.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out-pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("statfs {}", path.display()));
    }
    Ok(st.f_type as i64)
}

pub fn is_bpffs(path: &Path) -> Result<bool> {
    Ok(fs_magic(path)? == BPF_FS_MAGIC)
}

/// Mounts bpffs at `path` unless one is there; true when it mounted.
pub fn ensure_bpffs(path: &Path) -> Result<bool> {
    std::fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
    if is_bpffs(path)? {
        return Ok(false);
    }
    let src = CString::new("bpf")?;
    let target = CString::new(path.as_os_str().as_encoded_bytes())?;
    // SAFETY: valid C strings; null data is allowed for bpffs.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            src.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("mounting bpffs at {}", path.display()));
    }
    Ok(true)
}

/// Mounts bpffs at /sys/fs/bpf when nothing is mounted there (it is not at
/// boot on every distribution), then creates `dir` on it.
pub fn ensure_pin_dir(dir: &Path) -> Result<()> {
    let bpffs = Path::new("/sys/fs/bpf");
    if dir.starts_with(bpffs) {
        ensure_bpffs(bpffs)?;
    }
    if let Err(e) = std::fs::create_dir_all(dir) {
        if e.raw_os_error() == Some(libc::EPERM) {
            bail!(
                "creating {}: bpffs refused the name ({e}); it refuses names with a dot, which \
                 dataplane escapes, so another restriction applies here",
                dir.display()
            );
        }
        return Err(e).with_context(|| format!("creating {}", dir.display()));
    }
    if !is_bpffs(dir)? {
        bail!("{} is not on a bpf filesystem", dir.display());
    }
    Ok(())
}

/// Where cgroup v2 is mounted: `/sys/fs/cgroup` on unified hosts,
/// `/sys/fs/cgroup/unified` in hybrid mode, from the mount table.
pub fn cgroup2_mount() -> Result<PathBuf> {
    let table = std::fs::read_to_string("/proc/self/mountinfo").context("/proc/self/mountinfo")?;
    parse_cgroup2_mount(&table)
        .context("no cgroup2 filesystem is mounted (see /proc/self/mountinfo)")
}

fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    // "36 25 0:31 / /sys/fs/cgroup/unified rw,... shared:10 - cgroup2 cgroup2 rw"
    mountinfo.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        (right.split_whitespace().next()? == "cgroup2")
            .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
    })
}

pub fn is_cgroup2(path: &Path) -> Result<bool> {
    Ok(fs_magic(path)? == CGROUP2_SUPER_MAGIC)
}

static SYSCTL_ROOT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Where sysctls are written from now on instead of `/proc/sys`: a
/// container's `/proc/sys` is read-only, so the DaemonSet mounts the host's
/// `/proc/sys/net` elsewhere. Set once, at start.
pub fn set_sysctl_root(root: &Path) {
    let _ = SYSCTL_ROOT.set(root.to_owned());
}

/// The file behind a sysctl key (`net/ipv4/ip_forward`).
pub fn sysctl_path(key: &str) -> PathBuf {
    SYSCTL_ROOT
        .get()
        .map_or_else(|| Path::new("/proc/sys"), PathBuf::as_path)
        .join(key)
}

/// Writes a sysctl (per network namespace for `net/...`).
pub fn write_sysctl(key: &str, value: &str) -> Result<()> {
    let path = sysctl_path(key);
    std::fs::write(&path, value).with_context(|| format!("writing {value} to {}", path.display()))
}

/// Interface index in the current network namespace.
pub fn ifindex(ifname: &str) -> Result<u32> {
    let c = CString::new(ifname).with_context(|| format!("interface name {ifname:?}"))?;
    // SAFETY: valid C string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("interface {ifname:?}"));
    }
    Ok(idx)
}

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_TYPE_RINGBUF: u32 = 27;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_DETACH: libc::c_long = 34;

fn bpf(cmd: libc::c_long, attr: &mut [u64]) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a zero-padded bpf_attr prefix of the size passed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of_val(attr),
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// A new ring buffer map of `bytes` (a power of two pages), owned by the
/// caller (it goes when the last descriptor and reference do).
pub fn ringbuf_create(bytes: u32) -> io::Result<OwnedFd> {
    // struct { u32 map_type, key_size, value_size, max_entries, map_flags, ... }
    let mut attr = [
        u64::from(BPF_MAP_TYPE_RINGBUF),
        u64::from(bytes) << 32,
        0,
        0,
        0,
        0,
    ];
    let fd = bpf(BPF_MAP_CREATE, &mut attr)?;
    // SAFETY: the kernel returned a new descriptor we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Puts the map `inner` at `index` of the map-of-maps `outer`.
pub fn map_set_inner(outer: BorrowedFd<'_>, index: u32, inner: BorrowedFd<'_>) -> io::Result<()> {
    let key = index;
    let value = inner.as_raw_fd() as u32;
    // struct { u32 map_fd; u64 key; u64 value; u64 flags; }
    let mut attr = [
        u64::from(outer.as_raw_fd() as u32),
        (&key as *const u32) as u64,
        (&value as *const u32) as u64,
        0,
    ];
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(drop)
}

/// Empties slot `index` of the map-of-maps `outer` (already empty: fine).
pub fn map_clear_inner(outer: BorrowedFd<'_>, index: u32) -> io::Result<()> {
    let key = index;
    let mut attr = [
        u64::from(outer.as_raw_fd() as u32),
        (&key as *const u32) as u64,
        0,
        0,
    ];
    match bpf(BPF_MAP_DELETE_ELEM, &mut attr) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r.map(drop),
    }
}

/// What one `BPF_PROG_TEST_RUN` returned: the program's return code, the
/// packet as it left, and the context (`struct __sk_buff`) after the run.
pub struct TestRunOut {
    pub retval: u32,
    pub data: Vec<u8>,
    pub ctx: Vec<u8>,
}

/// Runs the program `prog` once on `data` with the context `ctx` (for tc
/// programs a `struct __sk_buff` in which only some fields may be set).
pub fn prog_test_run(prog: BorrowedFd<'_>, data: &[u8], ctx: &[u8]) -> io::Result<TestRunOut> {
    let mut data_out = vec![0u8; data.len() + 1024];
    let mut ctx_out = vec![0u8; ctx.len()];
    // struct { u32 prog_fd, retval, data_size_in, data_size_out; u64 data_in,
    // data_out; u32 repeat, duration, ctx_size_in, ctx_size_out; u64 ctx_in,
    // ctx_out; u32 flags, cpu, batch_size; }
    let words = |lo: u32, hi: u32| u64::from(lo) | (u64::from(hi) << 32);
    let mut attr = [
        words(prog.as_raw_fd() as u32, 0),
        words(data.len() as u32, data_out.len() as u32),
        data.as_ptr() as u64,
        data_out.as_mut_ptr() as u64,
        words(1, 0),
        words(ctx.len() as u32, ctx_out.len() as u32),
        ctx.as_ptr() as u64,
        ctx_out.as_mut_ptr() as u64,
        0,
        0,
    ];
    bpf(BPF_PROG_TEST_RUN, &mut attr)?;
    let retval = (attr[0] >> 32) as u32;
    let out_len = ((attr[1] >> 32) as usize).min(data_out.len());
    let ctx_len = ((attr[5] >> 32) as usize).min(ctx_out.len());
    data_out.truncate(out_len);
    ctx_out.truncate(ctx_len);
    Ok(TestRunOut {
        retval,
        data: data_out,
        ctx: ctx_out,
    })
}

/// An exclusive `flock` on `path` (a file or directory), held until the
/// returned file is dropped.
pub fn lock_exclusive(path: &Path) -> Result<std::fs::File> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("locking {}", path.display()));
    }
    Ok(f)
}

/// Opens a pinned object (a link, here). `Ok(None)` when nothing is pinned
/// at `path`.
pub fn bpf_obj_get(path: &Path) -> Result<Option<OwnedFd>> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())?;
    // struct { __aligned_u64 pathname; __u32 bpf_fd; __u32 file_flags; }
    let mut attr = [c.as_ptr() as u64, 0, 0, 0];
    match bpf(BPF_OBJ_GET, &mut attr) {
        // SAFETY: the kernel returned a new descriptor we now own.
        Ok(fd) => Ok(Some(unsafe { OwnedFd::from_raw_fd(fd as i32) })),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("opening pinned {}", path.display())),
    }
}

/// Swaps the program behind a link atomically (every link kind the agent
/// pins supports it): no packet or socket call sees neither program.
pub fn bpf_link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    // struct { __u32 link_fd; __u32 new_prog_fd; __u32 flags; __u32 old_prog_fd; }
    let lo = u64::from(link.as_raw_fd() as u32) | (u64::from(prog.as_raw_fd() as u32) << 32);
    bpf(BPF_LINK_UPDATE, &mut [lo, 0, 0, 0]).map(drop)
}

/// Detaches a link now, even while other descriptors or pins hold it.
pub fn bpf_link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    bpf(
        BPF_LINK_DETACH,
        &mut [u64::from(link.as_raw_fd() as u32), 0, 0, 0],
    )
    .map(drop)
}

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// Entries per batched call.
const BATCH: usize = 4096;

/// `union bpf_attr` for the batch commands: in_batch, out_batch, keys,
/// values, count | map_fd << 32, elem_flags, flags.
fn batch_attr(
    map: BorrowedFd<'_>,
    in_b: u64,
    out_b: u64,
    keys: u64,
    values: u64,
    count: u32,
) -> [u64; 7] {
    [
        in_b,
        out_b,
        keys,
        values,
        u64::from(count) | (u64::from(map.as_raw_fd() as u32) << 32),
        0,
        0,
    ]
}

/// Every entry of a hash, LRU hash or array map, a batch per syscall.
/// Entries that change meanwhile may be seen old or new, as with any walk.
pub fn map_entries<K: aya::Pod, V: aya::Pod>(map: BorrowedFd<'_>) -> io::Result<Vec<(K, V)>> {
    let mut out = Vec::new();
    map_walk::<K, V>(map, |batch| out.extend_from_slice(batch))?;
    Ok(out)
}

/// How many entries a hash or LRU hash map holds, a batch per syscall
/// (nothing kept).
pub fn map_count<K: aya::Pod, V: aya::Pod>(map: BorrowedFd<'_>) -> io::Result<usize> {
    let mut n = 0;
    map_walk::<K, V>(map, |batch| n += batch.len())?;
    Ok(n)
}

/// Hands every entry of a hash, LRU hash or array map to `f`, a batch at a
/// time.
pub fn map_walk<K: aya::Pod, V: aya::Pod>(
    map: BorrowedFd<'_>,
    mut f: impl FnMut(&[(K, V)]),
) -> io::Result<()> {
    // SAFETY: K and V are plain-old-data map types (aya::Pod): all-zero is
    // a valid value and the kernel writes whole values.
    let mut keys: Vec<K> = vec![unsafe { std::mem::zeroed() }; BATCH];
    // SAFETY: as above.
    let mut values: Vec<V> = vec![unsafe { std::mem::zeroed() }; BATCH];
    // The token is at most a key's size (arrays) or a u32 (hash maps).
    let mut token_in = [0u8; 64];
    let mut token_out = [0u8; 64];
    let mut first = true;
    let mut pairs = Vec::with_capacity(BATCH);
    loop {
        let mut attr = batch_attr(
            map,
            if first { 0 } else { token_in.as_ptr() as u64 },
            token_out.as_mut_ptr() as u64,
            keys.as_mut_ptr() as u64,
            values.as_mut_ptr() as u64,
            BATCH as u32,
        );
        let rc = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let got = ((attr[4] & 0xffff_ffff) as usize).min(BATCH);
        pairs.clear();
        pairs.extend(
            keys[..got]
                .iter()
                .copied()
                .zip(values[..got].iter().copied()),
        );
        f(&pairs);
        match rc {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
            Err(e) => return Err(e),
        }
        token_in = token_out;
        first = false;
    }
}

/// Writes `entries` (all of them or an error), a batch per syscall.
pub fn map_update<K: aya::Pod, V: aya::Pod>(
    map: BorrowedFd<'_>,
    entries: &[(K, V)],
) -> io::Result<()> {
    for chunk in entries.chunks(BATCH) {
        let keys: Vec<K> = chunk.iter().map(|(k, _)| *k).collect();
        let values: Vec<V> = chunk.iter().map(|(_, v)| *v).collect();
        let mut attr = batch_attr(
            map,
            0,
            0,
            keys.as_ptr() as u64,
            values.as_ptr() as u64,
            chunk.len() as u32,
        );
        bpf(BPF_MAP_UPDATE_BATCH, &mut attr)?;
    }
    Ok(())
}

/// Removes `keys` from a hash map, a batch per syscall; keys already gone
/// are skipped. Returns how many were removed.
pub fn map_delete<K: aya::Pod>(map: BorrowedFd<'_>, keys: &[K]) -> io::Result<usize> {
    let mut removed = 0;
    let mut rest = keys;
    while !rest.is_empty() {
        let n = rest.len().min(BATCH);
        let mut attr = batch_attr(map, 0, 0, rest.as_ptr() as u64, 0, n as u32);
        let rc = bpf(BPF_MAP_DELETE_BATCH, &mut attr);
        // On ENOENT the count says how many went before the missing key.
        let done = ((attr[4] & 0xffff_ffff) as usize).min(n);
        removed += done;
        match rc {
            Ok(_) => rest = &rest[n..],
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => rest = &rest[done + 1..],
            Err(e) => return Err(e),
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_index() {
        assert_eq!(ifindex("lo").unwrap(), 1);
        let err = ifindex("no-such-if0").unwrap_err();
        assert!(format!("{err:#}").contains("no-such-if0"), "{err:#}");
    }

    #[test]
    fn cgroup2_mount_from_the_mount_table() {
        let hybrid = "25 1 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n\
                      36 25 0:31 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_cgroup2_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified = "30 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_cgroup2_mount(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(
            parse_cgroup2_mount("1 2 0:1 / / rw - ext4 /dev/x rw\n"),
            None
        );
    }
}
