//! Netlink batches run inside a chosen network namespace. A netlink socket
//! belongs to the namespace it was created in, so each batch runs on its own
//! thread that enters the namespace first, with its own socket and runtime.

use std::{fs::File, path::Path};

pub use dataplane_common::netlink::{Nl, NlError, link_mac, link_name};

use crate::error::{CniError, code};

impl From<NlError> for CniError {
    fn from(e: NlError) -> Self {
        CniError::new(code::NETLINK, e.what).details(e.cause)
    }
}

/// Runs `f` with a netlink handle inside `netns` (a path such as
/// `/var/run/netns/x` or `/proc/<pid>/ns/net`), or in the current one.
pub fn with_netns<T: Send>(
    netns: Option<&Path>,
    f: impl AsyncFnOnce(Nl) -> crate::error::Result<T> + Send,
) -> crate::error::Result<T> {
    let file = match netns {
        Some(p) => Some(File::open(p).map_err(|e| {
            CniError::new(
                code::INVALID_ENV,
                format!("network namespace {} cannot be opened", p.display()),
            )
            .details(e)
        })?),
        None => None,
    };
    std::thread::scope(|s| {
        s.spawn(move || {
            if let Some(file) = &file {
                // Only this thread moves.
                dataplane_common::netns::enter(file).map_err(|e| {
                    CniError::new(code::IO, "entering the network namespace").details(e)
                })?;
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .build()
                .map_err(|e| CniError::new(code::IO, "starting a runtime").details(e))?;
            rt.block_on(async move { f(Nl::new()?).await })
        })
        .join()
        .unwrap_or_else(|_| Err(CniError::new(code::IO, "netlink worker panicked")))
    })
}
