//! DOC: long-running kernels: spin (and its counted form), the persistent mailbox server,
//! `no_progress`, which never reaches a checkpoint (the hang test case), and `runaway`,
//! which ignores cancellation too (the engine-recovery test case); and `stream_add`, a
//! long-running kernel that streams through a buffer larger than device memory.

use super::{need, one_dimensional};
use crate::kernel::{
    ArgError, ArgKind, Args, Checkpoint, Footprint, Kernel, Workgroup, WorkgroupStatus,
};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;
use userq_uapi::packet::Dispatch;
use userq_uapi::paging::DEVICE_PAGE;
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

/// The words of workgroup `wg`: `per` of them from `index · per`, clipped to `n`.
fn stream_range(a: &Args, wg: &Workgroup) -> std::ops::Range<usize> {
    let (n, per) = (a.u64(0), a.u64(2));
    let start = wg.index.saturating_mul(per).min(n);
    start as usize..start.saturating_add(per).min(n) as usize
}

/// `passes` times over the workgroup's range of u32 words, adding 1 to each. Its state is
/// `pass << 32 | next word` (relative to the range), so a yield anywhere (a checkpoint
/// every 1024 words, and always at the end of a device page) resumes exactly where it
/// stopped: after any number of faults, evictions and replays every word has gained
/// exactly `passes`. Its footprint is the page it is in, so it runs on any budget.
pub(super) struct StreamAdd;

/// Words between two checkpoints of [`StreamAdd`].
const STREAM_CHECKPOINT: usize = 1024;

impl Kernel for StreamAdd {
    fn name(&self) -> &str {
        "stream_add_u32"
    }
    fn signature(&self) -> &[ArgKind] {
        &[U64, U64, U64, B]
    }
    fn validate(&self, a: &Args, d: &Dispatch) -> Result<(), ArgError> {
        one_dimensional(d)?;
        if a.u64(1) == 0 || a.u64(1) > u32::MAX as u64 {
            return Err(ArgError::at(1, a.u64(1)));
        }
        // Words per workgroup: the state keeps an offset in 32 bits; the grid must cover n.
        let per = a.u64(2);
        if per == 0 || per > u32::MAX as u64 || d.workgroup_count().saturating_mul(per) < a.u64(0) {
            return Err(ArgError::at(2, per));
        }
        need(a, 3, a.u64(0), 4)
    }
    fn footprint(&self, a: &Args, wg: &Workgroup, out: &mut Footprint) {
        let r = stream_range(a, wg);
        let at = r.start + (wg.state as u32) as usize;
        if at < r.end {
            // From the word it is at to the end of that page (or of its range).
            let page_end = ((at as u64 * 4) / DEVICE_PAGE + 1) * DEVICE_PAGE / 4;
            let end = (page_end as usize).min(r.end);
            out.items(3, at..end, 4, userq_uapi::paging::Access::Write);
        }
    }
    fn run(&self, a: &Args, wg: &mut Workgroup, cp: &Checkpoint<'_>) -> WorkgroupStatus {
        let r = stream_range(a, wg);
        let passes = a.u64(1);
        let words = a.buffer(3).words32();
        let mut pass = wg.state >> 32;
        let mut at = r.start + (wg.state as u32) as usize;
        let save = |wg: &mut Workgroup, pass: u64, at: usize| {
            wg.state = pass << 32 | (at - r.start) as u64;
        };
        if r.is_empty() {
            return WorkgroupStatus::Done;
        }
        // To the end of the page the footprint pinned, then yield to pin the next one.
        let page_end = ((at as u64 * 4) / DEVICE_PAGE + 1) * DEVICE_PAGE / 4;
        let end = (page_end as usize).min(r.end);
        while at < end {
            let stop = (at + STREAM_CHECKPOINT).min(end);
            for w in &words[at..stop] {
                w.store(w.load(Relaxed).wrapping_add(1), Relaxed);
            }
            at = stop;
            if at < end && cp.should_yield() {
                save(wg, pass, at);
                return WorkgroupStatus::Yielded;
            }
        }
        if at >= r.end {
            pass += 1;
            at = r.start;
            if pass >= passes {
                return WorkgroupStatus::Done;
            }
        }
        save(wg, pass, at);
        // A checkpoint: counts as progress for the no-progress watchdog.
        let _ = cp.should_yield();
        WorkgroupStatus::Yielded
    }
}
