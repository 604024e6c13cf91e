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
//! **Page faults.** A job with on-demand buffers is *paged*: before each workgroup runs
//! (or resumes), the engine pins the pages of its [`Kernel::footprint`]. If one is not
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

use crate::kernel::{Arg, Args, Checkpoint, Footprint, Kernel, Workgroup, WorkgroupStatus};
use crate::window::Window;
use crate::QueueId;
use crossbeam_utils::CachePadded;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use userq_uapi::ioctl::Priority;
use userq_uapi::packet::Dispatch;

/// A dispatch on its way through the engines.
pub struct Job {
    /// The queue it came from.
    pub queue: QueueId,
    /// Index of its DISPATCH packet in the queue.
    pub packet_index: u64,
    kernel: Arc<dyn Kernel>,
    args: Args,
    dispatch: Dispatch,
    priority: Priority,
    total: u64,
    /// Next workgroup to hand out.
    next: AtomicU64,
    /// Workgroups finished.
    done: AtomicU64,
    cancelled: AtomicBool,
    /// Workgroups that yielded at a checkpoint, with their saved state, to resume first.
    yielded: Mutex<Vec<Workgroup>>,
    /// Length of `yielded`, readable without the lock.
    pending_yields: AtomicU64,
    /// The queue's time slice (`None`: the engines' default).
    time_slice: Option<Duration>,
    /// Suspended: no workgroup of it starts; running ones yield at their checkpoints.
    suspended: AtomicBool,
    /// Workgroups of it running on engines right now.
    running: AtomicU32,
    /// Changes whenever a workgroup finishes or a running one reaches a checkpoint.
    progress: AtomicU64,
    /// Engine threads started in place of threads this (cancelled) job's workgroups hold:
    /// as many threads returning from it leave the pool. Only threads that ran its
    /// workgroups can return from it (a cancelled job is never picked again).
    owed: AtomicU32,
    /// Unique per job, so a reset names exactly the dispatch that hung.
    pub id: u64,
    /// Whether any argument is an on-demand buffer: its workgroups pin their footprints.
    paged: bool,
    /// A workgroup faulted: no engine takes work from the job until kmd-shim's reply
    /// ([`Job::resume_after_fault`]).
    faulted: AtomicBool,
}

/// A workgroup's fault, for the command processor to batch to kmd-shim.
#[derive(Debug, Clone)]
pub struct FaultNote {
    /// The faulting queue.
    pub queue: QueueId,
    /// Its job.
    pub job: u64,
    /// The pages missing: (device address of the page, access).
    pub pages: Vec<(u64, userq_uapi::paging::Access)>,
    /// Pages the job's next workgroups will miss ("fault-ahead"), not among `pages`.
    pub ahead: Vec<(u64, userq_uapi::paging::Access)>,
    /// The footprint needs more pages than the pool has: it can never run. The pages
    /// needed, and the first one's address.
    pub too_large: Option<(u64, u64)>,
}

/// Ids of jobs, unique in this process.
static NEXT_JOB: AtomicU64 = AtomicU64::new(1);

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("kernel", &self.kernel.name())
            .field("queue", &self.queue)
            .field("done", &self.done.load(Relaxed))
            .field("total", &self.total)
            .finish()
    }
}

impl Job {
    /// A job for a validated dispatch with resolved arguments.
    pub fn new(
        queue: QueueId,
        packet_index: u64,
        kernel: Arc<dyn Kernel>,
        args: Args,
        dispatch: Dispatch,
        priority: Priority,
        time_slice: Option<Duration>,
    ) -> Self {
        let paged = args
            .0
            .iter()
            .any(|a| matches!(a, Arg::Buffer(b) if b.window().is_some()));
        Job {
            paged,
            faulted: AtomicBool::new(false),
            packet_index,
            progress: AtomicU64::new(0),
            owed: AtomicU32::new(0),
            id: NEXT_JOB.fetch_add(1, Relaxed),
            suspended: AtomicBool::new(false),
            running: AtomicU32::new(0),
            yielded: Mutex::new(Vec::new()),
            pending_yields: AtomicU64::new(0),
            time_slice,
            queue,
            kernel,
            args,
            total: dispatch.workgroup_count(),
            dispatch,
            priority,
            next: AtomicU64::new(0),
            done: AtomicU64::new(0),
            cancelled: AtomicBool::new(false),
        }
    }

    /// Stops handing out workgroups (its queue is gone); running ones finish.
    pub fn cancel(&self) {
        self.cancelled.store(true, Release);
    }

    /// Lets engines take the job's work again after kmd-shim serviced its faults.
    pub fn resume_after_fault(&self) {
        self.faulted.store(false, Release);
    }

    /// Whether it waits for a fault to be serviced.
    pub fn is_faulted(&self) -> bool {
        self.faulted.load(Acquire)
    }

    /// Whether any of its buffer arguments is `window`.
    pub fn uses_window(&self, window: &Window) -> bool {
        self.paged
            && self.args.0.iter().any(
                |a| matches!(a, Arg::Buffer(b) if b.window().is_some_and(|(w, _)| std::ptr::eq(&**w, window))),
            )
    }

    /// Whether it was cancelled.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Acquire)
    }

    /// Whether it is suspended.
    pub fn is_suspended(&self) -> bool {
        self.suspended.load(Relaxed)
    }

    /// A number that changes whenever a workgroup finishes or reaches a checkpoint.
    pub fn progress(&self) -> u64 {
        self.progress.load(Relaxed)
    }

    /// Workgroups of it on engines now.
    pub fn running_count(&self) -> u32 {
        self.running.load(SeqCst)
    }

    fn bump_progress(&self) {
        // A plain increment is enough: the watchdog only asks whether the number changed,
        // and no locked instruction lands on the path of a kernel's checkpoint.
        self.progress
            .store(self.progress.load(Relaxed).wrapping_add(1), Relaxed);
    }

    /// Suspends or resumes the job (see `FwRequest::Suspend`).
    pub fn set_suspended(&self, on: bool) {
        self.suspended.store(on, SeqCst);
    }

    /// Whether a workgroup of the job is on an engine now. After `set_suspended(true)`,
    /// becomes false within a checkpoint interval and stays false.
    pub fn is_running(&self) -> bool {
        self.running.load(SeqCst) != 0
    }

    /// Finished or cancelled: it may leave the ready lists. A job whose last workgroups
    /// are still on engines stays listed, since one of them may yield and need resuming.
    fn finished(&self) -> bool {
        self.cancelled.load(Relaxed) || self.done.load(Acquire) >= self.total
    }

    /// Whether an engine could take work from it now.
    fn claimable(&self) -> bool {
        !self.cancelled.load(Relaxed)
            && !self.suspended.load(Relaxed)
            && !self.faulted.load(Relaxed)
            && (self.next.load(Relaxed) < self.total || self.pending_yields.load(Acquire) > 0)
    }

    fn take_yielded(&self) -> Option<Workgroup> {
        if self.pending_yields.load(Acquire) == 0 {
            return None;
        }
        let mut y = self.yielded.lock().unwrap_or_else(|e| e.into_inner());
        let wg = y.pop()?;
        self.pending_yields.fetch_sub(1, Release);
        Some(wg)
    }

    fn put_yielded(&self, wg: Workgroup) {
        self.yielded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(wg);
        self.pending_yields.fetch_add(1, Release);
    }

    /// Workgroups of this job that an engine has not finished.
    pub fn unfinished(&self) -> bool {
        self.done.load(Acquire) < self.total
    }
}

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
}

impl Shared {
    /// Wakes every idle engine. Called with the lists lock held, after the change that
    /// made work claimable.
    fn notify_engines(&self) {
        self.work.fetch_add(1, Release);
        atomic_wait::wake_all(&*self.work);
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
        });
        let engines = Engines {
            shared,
            threads: std::sync::Mutex::new(Vec::with_capacity(count)),
            next_index: AtomicUsize::new(0),
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
                .spawn(move || engine(&s));
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

    /// Queues a job.
    pub fn submit(&self, job: Arc<Job>) {
        let mut l = self.shared.lists.lock().unwrap_or_else(|e| e.into_inner());
        l.ready[job.priority as usize].push_back(job);
        self.shared.top.store(l.top(), Release);
        self.shared.notify_engines();
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

fn engine(s: &Shared) {
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
                drop(l);
                atomic_wait::wait(&s.work, seen);
                l = s.lists.lock().unwrap_or_else(|e| e.into_inner());
            }
        };
        run_slice(s, &job);
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

/// Runs workgroups of one job until the job has none left, the slice is used, a job of
/// higher priority is ready, or a workgroup yields at a checkpoint.
fn run_slice(s: &Shared, job: &Arc<Job>) {
    let start = Instant::now();
    let my_rank = job.priority as u32 + 1;
    let slice = job.time_slice.unwrap_or(s.time_slice);
    let wants_engine =
        || start.elapsed() >= slice || s.top.load(Acquire) > my_rank || s.stop.load(Relaxed);
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
            return;
        }
        // A workgroup that yielded earlier resumes before new ones start.
        let mut wg = match job.take_yielded() {
            Some(wg) => wg,
            None => {
                let index = job.next.fetch_add(1, AcqRel);
                if index >= job.total {
                    return;
                }
                Workgroup::of(&job.dispatch, index)
            }
        };
        // A paged job's workgroup pins its footprint first; unpinned when `_pins` drops.
        let _pins = if job.paged {
            match pin_footprint(job, &wg) {
                Ok(p) => Some(p),
                Err(mut note) => {
                    fault_ahead(job, &mut note);
                    job.put_yielded(wg);
                    job.faulted.store(true, Release);
                    s.faults
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(note);
                    s.has_faults.store(true, Release);
                    (s.wake_command_processor)();
                    return;
                }
            }
        } else {
            None
        };
        let status = job.kernel.run(&job.args, &mut wg, &cp);
        drop(_pins);
        match status {
            WorkgroupStatus::Yielded => {
                job.put_yielded(wg);
                // The job is still listed (it is not finished): make sure a parked engine
                // sees the work it can take again.
                let _l = s.lists.lock().unwrap_or_else(|e| e.into_inner());
                s.notify_one_engine();
                return;
            }
            WorkgroupStatus::Done => job.bump_progress(),
        }
        // AcqRel: the last finisher sees every other engine's writes before reporting.
        if job.done.fetch_add(1, AcqRel) + 1 == job.total {
            s.completed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(job.clone());
            s.has_completed.store(true, Release);
            (s.wake_command_processor)();
            return;
        }
        if wants_engine() {
            return;
        }
    }
}

/// Pages a workgroup pinned; unpinned on drop.
struct Pins<'a>(Vec<(&'a Window, usize, u32)>);

impl Drop for Pins<'_> {
    fn drop(&mut self) {
        for (w, page, gen) in &self.0 {
            if let Some(e) = w.entry(*page) {
                e.unpin(*gen);
            }
        }
    }
}

/// The distinct on-demand pages a footprint names.
fn distinct_pages(job: &Job, fp: &Footprint) -> u64 {
    use userq_uapi::paging::DEVICE_PAGE;
    let mut vas = Vec::new();
    for (arg, range, _) in &fp.ranges {
        let Some(Arg::Buffer(b)) = job.args.0.get(*arg) else {
            continue;
        };
        let Some((_, offset)) = b.window() else {
            continue;
        };
        let end = range.end.min(b.len() as u64);
        if range.start < end {
            let base_va = b.address - offset as u64;
            let first = (offset as u64 + range.start) / DEVICE_PAGE;
            let last = (offset as u64 + end - 1) / DEVICE_PAGE;
            vas.extend((first..=last).map(|p| base_va + p * DEVICE_PAGE));
        }
    }
    vas.sort_unstable();
    vas.dedup();
    vas.len() as u64
}

/// Pins every page of the workgroup's footprint in on-demand buffers, or returns the
/// fault: every page of it not resident (the pins taken are released).
fn pin_footprint<'a>(job: &'a Job, wg: &Workgroup) -> Result<Pins<'a>, FaultNote> {
    use userq_uapi::paging::DEVICE_PAGE;
    let mut fp = Footprint::default();
    job.kernel.footprint(&job.args, wg, &mut fp);
    let mut pins = Pins(Vec::new());
    let mut missing = Vec::new();
    let mut needed = 0u64;
    let mut first_needed = None;
    let mut now = None;
    for (arg, range, access) in &fp.ranges {
        let Some(Arg::Buffer(b)) = job.args.0.get(*arg) else {
            continue;
        };
        let Some((w, offset)) = b.window() else {
            continue;
        };
        let end = range.end.min(b.len() as u64);
        if range.start >= end {
            continue;
        }
        let base_va = b.address - offset as u64;
        let first = (offset as u64 + range.start) / DEVICE_PAGE;
        let last = (offset as u64 + end - 1) / DEVICE_PAGE;
        needed += last - first + 1;
        first_needed.get_or_insert(base_va + first * DEVICE_PAGE);
        for page in first..=last {
            let Some(e) = w.entry(page as usize) else {
                continue;
            };
            match e.pin() {
                Some((gen, slot)) => {
                    let t = *now.get_or_insert_with(|| w.pool().tick());
                    w.pool().touch(slot, t);
                    pins.0.push((&**w, page as usize, gen));
                }
                None => missing.push((base_va + page * DEVICE_PAGE, *access)),
            }
        }
    }
    let too_large = job.args.0.iter().find_map(|a| match a {
        Arg::Buffer(b) => b.window().map(|(w, _)| w.pool().slots() as u64),
        _ => None,
    });
    // `needed` counts a page once per range naming it (a buffer passed twice counts
    // twice): only when that bound is over the pool are the distinct pages counted.
    let too_large = too_large
        .filter(|&slots| needed > slots && distinct_pages(job, &fp) > slots)
        .map(|_| (distinct_pages(job, &fp), first_needed.unwrap_or(0)));
    if missing.is_empty() && too_large.is_none() {
        return Ok(pins);
    }
    missing.sort_unstable_by_key(|m| m.0);
    missing.dedup_by_key(|m| m.0);
    Err(FaultNote {
        queue: job.queue,
        job: job.id,
        pages: missing,
        ahead: Vec::new(),
        too_large,
    })
}

/// Workgroups looked at past a faulting one, at most.
const FAULT_AHEAD: u64 = 1 << 16;

/// Adds to a fault the missing pages of the job's workgroups that have not started yet
/// (until a batch of pages is missing, twice that many were looked at, or
/// [`FAULT_AHEAD`] workgroups): on a GPU they would all be in
/// flight and fault together, so their faults go in the same batch instead of one round
/// trip each (UVM services its batches, and prefetches, the same way).
fn fault_ahead(job: &Job, note: &mut FaultNote) {
    use userq_uapi::paging::{DEVICE_PAGE, FAULT_BATCH_MAX};
    if note.too_large.is_some() {
        return;
    }
    let from = job.next.load(Relaxed);
    let to = from.saturating_add(FAULT_AHEAD).min(job.total);
    let mut fp = Footprint::default();
    let mut seen = 0usize;
    let mut last_seen = u64::MAX;
    for index in from..to {
        if note.pages.len() + note.ahead.len() >= FAULT_BATCH_MAX || seen >= 2 * FAULT_BATCH_MAX {
            break;
        }
        fp.ranges.clear();
        job.kernel
            .footprint(&job.args, &Workgroup::of(&job.dispatch, index), &mut fp);
        for (arg, range, access) in &fp.ranges {
            let Some(Arg::Buffer(b)) = job.args.0.get(*arg) else {
                continue;
            };
            let Some((w, offset)) = b.window() else {
                continue;
            };
            let end = range.end.min(b.len() as u64);
            if range.start >= end {
                continue;
            }
            let base_va = b.address - offset as u64;
            let first = (offset as u64 + range.start) / DEVICE_PAGE;
            let last = (offset as u64 + end - 1) / DEVICE_PAGE;
            for page in first..=last {
                let resident = w
                    .entry(page as usize)
                    .is_some_and(|e| e.state() == crate::window::state::RESIDENT);
                let va = base_va + page * DEVICE_PAGE;
                if va != last_seen {
                    seen += 1;
                    last_seen = va;
                }
                // Neighbouring workgroups share pages: skip the repeat of the last one.
                if !resident && note.ahead.last().map(|p| p.0) != Some(va) {
                    note.ahead.push((va, *access));
                }
            }
        }
    }
    note.ahead.sort_unstable_by_key(|m| m.0);
    note.ahead.dedup_by_key(|m| m.0);
    let own = &note.pages;
    note.ahead
        .retain(|a| own.binary_search_by_key(&a.0, |p| p.0).is_err());
}

/// Ends a workgroup's "running" announcement however the workgroup ends.
struct RunningGuard<'a>(&'a AtomicU32);

impl Drop for RunningGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, SeqCst);
    }
}
