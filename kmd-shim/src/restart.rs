//! DOC: restarting a lost firmware (as amdgpu's GPU recovery and xe's GT reset do for
//! theirs, at the granularity this emulation has: the whole firmware).
//!
//! The event thread declares the device lost when the firmware exits, its heartbeat
//! stalls for [`HEARTBEAT_TIMEOUT`](crate::firmware::HEARTBEAT_TIMEOUT), or an ack never
//! comes. Every fence is poisoned with `DeviceLost` at once (every waiter wakes), and the
//! old status page says `Lost` for good. Then the supervisor (`supervise`, the event thread's loop) restarts the firmware:
//!
//! 1. the lost firmware is let go ([`FirmwareLink::abandon`]: a process is killed and
//!    reaped, frozen or not);
//! 2. at once the first time, after a doubling back-off the next ones, a new firmware starts with fresh boot objects under the next
//!    device generation, and the device's link is swapped to it;
//! 3. new contexts (OPEN_CONTEXT) run on it; contexts of an earlier generation stay lost,
//!    as in Vulkan: every request of theirs answers `DeviceLost`, and closing them only
//!    returns their bookkeeping (their ids are never reused, so nothing of theirs can be
//!    confused with the new firmware's objects).
//!
//! Restarts are bounded by a [`RestartPolicy`]: a firmware that keeps dying is restarted
//! with a doubling back-off, and not at all once it has died too often in a window; the
//! device then stays lost until kmd-shim itself is restarted.

use crate::device::Device;
use crate::firmware::{FirmwareLink, FirmwareStartError};
use crate::launch::FirmwareLauncher;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering::*};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// When kmd-shim restarts a lost firmware.
#[derive(Debug, Clone)]
pub struct RestartPolicy {
    /// Restarts allowed within [`RestartPolicy::window`]; 0 never restarts.
    pub max_restarts: u32,
    /// The window of [`RestartPolicy::max_restarts`].
    pub window: Duration,
    /// Wait before the second restart in the window (the first is immediate); doubled for
    /// each further one.
    pub backoff: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            max_restarts: 5,
            window: Duration::from_secs(60),
            backoff: Duration::from_millis(100),
        }
    }
}

/// What the supervisor needs to start a firmware again.
pub(crate) struct Restarter {
    pub(crate) launcher: FirmwareLauncher,
    pub(crate) policy: RestartPolicy,
    pub(crate) ack_timeout: Duration,
    /// Device memory of each generation.
    pub(crate) vram: u64,
    /// Recent restarts, oldest first (within the policy's window).
    pub(crate) recent: VecDeque<Instant>,
}

impl Restarter {
    /// The back-off before the next restart, or `None` if the policy allows no more.
    fn next_delay(&mut self, now: Instant) -> Option<Duration> {
        let window = self.policy.window;
        while self
            .recent
            .front()
            .is_some_and(|&t| now.duration_since(t) > window)
        {
            self.recent.pop_front();
        }
        let n = self.recent.len() as u32;
        if n >= self.policy.max_restarts {
            return None;
        }
        if n == 0 {
            return Some(Duration::ZERO);
        }
        Some(self.policy.backoff.saturating_mul(1 << (n - 1).min(16)))
    }
}

/// The event thread's body: serves the firmware's events; when the device is lost,
/// restarts the firmware as the policy allows, then serves the new one. Returns when
/// `stopping` is set.
pub(crate) fn supervise(dev: &Device, restarter: &mut Restarter, stopping: &AtomicBool) {
    loop {
        let link = dev.link();
        link.run_events(dev);
        if stopping.load(Acquire) {
            return;
        }
        link.abandon();
        let Some(delay) = restarter.next_delay(Instant::now()) else {
            eprintln!(
                "kmd-shim: the firmware died {} times within {:?}; not restarting it again (restart kmd-shim to recover)",
                restarter.recent.len(),
                restarter.policy.window
            );
            while !stopping.load(Acquire) {
                std::thread::sleep(Duration::from_millis(20));
            }
            return;
        };
        let until = Instant::now() + delay;
        while Instant::now() < until {
            if stopping.load(Acquire) {
                return;
            }
            std::thread::sleep(Duration::from_millis(5).min(delay));
        }
        if stopping.load(Acquire) {
            return;
        }
        restarter.recent.push_back(Instant::now());
        let t = Instant::now();
        match restart(dev, restarter, link.generation() + 1) {
            Ok(()) => eprintln!(
                "kmd-shim: firmware restarted as generation {} in {:?}",
                dev.generation(),
                t.elapsed()
            ),
            Err(e) => eprintln!("kmd-shim: firmware restart failed: {e}"),
        }
        if stopping.load(Acquire) {
            // Kmd::stop may have stopped the link before the swap: let the new one go too.
            // Not `stop`: its Shutdown would wait for an ack that only this thread, the
            // event thread, could deliver.
            dev.link().abandon();
            return;
        }
    }
}

/// Starts a new firmware under `generation` and makes it the device's.
fn restart(dev: &Device, r: &Restarter, generation: u64) -> Result<(), FirmwareStartError> {
    let link = FirmwareLink::start(&r.launcher, generation, r.ack_timeout, r.vram)?;
    if let Err(e) = link.wait_ready(Duration::from_secs(10)) {
        link.abandon();
        // The device keeps the lost link: the next round of `supervise` finds it lost at
        // once and counts another attempt.
        return Err(e);
    }
    dev.replace_link(Arc::new(link));
    dev.event(
        userq_uapi::layout::EventKind::FirmwareRestart,
        0,
        u32::MAX,
        [generation, 0, 0],
    );
    Ok(())
}
