//! Entering a network namespace: the one `setns` the agent, the CNI plugin
//! and the lab share.

use std::{fs::File, io, os::fd::AsRawFd as _, path::PathBuf};

/// The file of a namespace given as an `ip netns` name or a path.
pub fn path(name_or_path: &str) -> PathBuf {
    if name_or_path.contains('/') {
        PathBuf::from(name_or_path)
    } else {
        PathBuf::from("/run/netns").join(name_or_path)
    }
}

/// Opens a namespace by `ip netns` name or path.
pub fn open(name_or_path: &str) -> io::Result<File> {
    let p = path(name_or_path);
    File::open(&p).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", p.display())))
}

/// Moves the calling thread (or a child between fork and exec: it only
/// makes a syscall) into the network namespace open as `file`.
pub fn enter(file: &File) -> io::Result<()> {
    // SAFETY: setns on an fd the caller keeps open; async-signal-safe.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
