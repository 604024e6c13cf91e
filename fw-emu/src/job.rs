//! DOC: a job: one DISPATCH on its way through the engines, with its workgroup
//! counters, yielded workgroups, suspension, cancellation, fault state and the progress
//! the watchdog reads. The engines ([`crate::engine`]) hand out its workgroups.

use crate::kernel::{Arg, Args, Kernel, Workgroup};
use crate::window::Window;
use crate::QueueId;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::*};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use userq_uapi::ioctl::Priority;
use userq_uapi::packet::Dispatch;

/// A dispatch on its way through the engines.
pub struct Job {
    /// The queue it came from.
    pub queue: QueueId,
    /// Index of its DISPATCH packet in the queue.
    pub packet_index: u64,
    pub(crate) kernel: Arc<dyn Kernel>,
    pub(crate) args: Args,
    pub(crate) dispatch: Dispatch,
    pub(crate) priority: Priority,
    pub(crate) total: u64,
    /// Next workgroup to hand out.
    pub(crate) next: AtomicU64,
    /// Workgroups finished.
    pub(crate) done: AtomicU64,
    pub(crate) cancelled: AtomicBool,
    /// Workgroups that yielded at a checkpoint, with their saved state, to resume first.
    pub(crate) yielded: Mutex<Vec<Workgroup>>,
    /// Length of `yielded`, readable without the lock.
    pub(crate) pending_yields: AtomicU64,
    /// The queue's time slice (`None`: the engines' default).
    pub(crate) time_slice: Option<Duration>,
    /// Suspended: no workgroup of it starts; running ones yield at their checkpoints.
    pub(crate) suspended: AtomicBool,
    /// Workgroups of it running right now (on engines, or on the command processor inline).
    pub(crate) running: AtomicU32,
    /// Changes whenever a workgroup finishes or a running one reaches a checkpoint.
    pub(crate) progress: AtomicU64,
    /// Engine threads started in place of threads this (cancelled) job's workgroups hold:
    /// as many threads returning from it leave the pool. Only threads that ran its
    /// workgroups can return from it (a cancelled job is never picked again).
    pub(crate) owed: AtomicU32,
    /// Unique per job, so a reset names exactly the dispatch that hung.
    pub id: u64,
    /// Whether any argument is an on-demand buffer: its workgroups pin their footprints.
    pub(crate) paged: bool,
    /// The kernel's [`Kernel::bounded`], asked once when the job is made (kernel code,
    /// so under the caller's `kernel::contain`), not on every look at the ready lists.
    pub(crate) bounded: bool,
    /// A workgroup faulted: no engine takes work from the job until kmd-shim's reply
    /// ([`Job::resume_after_fault`]).
    pub(crate) faulted: AtomicBool,
    /// Nanoseconds engines (or the command processor, inline) ran it (telemetry).
    pub(crate) engine_ns: AtomicU64,
    /// Page faults its workgroups took (telemetry).
    pub(crate) faults: AtomicU64,
    /// A workgroup raised an exception (its kernel panicked): that workgroup's linear
    /// index plus one; 0 while none has.
    exception: AtomicU64,
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
    /// A job for a validated dispatch with resolved arguments. Asks the kernel whether it
    /// is bounded: kernel code, so the firmware calls this under `kernel::contain`.
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
            bounded: kernel.bounded(),
            faulted: AtomicBool::new(false),
            engine_ns: AtomicU64::new(0),
            faults: AtomicU64::new(0),
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
            exception: AtomicU64::new(0),
        }
    }

    /// Records that workgroup `index` raised an exception and cancels the job: none of
    /// its workgroups starts any more, running ones stop at their checkpoints. Returns
    /// whether it was the job's first exception (the one its queue reports).
    pub(crate) fn raise(&self, index: u64) -> bool {
        let first = self
            .exception
            .compare_exchange(0, index.saturating_add(1), AcqRel, Acquire)
            .is_ok();
        self.cancel();
        first
    }

    /// The workgroup that raised the job's exception, if one did.
    pub fn exception(&self) -> Option<u64> {
        self.exception.load(Acquire).checked_sub(1)
    }

    /// Stops handing out workgroups (its queue is gone); running ones finish.
    pub fn cancel(&self) {
        self.cancelled.store(true, Release);
    }

    /// Lets engines take the job's work again after kmd-shim serviced its faults.
    pub fn resume_after_fault(&self) {
        self.faulted.store(false, Release);
    }

    /// Nanoseconds engines have run it.
    pub fn engine_ns(&self) -> u64 {
        self.engine_ns.load(Relaxed)
    }

    /// Page faults it took.
    pub fn faults(&self) -> u64 {
        self.faults.load(Relaxed)
    }

    /// Whether it waits for a fault to be serviced.
    pub fn is_faulted(&self) -> bool {
        self.faulted.load(Acquire)
    }

    /// Its kernel.
    pub(crate) fn kernel(&self) -> &dyn Kernel {
        &*self.kernel
    }

    /// Its resolved arguments.
    pub(crate) fn args(&self) -> &Args {
        &self.args
    }

    /// Its DISPATCH.
    pub(crate) fn dispatch(&self) -> &Dispatch {
        &self.dispatch
    }

    /// Indices of up to `n` workgroups not handed out yet.
    pub(crate) fn unstarted(&self, n: u64) -> (u64, u64) {
        let from = self.next.load(Relaxed);
        (from, from.saturating_add(n).min(self.total))
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

    pub(crate) fn bump_progress(&self) {
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
    pub(crate) fn finished(&self) -> bool {
        self.cancelled.load(Relaxed) || self.done.load(Acquire) >= self.total
    }

    /// Whether an engine could take work from it now.
    pub(crate) fn claimable(&self) -> bool {
        !self.cancelled.load(Relaxed)
            && !self.suspended.load(Relaxed)
            && !self.faulted.load(Relaxed)
            && (self.next.load(Relaxed) < self.total || self.pending_yields.load(Acquire) > 0)
    }

    pub(crate) fn take_yielded(&self) -> Option<Workgroup> {
        if self.pending_yields.load(Acquire) == 0 {
            return None;
        }
        let mut y = self.yielded.lock().unwrap_or_else(|e| e.into_inner());
        let wg = y.pop()?;
        self.pending_yields.fetch_sub(1, Release);
        Some(wg)
    }

    pub(crate) fn put_yielded(&self, wg: Workgroup) {
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
