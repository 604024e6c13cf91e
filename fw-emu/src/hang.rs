//! DOC: hang detection, the resets kmd-shim decides, and what a stopped queue leaves.
//!
//! Every DISPATCH handed to the engines is watched until its job finishes. At each tick
//! (every 10 ms while one runs) the firmware applies the queue's
//! [`Watchdog`], read afresh so that a change applies at
//! once:
//!
//! - a job timeout counts the time the job has had a workgroup on an engine (sampled at
//!   each check); time waiting for an engine, yielded between time slices or suspended is
//!   not running, so it cannot hang (the innocent are never blamed for the guilty holding
//!   the engines);
//! - a no-progress watchdog counts the time since a workgroup last finished or reached a
//!   checkpoint, again only while one is on an engine.
//!
//! A watchdog that fires is reported once per dispatch ([`FwEvent::Hang`]); the firmware
//! does not act on its own. kmd-shim decides: [`FwRequest::ResetQueue`] stops only that
//! queue (if it still runs that dispatch), [`FwRequest::BanContext`] every queue of a
//! context that keeps hanging.
//!
//! Whenever a queue stops before executing SIGNAL_FENCE packets its client published (a
//! fault, a reset, a ban, a destroy, its owner's death), the fences those packets name are
//! poisoned with the stop's code, so nobody waits forever for a signal that will never
//! come; queues parked on them fail in turn with `DependencyFailed`.
//!
//! Engine recovery: a cancelled job's workgroups return at their next checkpoint. A
//! workgroup that is still on its engine [`ENGINE_GRACE`] after the cancel never will
//! soon, and the CPU cannot stop a thread, so the firmware starts a replacement engine
//! thread for each such workgroup ([`crate::engine::Engines::replace`]); the held thread
//! leaves the pool when its workgroup returns. The cost: a thread, and the CPU time it
//! burns until then. Its kernel can still reach the buffers of its own VM (the guilty
//! context's) and nothing else.
//!
//! [`FwEvent::Hang`]: userq_uapi::fwmsg::FwEvent::Hang
//! [`FwRequest::ResetQueue`]: userq_uapi::fwmsg::FwRequest::ResetQueue
//! [`FwRequest::BanContext`]: userq_uapi::fwmsg::FwRequest::BanContext

use crate::job::Job;
use crate::{Firmware, QueueId};
use std::sync::Arc;
use std::time::{Duration, Instant};
use userq_uapi::error::ErrorCode;
use userq_uapi::fwmsg::{FwEvent, FwStatus};
use userq_uapi::sync;
use userq_uapi::watchdog::Watchdog;

/// How long a cancelled job's workgroups may stay on their engines before replacement
/// engine threads are started.
pub const ENGINE_GRACE: Duration = Duration::from_millis(100);

/// How often the watchdogs are checked while a dispatch runs.
pub const CHECK_PERIOD: Duration = Duration::from_millis(10);

/// One dispatch being watched.
#[derive(Debug)]
struct Watched {
    id: QueueId,
    job: Arc<Job>,
    /// Time with a workgroup on an engine (sampled at each check).
    active: Duration,
    last_check: Instant,
    /// The job's progress number when it last changed, and when that was.
    progress: u64,
    progress_at: Instant,
    reported: bool,
    /// When the job was first seen cancelled with workgroups still running.
    cancelled_at: Option<Instant>,
    /// Engine threads started in place of the ones it holds.
    replaced: u32,
}

/// The dispatches being watched.
#[derive(Debug, Default)]
pub(crate) struct Watch {
    jobs: Vec<Watched>,
}

impl Watch {
    /// Watches a job just handed to the engines.
    pub(crate) fn add(&mut self, id: QueueId, job: Arc<Job>) {
        let now = Instant::now();
        self.jobs.push(Watched {
            id,
            job,
            active: Duration::ZERO,
            last_check: now,
            progress: 0,
            progress_at: now,
            reported: false,
            cancelled_at: None,
            replaced: 0,
        });
    }

    /// Whether a dispatch is watched.
    pub(crate) fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }
}

impl Firmware {
    /// Collects the jobs the engines (or the command processor) are done with: finished
    /// ones complete their DISPATCH packets; one whose workgroup raised an exception (its
    /// kernel panicked, see [`crate::kernel::Kernel::run`]) stops its queue with
    /// [`ErrorCode::KernelException`], if the queue still runs it, and is reported like
    /// any fault. Returns whether there were any.
    pub(crate) fn collect_completed(&mut self) -> bool {
        let mut jobs = self.engines.take_completed();
        if jobs.is_empty() {
            return false;
        }
        if jobs.iter().any(|j| j.exception().is_some()) {
            jobs.retain(|job| {
                let Some(wg) = job.exception() else {
                    return true;
                };
                let runs_it = self
                    .contexts
                    .queue(job.queue)
                    .and_then(|q| q.running_job())
                    .is_some_and(|j| Arc::ptr_eq(j, job));
                if runs_it {
                    let kernel = job.dispatch.kernel;
                    self.stop_queue(job.queue, ErrorCode::KernelException, wg, kernel);
                }
                false
            });
        }
        self.sched.complete(&mut self.contexts, jobs);
        true
    }

    /// Applies the watchdogs: reports hangs, replaces engines that cancelled workgroups
    /// hold. Returns whether it reported or started anything.
    pub(crate) fn check_hangs(&mut self) -> bool {
        if self.watch.is_empty() {
            return false;
        }
        let now = Instant::now();
        let mut hangs = Vec::new();
        let mut replace = Vec::new();
        let contexts = &self.contexts;
        self.watch.jobs.retain_mut(|w| {
            let job = &w.job;
            if job.is_cancelled() {
                let running = job.running_count();
                if running == 0 {
                    return false;
                }
                let since = *w.cancelled_at.get_or_insert(now);
                if now.duration_since(since) >= ENGINE_GRACE && running > w.replaced {
                    replace.push((job.clone(), running - w.replaced));
                    w.replaced = running;
                }
                return true;
            }
            if !job.unfinished() {
                return false;
            }
            let Some(q) = contexts.queue(w.id) else {
                return false; // destroyed: its job was cancelled
            };
            let delta = now.duration_since(w.last_check);
            w.last_check = now;
            // Not on an engine (not started yet, between time slices, suspended): not
            // running, so it cannot hang; its no-progress clock starts again.
            if job.running_count() == 0 || job.is_suspended() {
                w.progress_at = now;
                return true;
            }
            w.active += delta;
            let p = job.progress();
            if p != w.progress {
                w.progress = p;
                w.progress_at = now;
            }
            let (code, elapsed, limit) = match q.watchdog {
                Watchdog::JobTimeout(t) => (ErrorCode::JobTimeout, w.active, t),
                Watchdog::NoProgress(t) => {
                    (ErrorCode::NoProgress, now.duration_since(w.progress_at), t)
                }
            };
            if elapsed >= limit && !w.reported {
                w.reported = true;
                hangs.push(FwEvent::Hang {
                    ctx: w.id.ctx,
                    slot: w.id.slot,
                    code,
                    packet_index: job.packet_index,
                    elapsed_ms: elapsed.as_millis() as u64,
                    job: job.id,
                });
            }
            true
        });
        let any = !hangs.is_empty() || !replace.is_empty();
        for h in hangs {
            self.control.emit(h);
        }
        for (job, n) in replace {
            self.engines.replace(&job, n as usize);
        }
        any
    }

    /// Resets queue `id` if it still runs job `job` (`u64::MAX`: whatever it runs, or
    /// nothing): its job is cancelled, its timeline poisoned with `code`, and the fences of
    /// its pending SIGNAL_FENCE packets too.
    pub(crate) fn reset_queue(
        &mut self,
        id: QueueId,
        code: ErrorCode,
        detail: u32,
        job: u64,
    ) -> FwStatus {
        let Some(q) = self.contexts.queue_mut(id) else {
            return FwStatus::NotFound;
        };
        if job != u64::MAX && q.running_job().map(|j| j.id) != Some(job) {
            // That dispatch completed meanwhile, or the slot serves another queue now.
            return FwStatus::NotFound;
        }
        if q.fail(code, detail).is_some() {
            self.poison_pending_signals(id, code);
        }
        FwStatus::Ok
    }

    /// Stops queue `id` with `code` at `address`, reports it and poisons its pending
    /// signal targets.
    pub(crate) fn stop_queue(&mut self, id: QueueId, code: ErrorCode, address: u64, detail: u32) {
        if let Some(q) = self.contexts.queue_mut(id) {
            if let Some(f) = q.fail_at(code, address, detail) {
                self.control.report_fault(id, f);
                self.poison_pending_signals(id, code);
            }
        }
    }

    /// Stops every queue of a banned context with [`ErrorCode::ContextBanned`].
    pub(crate) fn ban_context(&mut self, ctx: u32) -> FwStatus {
        let Some(c) = self.contexts.get_mut(ctx) else {
            return FwStatus::NotFound;
        };
        let ids: Vec<QueueId> = c.queue_ids().collect();
        for id in ids {
            let stopped = self
                .contexts
                .queue_mut(id)
                .is_some_and(|q| q.fail(ErrorCode::ContextBanned, 0).is_some());
            if stopped {
                self.poison_pending_signals(id, ErrorCode::ContextBanned);
            }
        }
        FwStatus::Ok
    }

    /// Sets queue `id`'s watchdog.
    pub(crate) fn set_watchdog(&mut self, id: QueueId, watchdog: Watchdog) -> FwStatus {
        match self.contexts.queue_mut(id) {
            Some(q) => {
                q.watchdog = watchdog;
                FwStatus::Ok
            }
            None => FwStatus::NotFound,
        }
    }

    /// Poisons with `code` the fences that queue `id`'s published, unexecuted
    /// SIGNAL_FENCE packets name (where the context may write them). Call it when the
    /// queue stops, before it is torn down.
    pub(crate) fn poison_pending_signals(&mut self, id: QueueId, code: ErrorCode) {
        let Some(c) = self.contexts.get_mut(id.ctx) else {
            return;
        };
        let Some(q) = c.queues.get(id.slot as usize).and_then(Option::as_ref) else {
            return;
        };
        let doorbell = &c.doorbell.doorbells[id.slot as usize].value;
        for (index, handle) in q.pending_signals(doorbell) {
            if let Some(b) = c.bindings.get(&handle).filter(|b| b.writable) {
                sync::poison_fence(b.fence.state(), b.fence.waiters(), code, index, 0, 0);
            }
        }
    }
}
