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

/// The cookie of the calling thread's network namespace (what
/// `bpf_get_netns_cookie` returns for its sockets; Linux 5.14+).
pub fn cookie() -> io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    // SAFETY: plain socket(2); the descriptor is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we own.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid socket, out-pointer and length.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
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
