//! `dataplane monitor`: drops with their named reason and policy verdicts
//! naming the policy, live, straight from the pinned ring buffer (with or
//! without the agent). Allowed verdicts are turned on while a monitor asks
//! for them and back off when it leaves.

use std::{
    net::Ipv4Addr,
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::Result;
use dataplane_common::{EVENTS_ALLOWED, EVENTS_TRACE};

use crate::maps::{
    Format,
    events::{EventReader, EventView, PolicyNamesMap, losses},
};

/// Which events to show (several may be given).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// Drops (not by policy).
    Drop,
    /// Policy verdicts, allowed ones included.
    Policy,
    /// Forwarded packets: where each went (to a pod, into the tunnel, out
    /// of the uplink, to the stack) and its translation. One per packet
    /// within the per-CPU budget: for looking at a few flows.
    Trace,
    /// All of the above.
    All,
}

impl Kind {
    fn shows(kinds: &[Kind], e: &EventView) -> bool {
        let k = match e.kind.as_str() {
            "drop" => Kind::Drop,
            "trace" => Kind::Trace,
            _ => Kind::Policy,
        };
        kinds.iter().any(|w| *w == Kind::All || *w == k)
    }

    /// What to ask the datapath for besides drops and denials.
    fn mask(kinds: &[Kind]) -> u32 {
        let has = |k: Kind| kinds.iter().any(|w| *w == k || *w == Kind::All);
        (if has(Kind::Policy) { EVENTS_ALLOWED } else { 0 })
            | (if has(Kind::Trace) { EVENTS_TRACE } else { 0 })
    }
}

/// What to keep.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub ip: Option<Ipv4Addr>,
    pub port: Option<u16>,
}

impl Filter {
    fn keeps(&self, e: &EventView) -> bool {
        let ip_ok = self
            .ip
            .is_none_or(|ip| e.src == ip.to_string() || e.dst == ip.to_string());
        let port_ok = self.port.is_none_or(|p| e.sport == p || e.dport == p);
        ip_ok && port_ok
    }
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// Streams events to stdout until `count` were shown, `duration` passed,
/// or SIGINT/SIGTERM; then prints what was over the budget or lost.
pub fn run(
    pin_dir: &Path,
    kinds: &[Kind],
    filter: &Filter,
    output: Format,
    count: Option<usize>,
    duration: Option<Duration>,
    backlog: bool,
) -> Result<()> {
    // A ring of our own: other monitors keep theirs.
    let mut sub = EventReader::subscribe(pin_dir, Kind::mask(kinds))?;
    let names = PolicyNamesMap::open(pin_dir)?;
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let before = losses(pin_dir)?;
    // What happened while no monitor read (drops and denials are always
    // emitted) waits in the backlog ring: shown only when asked for.
    let mut backlog = if backlog {
        Some(EventReader::open(pin_dir)?)
    } else {
        None
    };
    eprintln!("monitoring {} (Ctrl-C to stop)", pin_dir.display());
    let started = Instant::now();
    let mut shown = 0usize;
    let mut known = names.all()?;
    let result = (|| -> Result<()> {
        while !STOP.load(Ordering::Relaxed)
            && count.is_none_or(|c| shown < c)
            && duration.is_none_or(|d| started.elapsed() < d)
        {
            let batch = match &mut backlog {
                Some(b) => {
                    let old = b.next_batch(256, Duration::ZERO)?;
                    if old.is_empty() {
                        backlog = None;
                    }
                    old
                }
                None => sub.reader.next_batch(256, Duration::from_millis(100))?,
            };
            for e in batch {
                if e.policy != 0 && !known.contains_key(&e.policy) {
                    known = names.all()?;
                }
                let v = EventView::decode(&e, &known);
                if !Kind::shows(kinds, &v) || !filter.keeps(&v) || count.is_some_and(|c| shown >= c)
                {
                    continue;
                }
                match output {
                    Format::Json => println!("{}", serde_json::to_string(&v)?),
                    Format::Table => println!("{}", v.line()),
                }
                shown += 1;
            }
        }
        Ok(())
    })();
    // Our slot goes, and with it what only we asked for.
    drop(sub);
    result?;
    let after = losses(pin_dir)?;
    let (limited, lost) = (
        after.limited.saturating_sub(before.limited),
        after.lost.saturating_sub(before.lost),
    );
    match output {
        Format::Json => println!(
            "{}",
            serde_json::json!({"type": "summary", "shown": shown, "over_budget": limited, "lost": lost})
        ),
        Format::Table => println!(
            "{shown} events shown; while monitoring, {limited} over the per-CPU budget and {lost} lost to a full ring"
        ),
    }
    Ok(())
}
