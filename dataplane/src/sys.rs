//! Small Linux facilities the agent and CLI need: entering a network
//! namespace, making sure bpffs is mounted, and reading interface facts from
//! the current network namespace (never from /sys, which belongs to the mount
//! namespace and may describe another network namespace).

use std::{ffi::CString, fs::File, io, os::fd::AsRawFd, path::Path};

use anyhow::{Context as _, Result, bail};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Moves this (still single-threaded) process into a network namespace, by
/// `ip netns` name or by path. Only the network namespace changes: bpffs pins
/// and Unix sockets stay shared with the caller's mount namespace.
pub fn enter_netns(name_or_path: &str) -> Result<()> {
    let path = if name_or_path.contains('/') {
        name_or_path.to_owned()
    } else {
        format!("/run/netns/{name_or_path}")
    };
    let file = File::open(&path).with_context(|| format!("opening network namespace {path}"))?;
    // SAFETY: plain syscall on an fd we own.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("setns({path})"));
    }
    Ok(())
}

pub fn is_bpffs(path: &Path) -> Result<bool> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())?;
    // SAFETY: zeroed statfs is a valid out-parameter.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out-pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("statfs {}", path.display()));
    }
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

/// Mounts bpffs at /sys/fs/bpf when nothing is mounted there (it is not at
/// boot on every distribution), then creates `dir` on it.
pub fn ensure_pin_dir(dir: &Path) -> Result<()> {
    let bpffs = Path::new("/sys/fs/bpf");
    if dir.starts_with(bpffs) && !is_bpffs(bpffs)? {
        let src = CString::new("bpf")?;
        let target = CString::new("/sys/fs/bpf")?;
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
            return Err(io::Error::last_os_error()).context("mounting bpffs at /sys/fs/bpf");
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    if !is_bpffs(dir)? {
        bail!("{} is not on a bpf filesystem", dir.display());
    }
    Ok(())
}

/// Writes `/proc/sys/<key>` (per network namespace for `net/...`).
pub fn write_sysctl(key: &str, value: &str) -> Result<()> {
    let path = format!("/proc/sys/{key}");
    std::fs::write(&path, value).with_context(|| format!("writing {value} to {path}"))
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

/// Hardware address of an interface in the current network namespace.
pub fn hwaddr(ifname: &str) -> Result<[u8; 6]> {
    if ifname.len() >= libc::IFNAMSIZ {
        bail!(
            "interface name {ifname:?} is longer than {} bytes",
            libc::IFNAMSIZ - 1
        );
    }
    // SAFETY: plain socket call.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error()).context("socket for SIOCGIFHWADDR");
    }
    // SAFETY: fd is a fresh descriptor we own.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: zeroed ifreq is valid; the name fits (checked above) and stays NUL-terminated.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(ifname.bytes()) {
        *dst = src as libc::c_char;
    }
    // SAFETY: SIOCGIFHWADDR fills ifr_hwaddr of a valid ifreq.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req) } != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("hardware address of {ifname:?}"));
    }
    // SAFETY: the union member written by SIOCGIFHWADDR.
    let data = unsafe { req.ifr_ifru.ifru_hwaddr.sa_data };
    let mut mac = [0u8; 6];
    for (dst, src) in mac.iter_mut().zip(data.iter()) {
        *dst = *src as u8;
    }
    Ok(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_facts() {
        assert_eq!(ifindex("lo").unwrap(), 1);
        assert_eq!(hwaddr("lo").unwrap(), [0; 6]);
        let err = ifindex("no-such-if0").unwrap_err();
        assert!(format!("{err:#}").contains("no-such-if0"), "{err:#}");
    }
}
