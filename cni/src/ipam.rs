//! Address allocation from the node's pod CIDR, on disk.
//!
//! One directory per network; one file per reserved address, named by the
//! address and holding the owner (container id, interface). Every change
//! happens under an exclusive `flock` of `<dir>/lock` (`File::lock`), which the kernel
//! releases when a holder dies (even by SIGKILL), and every file is written
//! to a temporary name and renamed into place, so a reader never sees a
//! half-written reservation. A plugin killed after reserving leaves an owned
//! reservation that DEL (by container id) or GC releases.

use std::{
    fs::{self, File, OpenOptions},
    io::Write as _,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
};

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

use crate::{
    config::Attachment,
    error::{CniError, Context as _, Result, code},
};

const LOCK: &str = "lock";
const LAST: &str = "last_reserved_ip";
const TMP_PREFIX: &str = ".tmp-";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// The addresses handed out: inclusive bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub subnet: IpNetwork,
    pub first: Ipv4Addr,
    pub last: Ipv4Addr,
}

impl Range {
    /// By default the whole subnet but the network address, the first host
    /// (kept for the node's own address in the pod CIDR) and broadcast.
    pub fn new(subnet: IpNetwork, start: Option<IpAddr>, end: Option<IpAddr>) -> Result<Range> {
        let IpNetwork::V4(net) = subnet else {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                "IPv6 pod CIDRs are not supported yet",
            )
            .details(subnet));
        };
        let base = u32::from(net.network());
        let size = 1u64 << (32 - u32::from(net.prefix()));
        if size < 4 {
            return Err(
                CniError::new(code::INVALID_CONFIG, "invalid network configuration")
                    .details(format!("subnet {subnet} is too small for pods")),
            );
        }
        let bound = |v: Option<IpAddr>, default: u32, field: &str| -> Result<Ipv4Addr> {
            match v {
                None => Ok(Ipv4Addr::from(default)),
                Some(IpAddr::V4(a)) if net.contains(a) => Ok(a),
                Some(a) => Err(CniError::new(
                    code::INVALID_CONFIG,
                    "invalid network configuration",
                )
                .details(format!("field ipam.{field}: {a} is not in {subnet}"))),
            }
        };
        let last_host = base + u32::try_from(size - 2).unwrap_or(u32::MAX);
        let first = bound(start, base + 2, "rangeStart")?;
        let last = bound(end, last_host, "rangeEnd")?;
        if first > last {
            return Err(
                CniError::new(code::INVALID_CONFIG, "invalid network configuration").details(
                    format!("ipam.rangeStart {first} is after ipam.rangeEnd {last}"),
                ),
            );
        }
        Ok(Range {
            subnet,
            first,
            last,
        })
    }

    fn len(&self) -> u32 {
        u32::from(self.last) - u32::from(self.first) + 1
    }

    /// The `i`-th address after `from` (exclusive), wrapping around the range.
    fn nth_after(&self, from: Option<Ipv4Addr>, i: u32) -> Ipv4Addr {
        let start = match from {
            Some(a) if a >= self.first && a <= self.last => {
                u32::from(a) - u32::from(self.first) + 1
            }
            _ => 0,
        };
        Ipv4Addr::from(u32::from(self.first) + (start + i) % self.len())
    }
}

/// An open, locked allocation directory. The lock is held until drop.
pub struct Store {
    dir: PathBuf,
    _lock: File,
}

impl Store {
    pub fn open(dir: &Path) -> Result<Store> {
        fs::create_dir_all(dir).code(code::IO, || {
            format!("creating IPAM directory {}", dir.display())
        })?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(LOCK))
            .code(code::IO, || format!("opening {}", dir.join(LOCK).display()))?;
        // An exclusive flock: blocks until other plugins are done, and the
        // kernel releases it if we are killed.
        lock.lock()
            .code(code::IO, || format!("locking {}", dir.join(LOCK).display()))?;
        let store = Store {
            dir: dir.to_owned(),
            _lock: lock,
        };
        store.sweep_tmp();
        Ok(store)
    }

    /// Temporary files of writers that died mid-write.
    fn sweep_tmp(&self) {
        if let Ok(entries) = fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
    }

    fn write_atomic(&self, name: &str, content: &[u8]) -> Result<()> {
        let tmp = self.dir.join(format!("{TMP_PREFIX}{}", std::process::id()));
        let path = self.dir.join(name);
        let write = || -> std::io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(content)?;
            f.sync_all()?;
            fs::rename(&tmp, &path)?;
            File::open(&self.dir)?.sync_all()
        };
        write().code(code::IO, || format!("writing {}", path.display()))
    }

    /// Every reservation, sorted by address.
    pub fn reservations(&self) -> Result<Vec<(IpAddr, Reservation)>> {
        let mut out = Vec::new();
        let entries =
            fs::read_dir(&self.dir).code(code::IO, || format!("reading {}", self.dir.display()))?;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Ok(ip) = name.parse::<IpAddr>() else {
                continue;
            };
            let bytes =
                fs::read(e.path()).code(code::IO, || format!("reading {}", e.path().display()))?;
            match serde_json::from_slice::<Reservation>(&bytes) {
                Ok(r) => out.push((ip, r)),
                // Not ours to guess at: keep the address reserved, say so.
                Err(err) => eprintln!(
                    "dataplane-cni: unreadable reservation {}: {err}",
                    e.path().display()
                ),
            }
        }
        out.sort_by_key(|(ip, _)| *ip);
        Ok(out)
    }

    pub fn find(&self, owner: &Reservation) -> Result<Option<IpAddr>> {
        Ok(self
            .reservations()?
            .into_iter()
            .find(|(_, r)| r == owner)
            .map(|(ip, _)| ip))
    }

    /// The owner's address if it has one already (a retried ADD), else the
    /// next free one after the last handed out.
    pub fn allocate(&self, range: &Range, owner: &Reservation) -> Result<IpAddr> {
        if let Some(ip) = self.find(owner)? {
            return Ok(ip);
        }
        let last = fs::read_to_string(self.dir.join(LAST))
            .ok()
            .and_then(|s| s.trim().parse::<Ipv4Addr>().ok());
        for i in 0..range.len() {
            let candidate = range.nth_after(last, i);
            if self.dir.join(candidate.to_string()).exists() {
                continue;
            }
            let content =
                serde_json::to_vec(owner).code(code::IO, || "encoding reservation".into())?;
            self.write_atomic(&candidate.to_string(), &content)?;
            self.write_atomic(LAST, candidate.to_string().as_bytes())?;
            return Ok(IpAddr::V4(candidate));
        }
        Err(CniError::new(
            code::IPAM_EXHAUSTED,
            format!(
                "no free address in {} ({} to {})",
                range.subnet, range.first, range.last
            ),
        ))
    }

    /// Releases whatever `owner` holds; nothing held is not an error.
    pub fn release(&self, owner: &Reservation) -> Result<Vec<IpAddr>> {
        let mut released = Vec::new();
        for (ip, r) in self.reservations()? {
            if &r == owner {
                self.remove(ip)?;
                released.push(ip);
            }
        }
        Ok(released)
    }

    fn remove(&self, ip: IpAddr) -> Result<()> {
        let path = self.dir.join(ip.to_string());
        match fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(CniError::new(code::IO, format!("removing {}", path.display())).details(e))
            }
            _ => Ok(()),
        }
    }

    /// Releases every reservation whose owner is not in `valid`.
    pub fn gc(&self, valid: &[Attachment]) -> Result<Vec<(IpAddr, Reservation)>> {
        let mut released = Vec::new();
        for (ip, r) in self.reservations()? {
            if !valid
                .iter()
                .any(|a| a.container_id == r.container_id && a.ifname == r.ifname)
            {
                self.remove(ip)?;
                released.push((ip, r));
            }
        }
        Ok(released)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("dp-ipam-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn owner(id: &str) -> Reservation {
        Reservation {
            container_id: id.into(),
            ifname: "eth0".into(),
        }
    }

    #[test]
    fn allocates_round_robin_reuses_for_same_owner_and_exhausts() {
        let dir = tmpdir("rr");
        let range = Range::new("10.9.0.0/29".parse().unwrap(), None, None).unwrap();
        assert_eq!(
            (range.first, range.last),
            ("10.9.0.2".parse().unwrap(), "10.9.0.6".parse().unwrap())
        );
        let store = Store::open(&dir).unwrap();
        let a = store.allocate(&range, &owner("a")).unwrap();
        assert_eq!(a.to_string(), "10.9.0.2");
        assert_eq!(
            store.allocate(&range, &owner("a")).unwrap(),
            a,
            "retried ADD keeps its address"
        );
        let b = store.allocate(&range, &owner("b")).unwrap();
        assert_eq!(b.to_string(), "10.9.0.3");
        store.release(&owner("a")).unwrap();
        // Round robin: a's freed address is not handed out right away.
        assert_eq!(
            store.allocate(&range, &owner("c")).unwrap().to_string(),
            "10.9.0.4"
        );
        for id in ["d", "e"] {
            store.allocate(&range, &owner(id)).unwrap();
        }
        assert_eq!(
            store.allocate(&range, &owner("f")).unwrap().to_string(),
            "10.9.0.2",
            "wraps to the freed one"
        );
        let err = store.allocate(&range, &owner("g")).unwrap_err();
        assert_eq!(err.code, code::IPAM_EXHAUSTED);
        assert!(err.msg.contains("10.9.0.0/29"), "{err}");
        let valid = vec![Attachment {
            container_id: "b".into(),
            ifname: "eth0".into(),
        }];
        let released = store.gc(&valid).unwrap();
        assert_eq!(released.len(), 4);
        assert_eq!(store.reservations().unwrap().len(), 1);
        drop(store);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn range_bounds_are_validated() {
        let net: IpNetwork = "10.9.0.0/24".parse().unwrap();
        assert!(
            Range::new(net, Some("10.9.1.5".parse().unwrap()), None)
                .unwrap_err()
                .details
                .contains("rangeStart")
        );
        assert!(
            Range::new(
                net,
                Some("10.9.0.9".parse().unwrap()),
                Some("10.9.0.8".parse().unwrap())
            )
            .is_err()
        );
        assert!(Range::new("10.9.0.0/31".parse().unwrap(), None, None).is_err());
        let r = Range::new(
            net,
            Some("10.9.0.100".parse().unwrap()),
            Some("10.9.0.101".parse().unwrap()),
        )
        .unwrap();
        assert_eq!(r.len(), 2);
    }
}
