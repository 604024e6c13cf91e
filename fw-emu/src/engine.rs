//! DOC: engines and their scheduler.
//!
//! The command processor turns a DISPATCH into a [`Job`] and hands it to the engines; its
//! queue then waits (in order) until the job completes. Engines are threads that take
//! workgroups from the ready jobs:
//!
//! - **priority**: a job of a higher priority is always taken first;
//! - **round robin** within a priority: an engine that takes a job moves it to the back of
//!   its priority's list, so jobs of equal priority take turns;
//! - **time slices**: an engine runs workgroups of one job until its slice (1 ms by default)
//!   is used, then goes back to the lists;
//! - **preemption at workgroup boundaries**: between two workgroups an engine also leaves
//!   its job as soon as a job of higher priority is ready;
//! - **preemption at checkpoints**: inside a long workgroup, the kernel asks
//!   [`Checkpoint::should_yield`]; a yielded workgroup keeps its saved state and is resumed
//!   (before new workgroups of its job) at the job's next turn.
//!
//! Several engines may run workgroups of one job at once; the one that finishes the last
//! workgroup reports the job complete to the command processor and kicks it. Idle engines
//! park on an in-process futex word (`atomic-wait`, private futexes: engines never wait on
//! shared memory), bumped by whoever adds claimable work.
//!
//! **Inline dispatch.** A dispatch small and bounded enough, when no job waits for an
//! engine, is run by the command processor itself through the same slice code
//! ([`Engines::run_inline`]): waking a parked engine costs more than such a dispatch.
//! A larger bounded one goes to the engines, but while every engine is parked the
//! command processor, with nothing else to do, runs its workgroups (often all of them)
//! until an engine is back ([`Engines::help`]).
//!
//! **Page faults.** A job with on-demand buffers is *paged*: before each workgroup runs
//! (or resumes), the engine pins the pages of its [`crate::kernel::Kernel::footprint`]. If one is not
//! resident, the workgroup goes back, state intact, with the yielded ones; the job is
//! marked faulted (no engine takes it until kmd-shim replies) and a [`FaultNote`] goes to
//! the command processor, which batches it to kmd-shim. Only that job stops: the engine
//! moves on to other work. While an invalidation waits for pins to drain, workgroups of
//! paged jobs yield at their next checkpoint (and refault if their pages went).
//!
//! For hang detection ([`crate::hang`]) a job counts its workgroups on engines and its
//! progress: finished workgroups and checkpoints reached. A cancelled job's running
//! workgroups return at their next checkpoint; one that never does keeps its engine
//! thread, which the CPU cannot take back. [`Engines::replace`] then starts a new thread
//! in its place, so the device keeps its engine count; the wedged thread leaves the pool
//! when its workgroup finally returns.

pub use crate::footprint::FaultNote;
use crate::footprint::{fault_ahead, pin_footprint};
pub use crate::job::Job;
use crate::kernel::{Checkpoint, Workgroup, WorkgroupStatus};
use crossbeam_utils::CachePadded;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

#[cfg(test)]
mod tests;
mod worker;
use worker::{engine, run_slice};

struct Lists {
    /// Ready jobs by priority (index = `Priority as usize`).
    ready: [VecDeque<Arc<Job>>; 3],
}

impl Lists {
    /// Takes the next job by priority and round robin, dropping exhausted ones.
    fn pick(&mut self) -> Option<Arc<Job>> {
        for list in self.ready.iter_mut().rev() {
            list.retain(|j| !j.finished());
            // Round robin: the first job with work to hand out goes to the back.
            if let Some(i) = list.iter().position(|j| j.claimable()) {
                let job = list.remove(i).expect("index from position");
                list.push_back(job.clone());
                return Some(job);
            }
        }
        None
    }

    /// The job the command processor may help with ([`Engines::help`]): the first
    /// claimable one of the highest priority that has any, if its workgroups are bounded
    /// and it has no on-demand buffers. Does not rotate the list.
    fn helpable(&self) -> Option<Arc<Job>> {
        let list = self
            .ready
            .iter()
            .rev()
            .find(|l| l.iter().any(|j| j.claimable()))?;
        list.iter()
            .find(|j| j.claimable())
            .filter(|j| j.kernel.bounded() && !j.paged)
            .cloned()
    }

    fn top(&self) -> u32 {
        (0..3)
            .rev()
            .find(|&p| self.ready[p].iter().any(|j| j.claimable()))
            .map_or(0, |p| p as u32 + 1)
    }
}

struct Shared {
    lists: Mutex<Lists>,
    /// Idle engines sleep on this word; bumped (under the lists lock) whenever work an
    /// engine could take appears, so an engine that found nothing under the lock and then
    /// waits for the value it saw there cannot miss it.
    work: CachePadded<AtomicU32>,
    /// Highest priority with ready work, plus one (0: none). A hint for preemption, read by
    /// every engine between workgroups: on its own line.
    top: CachePadded<AtomicU32>,
    stop: AtomicBool,
    completed: Mutex<Vec<Arc<Job>>>,
    /// Written by the engine that finishes a job, polled by the command processor every
    /// loop turn: on its own line.
    has_completed: CachePadded<AtomicBool>,
    time_slice: Duration,
    wake_command_processor: Box<dyn Fn() + Send + Sync>,
    /// Faults for the command processor to batch.
    faults: Mutex<Vec<FaultNote>>,
    /// Polled by the command processor every loop turn: on its own line.
    has_faults: CachePadded<AtomicBool>,
    /// Invalidations waiting for pins to drain: while non-zero, workgroups of paged jobs
    /// yield at their checkpoints.
    invalidating: AtomicU32,
    /// Engine threads the device should have.
    target: usize,
    /// Threads the pool has beyond `target` that no held workgroup will give back (see
    /// [`Engines::replace`]); a thread that finishes a slice pays one by leaving.
    surplus: AtomicUsize,
    /// Engine threads in the pool, wedged ones included: above `target` after
    /// [`Engines::replace`], until as many threads as were replaced have left.
    live: AtomicUsize,
    /// Engine threads parked (or woken and not yet back at the lists): changed under the
    /// lists lock.
    parked: AtomicUsize,
    /// Per engine thread (index modulo the table): nanoseconds busy, workgroups
    /// finished.
    stats: Vec<CachePadded<(AtomicU64, AtomicU64)>>,
}

impl Shared {
    /// Wakes every idle engine. Called with the lists lock held, after the change that
    /// made work claimable.
    fn notify_engines(&self) {
        self.work.fetch_add(1, Release);
        atomic_wait::wake_all(&*self.work);
    }

    /// The time slice of a job's turn on an engine.
    fn slice(&self, job: &Job) -> Duration {
        job.time_slice.unwrap_or(self.time_slice)
    }

    /// Wakes one idle engine (a yielded workgroup is one piece of work).
    fn notify_one_engine(&self) {
        self.work.fetch_add(1, Release);
        atomic_wait::wake_one(&*self.work);
    }
}

/// The engine threads.
pub struct Engines {
    shared: Arc<Shared>,
    threads: std::sync::Mutex<Vec<JoinHandle<()>>>,
    /// Names the next thread.
    next_index: AtomicUsize,
    /// Work the command processor ran itself ([`Engines::run_inline`],
    /// [`Engines::help`]): nanoseconds, workgroups.
    inline: (AtomicU64, AtomicU64),
    /// The `work` word's value when [`Engines::help`] last found nothing it may run
    /// (`u64::MAX`: none): until the word moves, idle turns do not take the lock to ask
    /// again. Only the command processor uses it.
    help_idle: AtomicU64,
}

impl std::fmt::Debug for Engines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engines")
            .field("target", &self.shared.target)
            .field("live", &self.shared.live.load(Relaxed))
            .finish()
    }
}

/// The most work-items a dispatch may have for the command processor to run it itself
/// ([`Engines::run_inline`]): one full workgroup's worth.
pub const INLINE_ITEMS: u64 = userq_uapi::packet::MAX_WORKGROUP_ITEMS;

/// How long one [`Engines::help`] call runs workgroups before it returns (it finishes the
/// one it is in): about what [`Engines::run_inline`] may hold the command processor.
pub const HELP_SLICE: Duration = Duration::from_micros(5);

/// How long [`Engines`]' drop waits for engine threads before leaving wedged ones behind.
const JOIN_TIMEOUT: Duration = Duration::from_secs(2);

impl Engines {
    /// Starts `count` engines. `wake` kicks the command processor after a completion.
    pub fn start(
        count: usize,
        time_slice: Duration,
        wake: Box<dyn Fn() + Send + Sync>,
    ) -> std::io::Result<Engines> {
        let shared = Arc::new(Shared {
            lists: Mutex::new(Lists {
                ready: Default::default(),
            }),
            work: CachePadded::new(AtomicU32::new(0)),
            top: CachePadded::new(AtomicU32::new(0)),
            stop: AtomicBool::new(false),
            completed: Mutex::new(Vec::new()),
            has_completed: CachePadded::new(AtomicBool::new(false)),
            time_slice,
            wake_command_processor: wake,
            faults: Mutex::new(Vec::new()),
            has_faults: CachePadded::new(AtomicBool::new(false)),
            invalidating: AtomicU32::new(0),
            target: count.max(1),
            surplus: AtomicUsize::new(0),
            live: AtomicUsize::new(0),
            parked: AtomicUsize::new(0),
            stats: (0..userq_uapi::layout::TELEMETRY_ENGINES)
                .map(|_| CachePadded::new((AtomicU64::new(0), AtomicU64::new(0))))
                .collect(),
        });
        let engines = Engines {
            shared,
            threads: std::sync::Mutex::new(Vec::with_capacity(count)),
            next_index: AtomicUsize::new(0),
            inline: (AtomicU64::new(0), AtomicU64::new(0)),
            help_idle: AtomicU64::new(u64::MAX),
        };
        // On failure, dropping `engines` stops and joins the ones already started.
        engines.spawn(count.max(1))?;
        Ok(engines)
    }

    fn spawn(&self, n: usize) -> std::io::Result<()> {
        for _ in 0..n {
            let s = self.shared.clone();
            let i = self.next_index.fetch_add(1, Relaxed);
            s.live.fetch_add(1, AcqRel);
            let t = std::thread::Builder::new()
                .name(format!("fw-engine-{i}"))
                .spawn(move || engine(&s, i % userq_uapi::layout::TELEMETRY_ENGINES));
            match t {
                Ok(t) => self
                    .threads
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(t),
                Err(e) => {
                    self.shared.live.fetch_sub(1, AcqRel);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Starts `n` engine threads in place of threads that `job`'s cancelled workgroups
    /// hold and will not give back soon; as many of those threads leave the pool when
    /// their workgroups return. Returns how many started.
    pub fn replace(&self, job: &Job, n: usize) -> usize {
        // The debt first, so a held thread that returns from now on pays it.
        job.owed.fetch_add(n as u32, AcqRel);
        let mut started = 0;
        for _ in 0..n {
            if self.spawn(1).is_err() {
                break;
            }
            started += 1;
        }
        // Not started: not owed. And a held thread that returned before the debt was
        // visible did not pay: whatever the job owes beyond its workgroups still on
        // engines goes to the pool-wide surplus, which any thread may pay.
        let running = job.running_count();
        let short = (n - started) as u32;
        if let Ok(before) = job.owed.fetch_update(AcqRel, Acquire, |o| {
            let o = o.saturating_sub(short);
            Some(o.min(running))
        }) {
            let excess = before.saturating_sub(short).saturating_sub(running);
            self.shared.surplus.fetch_add(excess as usize, AcqRel);
        }
        started
    }

    /// Wakes the engines after a job was resumed.
    pub fn kick(&self) {
        let l = self.shared.lists.lock().unwrap_or_else(|e| e.into_inner());
        self.shared.top.store(l.top(), Release);
        self.shared.notify_engines();
    }

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
    /// - no buffer is on-demand (a fault needs kmd-shim's answer);
    /// - no job waits for an engine, so none is overtaken.
    ///
    /// It runs the job to the end (no time slice, no preemption between its workgroups).
    /// Returns whether the job completed. If not (not eligible, or the firmware is
    /// stopping), the caller hands it to the engines as usual, and they would carry on
    /// where it stopped. The time counts for the job's queue and context like engine
    /// time, and in the command processor's own line ([`Engines::inline_stats`]).
    ///
    /// [`Kernel::bounded`]: crate::kernel::Kernel::bounded
    pub fn run_inline(&self, job: &Arc<Job>) -> bool {
        let items = job
            .total
            .saturating_mul(job.dispatch.workgroup.iter().map(|&w| w as u64).product());
        if job.paged || !job.kernel.bounded() || items > INLINE_ITEMS || self.work_waits() {
            return false;
        }
        let start = Instant::now();
        // No slice: bounded workgroups, at most one workgroup's worth of items, so the run
        // is short; leaving early would hand the rest to a parked engine for nothing.
        let end = run_slice(&self.shared, job, start, None);
        let ns = start.elapsed().as_nanos() as u64;
        job.engine_ns.fetch_add(ns, Relaxed);
        self.inline.0.fetch_add(ns, Relaxed);
        self.inline.1.fetch_add(end.finished, Relaxed);
        end.last
    }

    /// Runs a little of a job that waits for the engines on the calling thread, the
    /// command processor, in a turn with nothing else to do, while every engine thread is
    /// parked: the job's engine is being woken (a futex wake and a context switch, 7-30 µs
    /// here, often onto a vCPU a spinning client holds), and the job's workgroups need not
    /// wait for that; a small job is often done before the engine arrives. The engine takes the rest when it arrives; workgroups are
    /// claimed one by one, so none runs twice. Only when the engines are all parked, so
    /// the command processor never becomes one more engine under load, and only jobs
    /// [`Engines::run_inline`] could run (bounded workgroups, no on-demand buffers), for at
    /// most [`HELP_SLICE`] (plus the workgroup that ends it) per call. The time counts as
    /// the command processor's own ([`Engines::inline_stats`]). Returns whether it ran a
    /// workgroup; a job whose last workgroup it finished goes on the completed list.
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
                    // Nothing it may run (the waiting job is not bounded, or is paged):
                    // ask again only when work is added (the word moves under this lock).
                    self.help_idle.store(s.work.load(Relaxed) as u64, Relaxed);
                    return false;
                }
            }
        };
        let start = Instant::now();
        let end = run_slice(s, &job, start, Some(HELP_SLICE));
        let ns = start.elapsed().as_nanos() as u64;
        job.engine_ns.fetch_add(ns, Relaxed);
        self.inline.0.fetch_add(ns, Relaxed);
        self.inline.1.fetch_add(end.finished, Relaxed);
        if end.last {
            // Off the ready lists (an engine that looked while the last workgroup ran kept
            // it there, unfinished), so it holds no kernel or buffers once collected.
            {
                let mut l = s.lists.lock().unwrap_or_else(|e| e.into_inner());
                l.ready[job.priority as usize].retain(|j| !j.finished());
                s.top.store(l.top(), Release);
            }
            s.completed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(job);
            s.has_completed.store(true, Release);
        }
        end.finished > 0
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

    /// Queues a job.
    pub fn submit(&self, job: Arc<Job>) {
        let mut l = self.shared.lists.lock().unwrap_or_else(|e| e.into_inner());
        l.ready[job.priority as usize].push_back(job);
        self.shared.top.store(l.top(), Release);
        self.shared.notify_engines();
    }

    /// Engine telemetry lines in use: one per thread ever started (replacements for
    /// wedged threads included), up to the table's size.
    pub fn lines(&self) -> usize {
        self.next_index
            .load(Relaxed)
            .min(userq_uapi::layout::TELEMETRY_ENGINES)
    }

    /// Per engine line: (nanoseconds busy, workgroups finished).
    pub fn stats(&self) -> Vec<(u64, u64)> {
        self.shared
            .stats
            .iter()
            .map(|l| (l.0.load(Relaxed), l.1.load(Relaxed)))
            .collect()
    }

    /// Whether faults wait to be batched.
    pub fn has_faults(&self) -> bool {
        self.shared.has_faults.load(Acquire)
    }

    /// Takes the faults noted since the last call.
    pub fn take_faults(&self) -> Vec<FaultNote> {
        if !self.has_faults() {
            return Vec::new();
        }
        let mut f = self.shared.faults.lock().unwrap_or_else(|e| e.into_inner());
        self.shared.has_faults.store(false, Release);
        std::mem::take(&mut *f)
    }

    /// An invalidation starts (`true`) or ends: while any is pending, workgroups of
    /// paged jobs yield at their checkpoints so that pins drain.
    pub fn set_invalidating(&self, on: bool) {
        if on {
            self.shared.invalidating.fetch_add(1, SeqCst);
        } else {
            self.shared.invalidating.fetch_sub(1, SeqCst);
        }
    }

    /// Whether completed jobs wait to be collected.
    pub fn has_completed(&self) -> bool {
        self.shared.has_completed.load(Acquire)
    }

    /// Takes the jobs completed since the last call.
    pub fn take_completed(&self) -> Vec<Arc<Job>> {
        if !self.has_completed() {
            return Vec::new();
        }
        let mut c = self
            .shared
            .completed
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        self.shared.has_completed.store(false, Release);
        std::mem::take(&mut *c)
    }
}

impl Drop for Engines {
    fn drop(&mut self) {
        self.shared.stop.store(true, Release);
        {
            let l = self.shared.lists.lock().unwrap_or_else(|e| e.into_inner());
            for list in &l.ready {
                list.iter().for_each(|j| j.cancel());
            }
            self.shared.notify_engines();
        }
        // A thread a wedged workgroup holds may not return for a long time: wait a bounded
        // time, then leave it (it holds its own references to what it uses).
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        let deadline = Instant::now() + JOIN_TIMEOUT;
        for t in threads {
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }
}
