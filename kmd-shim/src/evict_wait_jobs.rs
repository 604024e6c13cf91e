//! DOC: the counterfactual eviction policy, `WaitForIdleJobs` (off by default).
//!
//! This is path 1 of the design thread: eviction that, like a dma-fence-backed memory
//! manager, waits until no job uses a buffer before taking its pages. With page faults and
//! long-running jobs it deadlocks: a job faults, the fault's service needs room, the room
//! is a page of a job that cannot finish until its own fault is serviced. The wait here
//! is the firmware's `WaitJobs`, bounded by the policy's watchdog; when it gives up, the
//! firmware names the jobs still using the buffer, and [`crate::fault`] prints the cycle
//! and stops the faulting queues with `EvictionDeadlock` instead of hanging.
//!
//! It is the only code in kmd-shim that can wait for a job, and it is reachable only
//! through the policy's [`EvictGate`].

use crate::evict::{Deadlock, EvictGate};
use crate::pager::PageLink;
use std::sync::Mutex;
use std::time::Duration;
use userq_uapi::fwmsg::{FwEvent, FwRequest};
use userq_uapi::KmdStatus;

/// The longest watchdog: the firmware's ack must stay inside kmd-shim's ack timeout.
pub const MAX_WATCHDOG: Duration = Duration::from_secs(3);

/// The gate that waits for a buffer's jobs.
pub(crate) struct WaitForJobs<'a> {
    link: &'a PageLink<'a>,
    busy: &'a Mutex<Vec<FwEvent>>,
    watchdog: Duration,
}

impl<'a> WaitForJobs<'a> {
    pub(crate) fn new(
        link: &'a PageLink<'a>,
        busy: &'a Mutex<Vec<FwEvent>>,
        watchdog: Duration,
    ) -> Self {
        WaitForJobs {
            link,
            busy,
            watchdog: watchdog.min(MAX_WATCHDOG),
        }
    }
}

impl EvictGate for WaitForJobs<'_> {
    fn before_invalidate(&mut self, ctx: u32, va: u64) -> Result<(), Deadlock> {
        let timeout_ms = self.watchdog.as_millis() as u32;
        match self.link.firmware().call(
            FwRequest::WaitJobs {
                ctx,
                va,
                timeout_ms,
            },
            &[],
        ) {
            Err(KmdStatus::Busy) => {
                // The firmware sent the Busy events before the ack: they are in.
                let busy =
                    std::mem::take(&mut *self.busy.lock().unwrap_or_else(|e| e.into_inner()));
                Err(Deadlock {
                    victim: (ctx, va),
                    busy,
                })
            }
            _ => Ok(()),
        }
    }
}
