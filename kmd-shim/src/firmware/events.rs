//! DOC: the event thread: drains the firmware's `to_kmd` ring (acks to their callers,
//! queue errors, hangs, page faults and busy reports to the [`EventSink`]), sleeps on
//! `kmd_kick` as soon as it runs out of work, and declares the device lost when the
//! firmware exited, its heartbeat stalled, or a request went unacknowledged.

use super::{FirmwareLink, Running};
use std::sync::atomic::Ordering::*;
use std::time::{Duration, Instant};
use userq_uapi::fwmsg::FwEvent;
use userq_uapi::sync;

/// How long the heartbeat may stall before the firmware counts as hung (it beats at
/// least every [`userq_uapi::HEARTBEAT_PERIOD_MS`]; the event thread looks at least that
/// often, so a frozen firmware is declared lost within this plus one period).
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_millis(20 * userq_uapi::HEARTBEAT_PERIOD_MS);

/// What the event thread reports to kmd-shim's device table.
pub trait EventSink: Send + Sync {
    /// A queue stopped on an error.
    fn queue_error(&self, ev: FwEvent);
    /// A queue's watchdog fired ([`FwEvent::Hang`]). Called on the event thread: it may
    /// [`FirmwareLink::post`] requests but must not wait for an ack.
    fn hang(&self, ev: FwEvent);
    /// The firmware died or stopped its heartbeat.
    fn device_lost(&self);
    /// A page fault ([`FwEvent::Fault`]); the last of a batch completes it. Called on the
    /// event thread: it hands the batch to the pager and never waits.
    fn fault(&self, ev: FwEvent);
    /// A job that a timed-out `WaitJobs` still found using a buffer ([`FwEvent::Busy`]).
    fn busy(&self, ev: FwEvent);
}

impl FirmwareLink {
    /// The event thread's body: runs until [`FirmwareLink::stop`], or until it declared the
    /// device lost (after telling `sink`).
    ///
    /// It and the pager thread ([`crate::pager`]) sleep as soon as they run out of work: no
    /// spin, no yield phase (the firmware's event kick, the pager's condition variable wake
    /// them). On two cores the command processor polls on one and a spinning client holds
    /// the other, so a third spinner takes a CPU from one of them:
    /// - with a half-millisecond yield phase, a page fault's round trip under an adaptive
    ///   (default) wait took 214-504 us at p50, 60-72 us without (under EEVDF every
    ///   `sched_yield` moves the caller's deadline a whole slice later, so a thread that
    ///   yielded for long is picked after everyone else once it has work);
    /// - with a 20 us spin after the last work, a resident dispatch right after a fault took
    ///   24-48 us at p50 for whole rounds, about a third of them (the spinning thread held the
    ///   command processor's vCPU), 0.6 us with none; a fault's own round trip is the same
    ///   either way (three alternated `userq-bench paging --quick` runs of each).
    pub fn run_events(&self, sink: &dyn EventSink) {
        let c = &*self.control;
        let mut last_beat = (self.status().health.heartbeat.load(Relaxed), Instant::now());
        while !self.stop.load(Acquire) {
            let mut got = false;
            // Whether a thread now has work from this turn: the pager a batch of faults,
            // a request's sender its ack.
            let mut handed = false;
            while let Some(w) = c.to_kmd.pop() {
                got = true;
                match FwEvent::decode(&w) {
                    Some(FwEvent::Ready) => {} // seen by `wait_ready` already
                    Some(FwEvent::Ack { seq, status }) => {
                        let mut acks = self.acks.lock().unwrap_or_else(|e| e.into_inner());
                        if let Some(slot) = acks.get_mut(&seq) {
                            *slot = Some(status);
                            self.acked.notify_all();
                            handed = true;
                        }
                    }
                    Some(ev @ FwEvent::QueueError { .. }) => sink.queue_error(ev),
                    Some(ev @ FwEvent::Hang { .. }) => sink.hang(ev),
                    Some(ev @ FwEvent::Fault { last, .. }) => {
                        sink.fault(ev);
                        handed |= last;
                    }
                    Some(ev @ FwEvent::Busy { .. }) => sink.busy(ev),
                    None => {}
                }
            }
            // That thread may be queued on this vCPU (with a client spinning on the other
            // one, all of kmd-shim and the firmware share one): give way once, before this
            // thread looks at the ring again and announces its sleep. A page fault's round
            // trip crosses this thread twice (the batch, then the acks of its maps and
            // replies).
            if handed {
                std::thread::yield_now();
            }
            if got {
                continue;
            }
            // Out of work: sleep at once (see above). NEED_WAKEUP on the to_kmd ring, with
            // the heartbeat period as a bound.
            sync::announce_and_sleep(
                &c.kmd_sleep,
                &c.kmd_kick.word,
                || {
                    c.to_kmd.has_message()
                        || self.stop.load(Acquire)
                        || self.exit_seen.load(Acquire)
                },
                Duration::from_millis(userq_uapi::HEARTBEAT_PERIOD_MS),
            );
            // Events first (a page fault's acks wake this thread): the health check costs
            // a lock and, in daemon mode, a syscall. It runs once the ring is drained and
            // the thread would sleep again, which a firmware that died finds at once.
            if c.to_kmd.has_message() {
                continue;
            }
            if !self.is_lost()
                && !self.stopping.load(Acquire)
                && self.ready.load(Acquire)
                && (self.hung.load(Acquire) || self.firmware_dead(&mut last_beat))
            {
                self.mark_lost();
                sink.device_lost();
                return;
            }
        }
    }

    /// Whether the firmware exited or its heartbeat stalled for [`HEARTBEAT_TIMEOUT`].
    fn firmware_dead(&self, last: &mut (u64, Instant)) -> bool {
        let beat = self.status().health.heartbeat.load(Relaxed);
        if beat != last.0 {
            *last = (beat, Instant::now());
        }
        self.exited() || last.1.elapsed() > HEARTBEAT_TIMEOUT
    }

    /// Whether the firmware process exited or its thread finished.
    pub(super) fn exited(&self) -> bool {
        match self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            Some(Running::Process(child)) => !matches!(child.try_wait(), Ok(None)),
            Some(Running::Thread(t)) => t.is_finished(),
            None => true,
        }
    }
}
