//! [`QueueBuilder`]: a queue's ring size, priority, time slice, watchdog and profiling,
//! checked on this side before CREATE_QUEUE, and the mapping of what it returns.

use super::{Queue, DEFAULT_RING_ENTRIES};
use crate::device::{Device, DeviceInner};
use crate::error::{ControlError, QueueCreateError};
use crate::fence::Fence;
use rustix::fd::AsFd;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;
use userq_uapi::ioctl::{CreateQueueReply, Priority, Reply, Request};
use userq_uapi::layout::{FenceKind, MAX_RING_ENTRIES, MIN_RING_ENTRIES};
use userq_uapi::shm::RingShm;
use userq_uapi::watchdog::Watchdog;
use userq_uapi::KmdStatus;

/// Builds a [`Queue`].
#[derive(Debug)]
pub struct QueueBuilder<'d> {
    dev: &'d Device,
    entries: u32,
    priority: Priority,
    time_slice: Option<Duration>,
    watchdog: Watchdog,
    profiling: bool,
}

impl<'d> QueueBuilder<'d> {
    pub(crate) fn new(dev: &'d Device) -> Self {
        QueueBuilder {
            dev,
            entries: DEFAULT_RING_ENTRIES,
            priority: Priority::Normal,
            time_slice: None,
            watchdog: Watchdog::default(),
            profiling: profiling_from_env(),
        }
    }

    /// Per-packet profiling timestamps, as HSA profiling signals: the firmware records
    /// when it took and completed each packet (and this side when it submitted it), for
    /// `userq trace`. Off by default (on for every queue when `$USERQ_PROFILE` is `1`,
    /// as a profiler's launcher sets it), and free when off.
    pub fn profiling(mut self, on: bool) -> Self {
        self.profiling = on;
        self
    }

    /// How the device decides that a dispatch of this queue hangs (default: a job timeout
    /// of 2 s). A hung dispatch resets the queue: its timeline is poisoned with
    /// [`ErrorCode::JobTimeout`](crate::ErrorCode::JobTimeout) or
    /// [`ErrorCode::NoProgress`](crate::ErrorCode::NoProgress) and it takes no more work.
    pub fn watchdog(mut self, watchdog: Watchdog) -> Self {
        self.watchdog = watchdog;
        self
    }

    /// An ordinary queue whose dispatches may each run for `timeout` (1 ms to 600 s) on the
    /// engines.
    pub fn job_timeout(self, timeout: Duration) -> Self {
        self.watchdog(Watchdog::JobTimeout(timeout))
    }

    /// A long-running queue (persistent kernels): no job timeout, but a dispatch that
    /// finishes no workgroup and reaches no checkpoint for `no_progress` (1 ms to 600 s)
    /// hangs.
    pub fn long_running(self, no_progress: Duration) -> Self {
        self.watchdog(Watchdog::NoProgress(no_progress))
    }

    /// Ring size in packets: a power of two from 2 to 65536.
    pub fn ring_entries(mut self, entries: u32) -> Self {
        self.entries = entries;
        self
    }

    /// Scheduling priority.
    pub fn priority(mut self, priority: Priority) -> Self {
        self.priority = priority;
        self
    }

    /// How long an engine runs this queue's dispatches before another queue of the same
    /// priority gets its turn (default 1 ms; 1 µs to 1 s).
    pub fn time_slice(mut self, slice: Duration) -> Self {
        self.time_slice = Some(slice);
        self
    }

    /// Creates the queue.
    pub fn create(self) -> Result<Queue, QueueCreateError> {
        let e = self.entries;
        if !e.is_power_of_two() || !(MIN_RING_ENTRIES..=MAX_RING_ENTRIES).contains(&e) {
            return Err(QueueCreateError::BadRingSize(e));
        }
        let time_slice_us = match self.time_slice {
            None => 0,
            Some(t) => {
                let us = t.as_micros();
                if us == 0 || us > userq_uapi::ioctl::MAX_TIME_SLICE_US as u128 {
                    return Err(QueueCreateError::BadTimeSlice(t));
                }
                us as u32
            }
        };
        if !self.watchdog.is_valid() {
            return Err(QueueCreateError::BadWatchdog(self.watchdog));
        }
        let inner = &self.dev.inner;
        let r = inner.call(
            Request::CreateQueue {
                ring_entries: e,
                priority: self.priority,
                time_slice_us,
                watchdog: self.watchdog,
                profile: self.profiling,
            },
            &[],
        );
        let (v, fds) = match r {
            Ok(x) => x,
            Err(ControlError::Rejected(KmdStatus::LimitExceeded)) => {
                return Err(QueueCreateError::TooManyQueues)
            }
            Err(ControlError::Rejected(KmdStatus::Banned)) => return Err(QueueCreateError::Banned),
            Err(err) => return Err(err.into()),
        };
        let mut fds = fds.into_iter();
        let (Some(ring_fd), Some(state), Some(waiters)) = (fds.next(), fds.next(), fds.next())
        else {
            return Err(ControlError::Protocol("CREATE_QUEUE returned the wrong fds").into());
        };
        let profile_fd = fds.next();
        if profile_fd.is_some() != self.profiling || fds.next().is_some() {
            return Err(ControlError::Protocol("CREATE_QUEUE returned the wrong fds").into());
        }
        let reply =
            CreateQueueReply::decode(&v).map_err(|e| ControlError::Protocol(e.describe()))?;
        let slot = reply.slot;
        // From here on, a failure must still destroy the queue: build the guard first.
        let destroy = DestroyOnError {
            dev: inner,
            slot: Some(slot),
        };
        let ring = RingShm::map(ring_fd.as_fd(), e).map_err(ControlError::from)?;
        let profile = match &profile_fd {
            Some(fd) => Some(
                userq_uapi::shm::ShmBytes::map_resident(
                    fd.as_fd(),
                    userq_uapi::layout::profile::profile_object_size(e),
                )
                .map_err(ControlError::from)?,
            ),
            None => None,
        };
        let timeline = Fence::from_parts(
            inner,
            reply.timeline.0,
            FenceKind::Timeline,
            reply.waiter,
            state,
            waiters,
        )
        .map_err(|e| match e {
            crate::FenceError::Control(c) => c,
            _ => ControlError::Protocol("timeline fence"),
        })?;
        let mut destroy = destroy;
        destroy.slot = None;
        Ok(Queue {
            dev: inner.clone(),
            slot,
            ring,
            wptr: 0,
            cached_rptr: 0,
            timeline,
            priority: self.priority,
            wakes: 0,
            woken_sleep: 0,
            holds: VecDeque::new(),
            kernel_args: None,
            profile,
        })
    }
}

/// `$USERQ_PROFILE=1`: queues profile unless told otherwise.
fn profiling_from_env() -> bool {
    std::env::var_os("USERQ_PROFILE").is_some_and(|v| v == "1")
}

struct DestroyOnError<'a> {
    dev: &'a Arc<DeviceInner>,
    slot: Option<u32>,
}

impl Drop for DestroyOnError<'_> {
    fn drop(&mut self) {
        if let Some(slot) = self.slot {
            let _ = self.dev.call(Request::DestroyQueue { slot }, &[]);
        }
    }
}
