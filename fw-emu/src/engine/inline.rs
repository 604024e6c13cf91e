//! DOC: the engines' work the command processor runs itself: a small dispatch inline
//! ([`Engines::run_inline`]) and a larger one's workgroups while every engine is parked
//! ([`Engines::help`]).

use super::*;

/// The most work-items a dispatch may have for the command processor to run it itself
/// ([`Engines::run_inline`]): one full workgroup's worth.
pub const INLINE_ITEMS: u64 = userq_uapi::packet::MAX_WORKGROUP_ITEMS;

/// How long one [`Engines::help`] call runs workgroups before it returns (it finishes the
/// one it is in): about what [`Engines::run_inline`] may hold the command processor.
pub const HELP_SLICE: Duration = Duration::from_micros(5);

/// The most work-items a bounded dispatch may have for [`Engines::submit`] to leave it to
/// the command processor's help instead of waking a parked engine at once: four
/// workgroups' worth (about 20 µs for the slowest built-ins, 2-4 µs for a fill).
pub const HELP_DEFER_ITEMS: u64 = 4 * INLINE_ITEMS;

/// How long such a dispatch waits for the command processor's help before the engines are
/// woken anyway ([`Engines::kick_deferred`]): the command processor helps only in turns
/// with nothing else to do, so a busy one leaves it to the engines.
pub const HELP_DEFER: Duration = Duration::from_micros(20);

impl Lists {
    /// The job the command processor may help with ([`Engines::help`]): the first
    /// claimable one of the highest priority that has any, if its workgroups are bounded.
    /// Does not rotate the list.
    fn helpable(&self) -> Option<Arc<Job>> {
        let list = self
            .ready
            .iter()
            .rev()
            .find(|l| l.iter().any(|j| j.claimable()))?;
        list.iter()
            .find(|j| j.claimable())
            .filter(|j| j.bounded)
            .cloned()
    }
}

impl Engines {
    /// Runs a small dispatch on the calling thread, the command processor, instead of
    /// handing it to an engine, as io_uring issues a request inline before it punts to a
    /// worker: an idle engine is a parked thread, and waking it costs more (a futex wake
    /// and a context switch, 7-30 µs here) than the whole dispatch. Only when that is
    /// sure to be short and overtakes no one:
    ///
    /// - the kernel's workgroups are bounded by their work-items ([`Kernel::bounded`]),
    ///   and the dispatch has at most [`INLINE_ITEMS`] of them (one full workgroup's
    ///   worth: about 5 µs here for the slowest built-ins, a checksum or histogram of 1024
    ///   items, plus a first touch of buffer pages never touched before), so the command
    ///   processor is not held for long;
    /// - no job waits for an engine, so none is overtaken.
    ///
    /// A job with on-demand buffers runs here too: its workgroups pin their footprints as
    /// on an engine, and one whose pages are not resident faults the same way (the job
    /// stops, the fault goes to kmd-shim with the next flush), and the job goes to the
    /// engines; after the reply, [`Engines::resume`] runs it here first if the engines
    /// are still parked.
    ///
    /// It runs the job to the end (no time slice, no preemption between its workgroups).
    /// Returns whether the job completed. If not (not eligible, or the firmware is
    /// stopping), the caller hands it to the engines as usual, and they would carry on
    /// where it stopped; unless a workgroup raised an exception: then the job is
    /// cancelled and on the completed list already (see [`Job::exception`]). The time
    /// counts for the job's queue and context like engine time, and in the command
    /// processor's own line ([`Engines::inline_stats`]).
    ///
    /// [`Kernel::bounded`]: crate::kernel::Kernel::bounded
    pub fn run_inline(&self, job: &Arc<Job>) -> bool {
        let items = job
            .total
            .saturating_mul(job.dispatch.workgroup.iter().map(|&w| w as u64).product());
        if !job.bounded || items > INLINE_ITEMS || self.work_waits() {
            return false;
        }
        // No slice: bounded workgroups, at most one workgroup's worth of items, so the run
        // is short; leaving early would hand the rest to a parked engine for nothing.
        self.run_here(job, None).last
    }

    /// Runs workgroups of `job` on the calling thread, the command processor, and counts
    /// the time for the job and in the command processor's own line.
    fn run_here(&self, job: &Arc<Job>, slice: Option<Duration>) -> worker::SliceEnd {
        let start = Instant::now();
        let end = run_slice(&self.shared, job, start, slice, FAULT_AHEAD_ON_CP);
        let ns = start.elapsed().as_nanos() as u64;
        job.engine_ns.fetch_add(ns, Relaxed);
        self.inline.0.fetch_add(ns, Relaxed);
        self.inline.1.fetch_add(end.finished, Relaxed);
        end
    }

    /// Runs a little of a job that waits for the engines on the calling thread, the
    /// command processor, in a turn with nothing else to do, while every engine thread is
    /// parked: the job's engine is being woken, or for a small job not yet
    /// ([`Engines::kick_deferred`]) (a futex wake and a context switch, 7-30 µs
    /// here, often onto a vCPU a spinning client holds), and the job's workgroups need not
    /// wait for that; a small job is often done before the engine arrives, which takes
    /// the rest. Workgroups are claimed one by one, so none runs twice. Only when the
    /// engines are all parked, so the command processor never becomes one more engine
    /// under load, and only jobs [`Engines::run_inline`] could run (bounded workgroups; a
    /// paged one pins and faults as on an engine), for at most [`HELP_SLICE`] (plus the
    /// workgroup that ends it) per call. The time counts as the command processor's own
    /// ([`Engines::inline_stats`]). Returns whether it ran a workgroup; a job whose last
    /// workgroup it finished goes on the completed list, as does one whose workgroup
    /// raised an exception.
    pub fn help(&self) -> bool {
        let s = &*self.shared;
        // With no engine thread at all, helping would hide it: never.
        let all_parked = || {
            let live = s.live.load(Relaxed);
            live > 0 && s.parked.load(Relaxed) == live
        };
        // Without the lock first: an idle turn must stay cheap.
        if s.top.load(Acquire) == 0
            || !all_parked()
            || self.help_idle.load(Relaxed) == s.work.load(Relaxed) as u64
        {
            return false;
        }
        let job = {
            let l = s.lists.lock().unwrap_or_else(|e| e.into_inner());
            if !all_parked() {
                return false;
            }
            match l.helpable() {
                Some(j) => j,
                None => {
                    // Nothing it may run (the waiting job is not bounded):
                    // ask again only when work is added (the word moves under this lock).
                    self.help_idle.store(s.work.load(Relaxed) as u64, Relaxed);
                    return false;
                }
            }
        };
        let end = self.run_here(&job, Some(HELP_SLICE));
        if end.last || end.raised {
            // Off the ready lists (an engine that looked while the last workgroup ran kept
            // it there, unfinished), so it holds no kernel or buffers once collected. A job
            // that raised is cancelled (finished) and posted already.
            s.prune_ready();
            if end.last {
                s.post_completed(job);
            }
        }
        // A fault counts too: its note goes out at the next turn's flush, which must not
        // wait for a back-off.
        end.finished > 0 || end.raised || end.faulted
    }

    /// Resumes a job whose fault kmd-shim serviced. If the job may be left to the command
    /// processor (as `Engines::may_defer` says: small, bounded, every engine parked), it
    /// first runs ready work here as [`Engines::help`] does (the first claimable job of
    /// the highest priority: usually this one): a small paged dispatch that faulted inline
    /// then finishes in this one call, where waking a parked engine for it costs a futex
    /// wake and a context switch, often onto the vCPU a client spins on. The engines are
    /// kicked if work is left for them. Larger jobs are kicked to the engines at once, so a
    /// batch of replies costs the command processor at most one help slice per small job.
    pub fn resume(&self, job: &Job) {
        job.resume_after_fault();
        // Claimable again: the ready-work hint first (`help` looks only while it is set),
        // without waking anyone yet. An engine that parks meanwhile is not missed: if
        // `help` leaves work, the kick below bumps the word it waits on.
        let small = {
            let l = self.shared.lists.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.top.store(l.top(), Release);
            self.may_defer(job)
        };
        if !small {
            self.kick();
            return;
        }
        // `help` looks again only once work was added; a resume adds some without a kick.
        self.help_idle.store(u64::MAX, Relaxed);
        self.help();
        if self.work_waits() {
            self.kick();
        }
    }

    /// Whether [`Engines::submit`] may leave `job` to the command processor's help instead
    /// of waking an engine: bounded, at most [`HELP_DEFER_ITEMS`], and every engine parked
    /// (so that the command processor never becomes one more engine under load). Waking a
    /// parked engine costs a futex wake and a context switch (7-30 µs here, often onto
    /// the vCPU the client spins on or the command processor runs on), and for a job this
    /// small the engine often finds it finished when it arrives. Called under the lists
    /// lock.
    pub(super) fn may_defer(&self, job: &Job) -> bool {
        let s = &*self.shared;
        let items = job
            .total
            .saturating_mul(job.dispatch.workgroup.iter().map(|&w| w as u64).product());
        let live = s.live.load(Relaxed);
        job.bounded && items <= HELP_DEFER_ITEMS && live > 0 && s.parked.load(Relaxed) == live
    }

    /// Notes that a deferred job waits for help (the earliest deadline stands), and lets
    /// [`Engines::help`] look again at once.
    pub(super) fn defer_wake(&self) {
        if !self.has_deferred() {
            // At least 1: 0 means none.
            let due = (self.epoch.elapsed() + HELP_DEFER).as_nanos() as u64;
            self.deferred_until.store(due.max(1), Relaxed);
        }
        self.help_idle.store(u64::MAX, Relaxed);
    }

    /// Whether a deferred job may still wait for help: the command processor does not
    /// sleep meanwhile.
    pub fn has_deferred(&self) -> bool {
        self.deferred_until.load(Relaxed) != 0
    }

    /// The command processor, every turn: ends a deferral once nothing claimable is left
    /// (help finished the job, an engine took it, or it was cancelled), or once
    /// [`HELP_DEFER`] has passed, then wakes the engines for whatever is left. Ending it
    /// also drops finished jobs from the ready lists: a deferred job cancelled (its queue
    /// reset or destroyed) before anyone ran it would otherwise stay listed, holding its
    /// kernel and buffers, until an engine next looked, which on an idle device may be
    /// never (an engine woken at submit used to do it).
    pub fn kick_deferred(&self) {
        let until = self.deferred_until.load(Relaxed);
        if until == 0 {
            return;
        }
        let due =
            self.shared.top.load(Acquire) == 0 || self.epoch.elapsed().as_nanos() as u64 >= until;
        if !due {
            return;
        }
        self.deferred_until.store(0, Relaxed);
        if self.shared.prune_ready() != 0 {
            self.kick();
        }
    }

    /// Whether a job has work waiting for an engine. Asked under the lists lock: the `top`
    /// hint is set when an engine picks a job, before it takes the job's last workgroup,
    /// so it can still say "waiting" for a job that an engine is running to the end.
    fn work_waits(&self) -> bool {
        let l = self.shared.lists.lock().unwrap_or_else(|e| e.into_inner());
        l.top() != 0
    }

    /// Work the command processor ran itself ([`Engines::run_inline`],
    /// [`Engines::help`]): (nanoseconds, workgroups).
    pub fn inline_stats(&self) -> (u64, u64) {
        (self.inline.0.load(Relaxed), self.inline.1.load(Relaxed))
    }
}
