//! DOC: what an engine thread does: take the best ready job, run its workgroups for a
//! time slice ([`run_slice`], which the command processor's inline dispatches share),
//! report the job complete when its last workgroup finishes (or when one raises an
//! exception: see [`crate::kernel::contain`]), and park when there is no work.

use super::*;

pub(super) fn engine(s: &Shared, index: usize) {
    loop {
        let job = {
            let mut l = s.lists.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                if s.stop.load(Acquire) {
                    return;
                }
                if let Some(j) = l.pick() {
                    s.top.store(l.top(), Release);
                    break j;
                }
                s.top.store(0, Release);
                // Read under the lock: work added after it bumps the word, so the wait
                // returns at once instead of missing it.
                let seen = s.work.load(Acquire);
                s.parked.fetch_add(1, Relaxed);
                drop(l);
                atomic_wait::wait(&s.work, seen);
                l = s.lists.lock().unwrap_or_else(|e| e.into_inner());
                s.parked.fetch_sub(1, Relaxed);
            }
        };
        let delivered = userq_uapi::sync::wakes_delivered();
        let start = Instant::now();
        let end = run_slice(s, &job, start, Some(s.slice(&job)), FAULT_AHEAD);
        let ns = start.elapsed().as_nanos() as u64;
        job.engine_ns.fetch_add(ns, Relaxed);
        // fetch_add: a replacement thread may share a line (index modulo the table).
        let (busy, wgs) = &*s.stats[index];
        busy.fetch_add(ns, Relaxed);
        wgs.fetch_add(end.finished, Relaxed);
        if end.last {
            s.post_completed(job.clone());
            (s.wake_command_processor)();
        }
        // Give way once if the slice woke the sleeping command processor (a completion or
        // a fault; it sleeps while long jobs run): it may be queued on this vCPU, behind
        // this engine's next slice of up to 1 ms (see `Firmware::run` for the cost).
        if userq_uapi::sync::wakes_delivered() != delivered {
            std::thread::yield_now();
        }
        // A replacement took this thread's place while it was held in this job: leave the
        // pool (only threads that ran the job's workgroups can get here with it).
        let owed = job.owed.fetch_update(AcqRel, Acquire, |n| n.checked_sub(1));
        let surplus = || {
            s.surplus
                .fetch_update(AcqRel, Acquire, |n| n.checked_sub(1))
                .is_ok()
        };
        if owed.is_ok() || surplus() {
            s.live.fetch_sub(1, AcqRel);
            return;
        }
    }
}

/// How a slice of a job ended.
pub(super) struct SliceEnd {
    /// Workgroups it finished.
    pub(super) finished: u64,
    /// It finished the job's last workgroup: the caller reports the job complete.
    pub(super) last: bool,
    /// A workgroup of it raised an exception: the job is cancelled and already on the
    /// completed list, where the command processor finds it and stops its queue.
    pub(super) raised: bool,
    /// A workgroup faulted: the job waits for kmd-shim, its fault note is posted.
    pub(super) faulted: bool,
}

/// Runs workgroups of one job until the job has none left, `slice` is used, a job of
/// higher priority is ready, or a workgroup yields at a checkpoint or faults. The slice
/// began at `start` (the caller's clock read, which also times it for the telemetry).
/// With no `slice` (the command processor's inline run of a bounded dispatch), neither
/// the clock nor other jobs end it: it runs the job to the end unless stopped, suspended,
/// faulted, or (for a paged job) an invalidation waits for pins to drain. A fault looks at
/// up to `fault_ahead_limit` workgroups past the faulting one.
pub(super) fn run_slice(
    s: &Shared,
    job: &Arc<Job>,
    start: Instant,
    slice: Option<Duration>,
    fault_ahead_limit: u64,
) -> SliceEnd {
    let mut finished = 0;
    let end = |finished, last| SliceEnd {
        finished,
        last,
        raised: false,
        faulted: false,
    };
    // A workgroup's kernel code panicked: the job is cancelled and goes to the command
    // processor as if complete (the first time only), which stops its queue.
    let raise = |finished, wg: &Workgroup| {
        if job.raise(wg.index) {
            s.post_completed(job.clone());
            (s.wake_command_processor)();
        }
        SliceEnd {
            finished,
            last: false,
            raised: true,
            faulted: false,
        }
    };
    let my_rank = job.priority as u32 + 1;
    let wants_engine = || {
        slice.is_some_and(|slice| start.elapsed() >= slice || s.top.load(Acquire) > my_rank)
            || s.stop.load(Relaxed)
    };
    let wants_engine = || {
        wants_engine()
            || job.suspended.load(Relaxed)
            || (job.paged && s.invalidating.load(Relaxed) > 0)
    };
    let bump = || job.bump_progress();
    let cp = Checkpoint {
        wants_engine: &wants_engine,
        cancelled: &job.cancelled,
        reached: &bump,
    };
    loop {
        // Announce the workgroup before checking for suspension (SeqCst on both sides):
        // either the suspender sees it running, or this engine sees the suspension.
        job.running.fetch_add(1, SeqCst);
        let _done = RunningGuard(&job.running);
        if job.cancelled.load(Acquire) || s.stop.load(Relaxed) || job.suspended.load(SeqCst) {
            return end(finished, false);
        }
        // A workgroup that yielded earlier resumes before new ones start.
        let mut wg = match job.take_yielded() {
            Some(wg) => wg,
            None => {
                let index = job.next.fetch_add(1, AcqRel);
                if index >= job.total {
                    return end(finished, false);
                }
                Workgroup::of(&job.dispatch, index)
            }
        };
        // A paged job's workgroup pins its footprint first; unpinned when `_pins` drops.
        let _pins = if job.paged {
            match contain(|| pin_footprint(job, &wg)) {
                None => return raise(finished, &wg),
                Some(Ok(p)) => Some(p),
                Some(Err(mut note)) => {
                    job.faults.fetch_add(note.pages.len() as u64, Relaxed);
                    fault_ahead(job, &mut note, fault_ahead_limit);
                    job.put_yielded(wg);
                    job.faulted.store(true, Release);
                    s.faults
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(note);
                    s.has_faults.store(true, Release);
                    (s.wake_command_processor)();
                    return SliceEnd {
                        faulted: true,
                        ..end(finished, false)
                    };
                }
            }
        } else {
            None
        };
        let status = contain(|| job.kernel.run(&job.args, &mut wg, &cp));
        drop(_pins);
        let Some(status) = status else {
            return raise(finished, &wg);
        };
        match status {
            WorkgroupStatus::Yielded => {
                job.put_yielded(wg);
                // The job is still listed (it is not finished): make sure a parked engine
                // sees the work it can take again.
                let _l = s.lists.lock().unwrap_or_else(|e| e.into_inner());
                s.notify_one_engine();
                return end(finished, false);
            }
            WorkgroupStatus::Done => {
                job.bump_progress();
                finished += 1;
            }
        }
        // AcqRel: the last finisher sees every other engine's writes before reporting.
        if job.done.fetch_add(1, AcqRel) + 1 == job.total {
            return end(finished, true);
        }
        if wants_engine() {
            return end(finished, false);
        }
    }
}

/// Ends a workgroup's "running" announcement however the workgroup ends.
struct RunningGuard<'a>(&'a AtomicU32);

impl Drop for RunningGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, SeqCst);
    }
}
