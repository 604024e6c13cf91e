//! DOC: how the firmware decides that a queue hangs.
//!
//! Every queue has a [`Watchdog`], so that no dispatch can hold its queue (and the fences
//! behind it) forever:
//!
//! - an ordinary queue has a **job timeout**, as amdgpu's lockup timeout: a dispatch that
//!   has had a workgroup on an engine for longer than the timeout, added up (time waiting
//!   for an engine, between time slices or suspended does not count), hangs;
//! - a **long-running** queue (persistent kernels, as Intel Xe's long-running mode) has no
//!   job timeout but a **no-progress watchdog**: a dispatch that went the whole time
//!   without finishing a workgroup or reaching a checkpoint hangs.
//!
//! The firmware measures and reports a hang; kmd-shim decides (it resets the queue, and
//! bans a context that keeps hanging). The watchdog is set when the queue is created and
//! can be changed while it runs; the firmware reads it at every check, so a change applies
//! to the dispatch already running.
//!
//! On the wire (CREATE_QUEUE, SET_WATCHDOG, and the firmware's `SetWatchdog`) a watchdog
//! is one word: the timeout in milliseconds in bits 0..32, bit 32 set for a no-progress
//! watchdog. Every word names one watchdog and every watchdog one word (so 0 is not a
//! "default": it is a timeout of 0 ms, which is refused).

use std::time::Duration;

/// How long a dispatch may run on an ordinary queue by default (amdgpu's default too).
pub const DEFAULT_JOB_TIMEOUT: Duration = Duration::from_secs(2);

/// Shortest timeout a queue may ask for.
pub const MIN_TIMEOUT: Duration = Duration::from_millis(1);

/// Longest timeout a queue may ask for (10 minutes): every wait still ends in finite time.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(600);

const LONG_RUNNING: u64 = 1 << 32;

/// A queue's hang detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Watchdog {
    /// An ordinary queue: a dispatch running longer than this hangs.
    JobTimeout(Duration),
    /// A long-running queue: a dispatch that finishes no workgroup and reaches no
    /// checkpoint for this long hangs.
    NoProgress(Duration),
}

impl Default for Watchdog {
    fn default() -> Self {
        Watchdog::JobTimeout(DEFAULT_JOB_TIMEOUT)
    }
}

/// A watchdog word that is not one this ABI defines, or a timeout out of range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid watchdog word {0:#x} (timeout 1 ms..=600 s, bit 32 for no-progress)")]
pub struct BadWatchdog(pub u64);

impl Watchdog {
    /// The timeout, whichever kind.
    pub fn timeout(&self) -> Duration {
        match *self {
            Watchdog::JobTimeout(t) | Watchdog::NoProgress(t) => t,
        }
    }

    /// Whether the timeout is in the allowed range (whole milliseconds are kept).
    pub fn is_valid(&self) -> bool {
        (MIN_TIMEOUT..=MAX_TIMEOUT).contains(&self.timeout())
    }

    /// The wire word. Sub-millisecond parts are dropped; check [`Watchdog::is_valid`] first.
    pub fn encode(&self) -> u64 {
        let ms = self.timeout().as_millis().min(u32::MAX as u128) as u64;
        match self {
            Watchdog::JobTimeout(_) => ms,
            Watchdog::NoProgress(_) => ms | LONG_RUNNING,
        }
    }

    /// Decodes an untrusted word.
    pub fn decode(word: u64) -> Result<Watchdog, BadWatchdog> {
        if word & !(LONG_RUNNING | u32::MAX as u64) != 0 {
            return Err(BadWatchdog(word));
        }
        let t = Duration::from_millis(word & u32::MAX as u64);
        let w = if word & LONG_RUNNING != 0 {
            Watchdog::NoProgress(t)
        } else {
            Watchdog::JobTimeout(t)
        };
        if w.is_valid() {
            Ok(w)
        } else {
            Err(BadWatchdog(word))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdogs_round_trip_and_bad_words_are_refused() {
        for w in [
            Watchdog::default(),
            Watchdog::JobTimeout(Duration::from_millis(1)),
            Watchdog::NoProgress(Duration::from_millis(250)),
            Watchdog::NoProgress(MAX_TIMEOUT),
        ] {
            assert_eq!(Watchdog::decode(w.encode()), Ok(w));
        }
        for bad in [0, LONG_RUNNING, 600_001, 1 << 33 | 5, u64::MAX] {
            assert_eq!(Watchdog::decode(bad), Err(BadWatchdog(bad)));
        }
        assert!(!Watchdog::JobTimeout(Duration::from_micros(10)).is_valid());
    }
}
