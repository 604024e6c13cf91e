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
//! workgroup reports the job complete to the command processor and kicks it; so does the
//! first whose workgroup raised an exception (its kernel panicked), after cancelling the
//! job, and it serves on. Idle engines park on an in-process futex word (`atomic-wait`,
//! private futexes: engines never wait on shared memory), bumped by whoever adds claimable
//! work and wants an engine for it. The command processor may add a small bounded job
//! without a bump while every engine is parked (a deferral, [`Engines::submit`], or a
//! resumed fault, [`Engines::resume`]); it then runs the job itself or bumps the word
//! within [`HELP_DEFER`].
//!
//! **Inline dispatch.** A dispatch small and bounded enough, when no job waits for an
//! engine, is run by the command processor itself through the same slice code
//! ([`Engines::run_inline`]): waking a parked engine costs more than such a dispatch.
//! A larger bounded one goes to the engines, but while every engine is parked the
//! command processor, with nothing else to do, runs its workgroups (often all of them)
//! until an engine is back ([`Engines::help`]). Either may be a paged job's: its
//! workgroups pin, and fault, on the command processor as they would on an engine.
//!
//! **Page faults.** A job with on-demand buffers is *paged*: before each workgroup runs
//! (or resumes), the engine (or the command processor, running it inline or helping)
//! pins the pages of its [`crate::kernel::Kernel::footprint`]. If one is not resident,
//! the workgroup goes back, state intact, with the yielded ones; the job is marked
//! faulted (no engine takes it until kmd-shim replies) and a [`FaultNote`] goes to the
//! command processor, which batches it to kmd-shim. Only that job stops: the engine
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
use crate::footprint::{fault_ahead, pin_footprint, FAULT_AHEAD, FAULT_AHEAD_ON_CP};
pub use crate::job::Job;
use crate::kernel::{contain, Checkpoint, Workgroup, WorkgroupStatus};
use crossbeam_utils::CachePadded;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

mod inline;
#[cfg(test)]
mod tests;
mod worker;
pub use inline::{HELP_DEFER, HELP_DEFER_ITEMS, HELP_SLICE, INLINE_ITEMS};
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
    /// engine should take appears, so an engine that found nothing under the lock and then
    /// waits for the value it saw there cannot miss it. Work the command processor keeps
    /// for itself a while (a deferred or resumed small job) is added without a bump; it
    /// bumps the word for what it leaves ([`Engines::kick_deferred`], [`Engines::resume`]).
    work: CachePadded<AtomicU32>,
    /// Highest priority with ready work, plus one (0: none). A hint for preemption, read by
    /// every engine between workgroups: on its own line.
    top: CachePadded<AtomicU32>,
    stop: AtomicBool,
    completed: Mutex<Vec<Arc<Job>>>,
    /// Written by the engine that finishes a job (or the first whose workgroup raised in
    /// it), polled by the command processor every loop turn: on its own line.
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
    /// Drops finished jobs from the ready lists, so that none holds its kernel and
    /// buffers once collected, and refreshes the `top` hint. Returns it.
    fn prune_ready(&self) -> u32 {
        let mut l = self.lists.lock().unwrap_or_else(|e| e.into_inner());
        for list in &mut l.ready {
            list.retain(|j| !j.finished());
        }
        let top = l.top();
        self.top.store(top, Release);
        top
    }

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

    /// Puts a job whose last workgroup finished, or that a workgroup's exception ended, on
    /// the completed list, for the command processor's next turn.
    fn post_completed(&self, job: Arc<Job>) {
        self.completed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(job);
        self.has_completed.store(true, Release);
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
    /// When the engines must be woken for a small job [`Engines::submit`] left to the
    /// command processor's help ([`Engines::kick_deferred`]): nanoseconds since `epoch`,
    /// 0 for none. Only the command processor uses it.
    deferred_until: AtomicU64,
    epoch: Instant,
}

impl std::fmt::Debug for Engines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engines")
            .field("target", &self.shared.target)
            .field("live", &self.shared.live.load(Relaxed))
            .finish()
    }
}

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
            deferred_until: AtomicU64::new(0),
            epoch: Instant::now(),
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

    /// Wakes the engines for whatever the ready lists hold (after a resume, or a deferral
    /// that ran out); ends any deferral.
    pub fn kick(&self) {
        self.deferred_until.store(0, Relaxed);
        let l = self.shared.lists.lock().unwrap_or_else(|e| e.into_inner());
        self.shared.top.store(l.top(), Release);
        self.shared.notify_engines();
    }

    /// Queues a job, and wakes the engines if it has work they can take now (one that
    /// faulted on the command processor waits for kmd-shim's reply: [`Engines::resume`]).
    /// A small bounded job submitted while every engine is
    /// parked is left to the command processor's help for up to [`HELP_DEFER`] first
    /// (see [`Engines::kick_deferred`]).
    pub fn submit(&self, job: Arc<Job>) {
        let mut l = self.shared.lists.lock().unwrap_or_else(|e| e.into_inner());
        let claimable = job.claimable();
        // Under the lists lock, where `parked` changes.
        let defer = claimable && self.may_defer(&job);
        l.ready[job.priority as usize].push_back(job);
        self.shared.top.store(l.top(), Release);
        if defer {
            drop(l);
            self.defer_wake();
        } else if claimable {
            // The engines take any deferred job too.
            self.deferred_until.store(0, Relaxed);
            self.shared.notify_engines();
        }
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
