//! DOC: long-running kernels: spin (and its counted form), the persistent mailbox server,
//! `no_progress`, which never reaches a checkpoint (the hang test case), and `runaway`,
//! which ignores cancellation too (the engine-recovery test case).

use super::need;
use crate::kernel::{ArgError, ArgKind, Args, Checkpoint, Kernel, Workgroup, WorkgroupStatus};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;
use userq_uapi::packet::Dispatch;
use ArgKind::{Buffer as B, U64};

pub(super) struct Spin;
impl Kernel for Spin {
    fn name(&self) -> &str {
        "spin"
    }
    fn signature(&self) -> &[ArgKind] {
        &[U64]
    }
    fn validate(&self, _: &Args, _: &Dispatch) -> Result<(), ArgError> {
        Ok(())
    }
    fn run(&self, a: &Args, wg: &mut Workgroup, cp: &Checkpoint<'_>) -> WorkgroupStatus {
        // `wg.state` holds the nanoseconds already spun: a long spin yields at checkpoints
        // and resumes where it stopped.
        let total = a.u64(0);
        let start = Instant::now();
        let done_before = wg.state;
        loop {
            let spun = done_before.saturating_add(start.elapsed().as_nanos() as u64);
            if spun >= total {
                return WorkgroupStatus::Done;
            }
            for _ in 0..64 {
                std::hint::spin_loop();
            }
            if cp.should_yield() {
                wg.state = done_before.saturating_add(start.elapsed().as_nanos() as u64);
                return WorkgroupStatus::Yielded;
            }
        }
    }
}

pub use userq_uapi::kernels::mailbox;

/// The classic persistent kernel: one workgroup that serves a mailbox in device memory
/// until told to stop, yielding its engine at checkpoints while idle or when its slice is
/// used.
pub(super) struct Persistent;
impl Kernel for Persistent {
    fn name(&self) -> &str {
        "persistent"
    }
    fn signature(&self) -> &[ArgKind] {
        &[B]
    }
    fn validate(&self, a: &Args, d: &Dispatch) -> Result<(), ArgError> {
        if d.workgroup_count() != 1 {
            return Err(ArgError::at(0, d.workgroup_count()));
        }
        need(a, 0, mailbox::WORDS as u64, 8)
    }
    fn run(&self, a: &Args, _: &mut Workgroup, cp: &Checkpoint<'_>) -> WorkgroupStatus {
        use std::sync::atomic::Ordering::{Acquire, Release};
        let m = a.buffer(0).words64();
        loop {
            if cp.cancelled() || m[mailbox::STOP].load(Acquire) != 0 {
                return WorkgroupStatus::Done;
            }
            let req = m[mailbox::REQUEST_SEQ].load(Acquire);
            if req != m[mailbox::RESPONSE_SEQ].load(Relaxed) {
                let v = m[mailbox::REQUEST_VALUE].load(Relaxed);
                m[mailbox::RESPONSE_VALUE].store(v.wrapping_mul(3).wrapping_add(1), Relaxed);
                m[mailbox::RESPONSE_SEQ].store(req, Release);
            } else {
                std::hint::spin_loop();
            }
            // Every iteration: a stream of requests must not keep the engine forever.
            if cp.should_yield() {
                return WorkgroupStatus::Yielded;
            }
        }
    }
}

/// A kernel that never reaches a checkpoint: it holds its engine until its dispatch is
/// cancelled (its queue destroyed or reset), as a GPU wave that loops forever holds its
/// compute unit until the queue reset kills it. It exists to test hang handling.
pub(super) struct NoProgress;
impl Kernel for NoProgress {
    fn name(&self) -> &str {
        "no_progress"
    }
    fn signature(&self) -> &[ArgKind] {
        &[]
    }
    fn validate(&self, _: &Args, _: &Dispatch) -> Result<(), ArgError> {
        Ok(())
    }
    fn run(&self, _: &Args, _: &mut Workgroup, cp: &Checkpoint<'_>) -> WorkgroupStatus {
        while !cp.cancelled() {
            std::hint::spin_loop();
        }
        WorkgroupStatus::Done
    }
}

/// Spins `ns` per workgroup, then counts the workgroup in `counter[0]`: engine time made
/// visible to the host, for fairness probes.
pub(super) struct SpinCounted;
impl Kernel for SpinCounted {
    fn name(&self) -> &str {
        "spin_counted"
    }
    fn signature(&self) -> &[ArgKind] {
        &[U64, B]
    }
    fn validate(&self, a: &Args, _: &Dispatch) -> Result<(), ArgError> {
        if a.u64(0) > 1_000_000_000 {
            return Err(ArgError::at(0, a.u64(0)));
        }
        need(a, 1, 1, 8)
    }
    fn run(&self, a: &Args, _: &mut Workgroup, _: &Checkpoint<'_>) -> WorkgroupStatus {
        let until = Instant::now() + std::time::Duration::from_nanos(a.u64(0));
        while Instant::now() < until {
            std::hint::spin_loop();
        }
        a.buffer(1).words64()[0].fetch_add(1, Relaxed);
        WorkgroupStatus::Done
    }
}

/// Spins `ns` per workgroup without a checkpoint and without looking at cancellation: the
/// CPU cannot stop it, so a reset leaves its engine thread held until it returns. It
/// exists to test engine recovery ([`crate::engine::Engines::replace`]).
pub(super) struct Runaway;
impl Kernel for Runaway {
    fn name(&self) -> &str {
        "runaway"
    }
    fn signature(&self) -> &[ArgKind] {
        &[U64]
    }
    fn validate(&self, a: &Args, _: &Dispatch) -> Result<(), ArgError> {
        if a.u64(0) > userq_uapi::kernels::RUNAWAY_MAX_NS {
            return Err(ArgError::at(0, a.u64(0)));
        }
        Ok(())
    }
    fn run(&self, a: &Args, _: &mut Workgroup, _: &Checkpoint<'_>) -> WorkgroupStatus {
        let until = Instant::now() + std::time::Duration::from_nanos(a.u64(0));
        while Instant::now() < until {
            for _ in 0..64 {
                std::hint::spin_loop();
            }
        }
        WorkgroupStatus::Done
    }
}
