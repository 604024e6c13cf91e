//! DOC: a queue as the firmware runs it.
//!
//! The firmware owns `rptr`, its private count of packets copied out of the ring, and
//! `completed`, its private copy of the timeline value. Packets are taken by their
//! sequence tags first; the client's write index (its doorbell) is an input read when the
//! next slot has no tag, and a value that moved backwards or ran more than a ring ahead of
//! `rptr` stops the queue with [`ErrorCode::BadWriteIndex`].
//!
//! Each packet is copied out of its slot once, through atomic loads, into a private
//! [`Packet`]; then decoded, validated and executed ([`crate::exec`]). Packet `i` (0-based) completes with
//! timeline value `i + 1`. Packets of one queue complete in order.
//!
//! A WAIT_FENCE whose condition does not hold parks the queue: it is taken off the run
//! list, costs nothing until the fence changes, and registers itself in the fence's
//! [`userq_uapi::layout::WaiterLine::firmware`] count so that host signallers kick the
//! firmware.

pub use crate::exec::{Fault, Resources};

use crate::exec::{execute, ParkedWait, Step};
use crate::fence::{FenceObject, WaitStatus};
use crate::job::Job;
use crate::QueueId;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering::*};
use std::sync::Arc;
use std::time::Duration;
use userq_uapi::error::ErrorCode;
use userq_uapi::ioctl::Priority;
use userq_uapi::layout::QueueState;
use userq_uapi::packet::{sequence_tag, Command, FenceHandle, Packet};
use userq_uapi::shm::{PacketSlot, RingShm};
use userq_uapi::sync;
use userq_uapi::watchdog::Watchdog;

mod profile;
mod service;
mod stop;
pub use profile::QueueFigures;

#[derive(Debug)]
enum RunState {
    Active,
    Parked(ParkedWait),
    /// A DISPATCH runs on the engines (or inline, briefly); the queue continues when it
    /// completes.
    Dispatching {
        job: Arc<Job>,
        packet_index: u64,
    },
    Faulted,
}

/// What one service of a queue ended with.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// The ring is drained.
    Idle,
    /// The budget ran out with packets left: run again.
    More,
    /// Parked on a fence.
    Parked,
    /// Stopped on an error, already recorded in the timeline fence.
    Faulted(Fault),
    /// A DISPATCH became a job: the caller runs it inline or submits it to the engines;
    /// the queue waits for it.
    Dispatched(Arc<Job>),
}

/// A queue mapped by the firmware.
#[derive(Debug)]
pub struct Queue {
    /// Its context and doorbell slot.
    pub id: QueueId,
    /// Scheduling priority of its dispatches on the engines.
    pub priority: Priority,
    /// Time slice of its dispatches on the engines (`None`: the firmware's default).
    pub time_slice: Option<Duration>,
    /// Hang detection of its dispatches (read at every check, so a change applies to the
    /// running one).
    pub watchdog: Watchdog,
    /// The timeline fence; only the firmware writes it.
    pub timeline: Rc<FenceObject>,
    /// Whether the queue is on the scheduler's run list (so it is never listed twice).
    /// Kept here so the check is one load on the per-packet path; only [`crate::sched`]
    /// reads or changes it.
    pub(crate) on_run_list: bool,
    ring: RingShm,
    /// Packets copied out of the ring. Private: never read back from shared memory.
    /// `completed ≤ rptr`; packets taken by the doorbell keep `rptr ≤ doorbell_floor +
    /// entries`.
    rptr: u64,
    /// The largest write index the client has published in its doorbell so far: a
    /// doorbell below it moved backwards. (A doorbell may lag `rptr`, since polled queues
    /// also consume packets by their sequence tags.)
    doorbell_floor: u64,
    /// Value of the last completed packet. Private copy of the timeline; `completed ≤
    /// rptr` (a packet completes only after it was copied out).
    completed: u64,
    /// Last value of `rptr` stored into the ring's read index.
    published_rptr: u64,
    /// Last value stored into the timeline fence.
    published_completed: u64,
    state: RunState,
    /// Whether the firmware polls the next slot (mirrored in the ring's `RingPoll`).
    polled: bool,
    /// Whether the queue ran a packet since the scheduler last asked ([`Queue::went_idle`]):
    /// a flag, not a clock read, on the per-packet path.
    ran: bool,
    /// Suspended by kmd-shim: takes no packet, its dispatch starts no workgroup.
    suspended: bool,
    /// Engine time and page faults of its finished dispatches (telemetry), but the last
    /// one's: an engine adds a time slice to its job after the slice, which may be after
    /// the job completed, so the last job is kept and read live until the next one
    /// completes.
    engine_ns_done: u64,
    faults_done: u64,
    last_job: Option<Arc<Job>>,
    /// Per-packet profiling timestamps, when kmd-shim turned them on.
    profile: Option<userq_uapi::shm::ShmBytes>,
}

impl Queue {
    /// A queue over a checked ring mapping.
    pub fn new(
        id: QueueId,
        ring: RingShm,
        priority: Priority,
        time_slice: Option<Duration>,
        timeline: Rc<FenceObject>,
    ) -> Self {
        timeline
            .state()
            .queue
            .state
            .store(QueueState::Active as u32, Release);
        Queue {
            id,
            priority,
            time_slice,
            watchdog: Watchdog::default(),
            timeline,
            on_run_list: false,
            ring,
            rptr: 0,
            doorbell_floor: 0,
            completed: 0,
            published_rptr: 0,
            published_completed: 0,
            state: RunState::Active,
            polled: false,
            ran: true,
            suspended: false,
            engine_ns_done: 0,
            faults_done: 0,
            last_job: None,
            profile: None,
        }
    }

    /// Ring entries.
    pub fn entries(&self) -> u64 {
        self.ring.entries()
    }

    /// Suspends or resumes the queue (and its running dispatch, if any). Returns the
    /// dispatch's job, whose workgroups a suspender must wait out.
    pub fn set_suspended(&mut self, on: bool) -> Option<Arc<Job>> {
        self.suspended = on;
        match &self.state {
            RunState::Dispatching { job, .. } => {
                job.set_suspended(on);
                Some(job.clone())
            }
            _ => None,
        }
    }

    /// Whether the firmware polls this queue's write index (the doorbell fast path).
    pub fn is_polled(&self) -> bool {
        self.polled
    }

    /// Sets or clears the ring's polled flag. Clearing is only half of the transition: the
    /// caller must then run the membarrier and look at the write index once more.
    pub fn set_polled(&mut self, on: bool) {
        self.polled = on;
        self.ring.header().poll.polled.store(on as u32, Release);
    }

    #[inline]
    fn slot(&self, index: u64) -> &PacketSlot {
        self.ring.slot(index)
    }

    /// Whether the queue ran no packet since the last call (the scheduler asks once per
    /// tick, so `true` means idle for at least a tick).
    pub fn went_idle(&mut self) -> bool {
        !std::mem::replace(&mut self.ran, false)
    }

    /// Whether the queue is parked on a fence.
    pub fn is_parked(&self) -> bool {
        matches!(self.state, RunState::Parked(_))
    }

    /// Whether the queue is parked and its wait can now end (satisfied or poisoned). Never
    /// while it is suspended: [`Queue::try_unpark`] would not take it, and a wait counted
    /// as work the firmware cannot do would keep it from ever sleeping.
    pub fn parked_ready(&self) -> bool {
        match &self.state {
            RunState::Parked(w) if !self.suspended => !matches!(w.status(), WaitStatus::Pending),
            _ => false,
        }
    }

    /// Whether the queue can run at all.
    pub fn is_active(&self) -> bool {
        matches!(self.state, RunState::Active) && !self.suspended
    }

    /// The job of the queue's running DISPATCH.
    pub fn running_job(&self) -> Option<&Arc<Job>> {
        match &self.state {
            RunState::Dispatching { job, .. } => Some(job),
            _ => None,
        }
    }

    /// Whether the queue stopped on an error (or was reset).
    pub fn is_faulted(&self) -> bool {
        matches!(self.state, RunState::Faulted)
    }

    /// Copies packet `index` out of its slot once.
    fn copy_packet(&self, index: u64) -> Packet {
        let mut words = [0u64; 8];
        for (w, s) in words.iter_mut().zip(self.slot(index)) {
            *w = s.load(Relaxed);
        }
        Packet::from_words(words)
    }

    /// Ends the queue's DISPATCH if `job` is it: the packet completes and the queue runs on.
    pub fn finish_dispatch(&mut self, job: &Arc<Job>) -> bool {
        let RunState::Dispatching {
            job: j,
            packet_index,
        } = &self.state
        else {
            return false;
        };
        if !Arc::ptr_eq(j, job) {
            return false;
        }
        self.completed = packet_index + 1;
        let index = *packet_index;
        self.profile_end(index);
        // The previous job's slices have all been added by now; this one's may not be.
        if let Some(prev) = self.last_job.replace(job.clone()) {
            self.engine_ns_done += prev.engine_ns();
            self.faults_done += prev.faults();
        }
        self.state = RunState::Active;
        self.ran = true;
        self.publish();
        true
    }

    /// If parked and the fence now satisfies the wait, unparks (returning `More`); if the
    /// fence was poisoned instead, faults. `None` while still parked or not parked.
    pub fn try_unpark(&mut self) -> Option<Outcome> {
        let RunState::Parked(wait) = &self.state else {
            return None;
        };
        if self.suspended {
            return None; // a suspended queue completes nothing, not even a wait
        }
        match wait.status() {
            WaitStatus::Pending => None,
            WaitStatus::Satisfied => {
                let index = wait.packet_index;
                wait.fence.waiters().line.firmware.fetch_sub(1, SeqCst);
                self.profile_end(index);
                self.state = RunState::Active;
                self.completed = index + 1;
                self.publish();
                Some(Outcome::More)
            }
            WaitStatus::Poisoned(code) => {
                let f = Fault {
                    code: ErrorCode::DependencyFailed,
                    packet_index: wait.packet_index,
                    address: wait.fence.id,
                    detail: code,
                };
                Some(self.fault(f))
            }
        }
    }

    /// Publishes the read index and the timeline value if they moved. A read index that
    /// moved without a completion (a packet taken but not finished: a parked WAIT_FENCE, a
    /// DISPATCH on the engines) still wakes the timeline's waiters, since a producer
    /// blocked on a full ring waits there for room.
    #[inline(always)]
    fn publish(&mut self) {
        let consumed = self.rptr != self.published_rptr;
        if consumed {
            self.published_rptr = self.rptr;
            self.ring
                .header()
                .read_index
                .value
                .store(self.rptr, Release);
        }
        let t = &self.timeline;
        if self.completed != self.published_completed {
            self.published_completed = self.completed;
            sync::signal_fence(t.state(), t.waiters(), self.completed, || t.host_waiting());
        } else if consumed {
            sync::wake_waiters(t.state(), t.waiters(), || t.host_waiting());
        }
    }
}
