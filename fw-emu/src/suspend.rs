//! DOC: suspend and resume of a queue or a whole context (kmd-shim's preemption request).
//!
//! A suspend marks the queues suspended: they take no packet, and their running dispatch
//! starts no workgroup while running ones yield at their next checkpoint. It is
//! acknowledged once none of its jobs has a workgroup on an engine — a bounded wait, as
//! the kmd↔fw contract requires: a workgroup that does not yield within
//! [`crate::PREEMPT_TIMEOUT`] gets its queue reset (`PreemptTimeout`) and the suspend fails,
//! instead of the ack (and with it the device) hanging. Resume clears the flags, kicks the
//! engines and puts the queues back on the run list.

use crate::job::Job;
use crate::{Firmware, PREEMPT_TIMEOUT};
use std::sync::Arc;
use std::time::Instant;
use userq_uapi::error::ErrorCode;
use userq_uapi::fwmsg::FwStatus;

/// A suspend acknowledged once its jobs have no workgroup on an engine, or failed at its
/// deadline.
#[derive(Debug)]
pub(crate) struct PendingSuspend {
    seq: u32,
    jobs: Vec<Arc<Job>>,
    deadline: Instant,
}

impl Firmware {
    /// Suspends queue `slot` of `ctx` (or every queue of it). Returns the ack's status now,
    /// or `None` if the ack waits for running workgroups to leave the engines.
    pub(crate) fn suspend(&mut self, seq: u32, ctx: u32, slot: Option<u32>) -> Option<FwStatus> {
        match self.set_suspended(ctx, slot, true) {
            Ok(jobs) if jobs.iter().any(|j| j.is_running()) => {
                self.pending_suspends.push(PendingSuspend {
                    seq,
                    jobs,
                    deadline: Instant::now() + PREEMPT_TIMEOUT,
                });
                None
            }
            Ok(_) => Some(FwStatus::Ok),
            Err(e) => Some(e),
        }
    }

    /// Resumes what a suspend stopped.
    pub(crate) fn resume(&mut self, ctx: u32, slot: Option<u32>) -> FwStatus {
        match self.set_suspended(ctx, slot, false) {
            Ok(_) => {
                self.engines.kick();
                FwStatus::Ok
            }
            Err(e) => e,
        }
    }

    /// Suspends (or resumes) one queue or a whole context; returns the jobs whose running
    /// workgroups a suspend must wait out. Resumed queues go back on the run list.
    fn set_suspended(
        &mut self,
        ctx: u32,
        slot: Option<u32>,
        on: bool,
    ) -> Result<Vec<Arc<Job>>, FwStatus> {
        let c = self.contexts.get_mut(ctx).ok_or(FwStatus::NotFound)?;
        let slots: Vec<u32> = match slot {
            Some(s) => {
                if c.queue_mut(s).is_none() {
                    return Err(FwStatus::NotFound);
                }
                vec![s]
            }
            None => {
                c.suspended = on;
                c.queue_ids().map(|id| id.slot).collect()
            }
        };
        let mut jobs = Vec::new();
        for s in slots {
            if let Some(q) = c.queue_mut(s) {
                jobs.extend(q.set_suspended(on));
                if !on {
                    self.sched.schedule(q);
                }
            }
        }
        Ok(jobs)
    }

    /// Acknowledges suspends whose jobs no longer run a workgroup; at a suspend's deadline,
    /// resets the queues whose workgroups still run and fails the suspend.
    pub(crate) fn ack_suspends(&mut self) -> bool {
        if self.pending_suspends.is_empty() {
            return false;
        }
        let now = Instant::now();
        let mut any = false;
        for p in std::mem::take(&mut self.pending_suspends) {
            if p.jobs.iter().all(|j| !j.is_running()) {
                self.control.ack(p.seq, FwStatus::Ok);
                any = true;
            } else if now >= p.deadline {
                for job in p.jobs.iter().filter(|j| j.is_running()) {
                    self.stop_queue(job.queue, ErrorCode::PreemptTimeout, 0, 0);
                }
                self.control.ack(p.seq, FwStatus::PreemptTimeout);
                any = true;
            } else {
                self.pending_suspends.push(p);
            }
        }
        any
    }

    /// Whether a suspend waits for workgroups to yield.
    pub(crate) fn suspends_pending(&self) -> bool {
        !self.pending_suspends.is_empty()
    }
}
