//! Queues: a ring in shared memory, written by this process and read by the firmware.
//!
//! Submitting is a few stores: the packets into their slots, tag last. While the firmware
//! polls the queue (the ring's poll flag, read from a cached line) that is all: the tags
//! are the doorbell. Otherwise the new write index goes into the queue's doorbell
//! (release), the queue's bit into the pending summary, and the firmware's sleep flag is
//! read. No syscall, no lock, no allocation, unless the firmware sleeps (one futex wake) or
//! the ring looks full (one read of the shared read index, and a wait only if it really is
//! full).

use crate::buffer::BufferMemory;
use crate::command::Command;
use crate::device::{Device, DeviceInner};
use crate::error::{ControlError, FenceFault, SubmitError, WaitError, WatchdogError};
use crate::fence::{Fence, FencePoint};
use crate::wait::WaitMode;
use crate::Buffer;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;
use userq_uapi::ioctl::{EmptyReply, Priority, Reply, Request};
use userq_uapi::packet::{self, Packet, MAX_KERNEL_ARGS};
use userq_uapi::shm::RingShm;
use userq_uapi::watchdog::Watchdog;

/// Ring size of [`Device::create_queue`].
pub const DEFAULT_RING_ENTRIES: u32 = 256;

mod builder;
mod ring;
pub use builder::QueueBuilder;

/// Something a submitted packet uses, kept alive until the packet completes. Held for its
/// `Drop` only (which releases the fence handle or frees the buffer), never read.
#[derive(Debug)]
#[allow(dead_code)]
enum Hold {
    /// A fence it signals or waits on.
    Fence(Fence),
    /// A buffer it reads or writes.
    Buffer(Arc<BufferMemory>),
}

/// What the firmware says about a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueStatus {
    /// Accepting and running work.
    Active,
    /// Stopped on an error; nothing more will run.
    Faulted(FenceFault),
    /// Destroyed (or its device went away).
    Destroyed,
}

/// A user-mode queue. Single producer: submitting takes `&mut self`. Wrap it in a mutex
/// to share it between threads.
pub struct Queue {
    dev: Arc<DeviceInner>,
    slot: u32,
    /// The ring: packets written here, the firmware's read index read back.
    ring: RingShm,
    /// Packets written so far, never wrapping; the doorbell holds the published copy.
    /// `wptr - cached_rptr ≤ entries`: a slot is written only once the firmware has copied
    /// the packet that was in it before.
    wptr: u64,
    /// A copy of the ring's read index: `cached_rptr ≤ read_index ≤ wptr`. Can be stale;
    /// re-read only when the ring *possibly* looks full.
    cached_rptr: u64,
    timeline: Fence,
    priority: Priority,
    /// Doorbells that found the firmware asleep and made a futex wake.
    wakes: u64,
    /// The number of the firmware sleep this queue's doorbell last woke (0: none since it
    /// was last seen awake): later doorbells in the same sleep make no syscall
    /// (`sync::ring_doorbell`).
    woken_sleep: u64,
    /// Fences and buffers named by submitted packets, with the packet's timeline value:
    /// kept alive until the timeline passes it, so a fence or buffer dropped by the caller
    /// cannot vanish under a packet that still names it. Pruned at submits that add holds
    /// (and whenever it grows past 64), so submits without any stay a few stores.
    holds: VecDeque<(u64, Hold)>,
    /// DISPATCH argument area: [`MAX_KERNEL_ARGS`] words per ring slot, allocated at the
    /// first dispatch. A slot's words are reused only when the ring slot is: the firmware
    /// copies them when it takes the packet, before the read index passes it.
    kernel_args: Option<Buffer<u64>>,
    /// Per-packet profiling ([`QueueBuilder::profiling`]): this side writes each packet's
    /// submit time into its record.
    profile: Option<userq_uapi::shm::ShmBytes>,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("slot", &self.slot)
            .field("entries", &self.ring.entries())
            .field("submitted", &self.wptr)
            .field("priority", &self.priority)
            .finish()
    }
}

impl Queue {
    /// The queue's timeline fence: packet `N` (from 1) completes by setting it to `N`.
    pub fn timeline(&self) -> &Fence {
        &self.timeline
    }

    /// The point of the last packet submitted (value 0 before the first).
    pub fn last_submitted(&self) -> FencePoint {
        self.timeline.point(self.wptr)
    }

    /// Ring size in packets.
    pub fn ring_entries(&self) -> u64 {
        self.ring.entries()
    }

    /// The queue's doorbell slot in its context.
    pub fn slot(&self) -> u32 {
        self.slot
    }

    /// How many doorbells found the firmware asleep and made a futex wake: the only
    /// syscall on the submit path. Zero while the firmware is awake, and at most one per
    /// firmware sleep ([`crate::Device::firmware_sleeps`]): doorbells that find the sleep
    /// this queue already woke still announced (the woken firmware has not run yet) make
    /// no syscall.
    pub fn firmware_wakes(&self) -> u64 {
        self.wakes
    }

    /// Scheduling priority.
    pub fn priority(&self) -> Priority {
        self.priority
    }

    /// Changes how the device decides that this queue's dispatches hang; applies to the
    /// dispatch running now too (lengthen the timeout of a queue whose work turned out
    /// longer, or shorten it to have a stuck one reset sooner).
    pub fn set_watchdog(&self, watchdog: Watchdog) -> Result<(), WatchdogError> {
        if !watchdog.is_valid() {
            return Err(WatchdogError::Invalid(watchdog));
        }
        let request = Request::SetWatchdog {
            slot: self.slot,
            watchdog,
        };
        let (v, _) = self.dev.call(request, &[])?;
        EmptyReply::decode(&v).map_err(|e| ControlError::Protocol(e.describe()))?;
        Ok(())
    }

    /// The firmware's view of the queue.
    pub fn status(&self) -> QueueStatus {
        if let Some(f) = self.timeline.fault() {
            if f.code == Some(userq_uapi::ErrorCode::QueueDestroyed)
                || f.code == Some(userq_uapi::ErrorCode::DeviceLost)
            {
                return QueueStatus::Destroyed;
            }
            return QueueStatus::Faulted(f);
        }
        QueueStatus::Active
    }

    /// Submits one command, blocking while the ring is full.
    pub fn submit(&mut self, cmd: Command) -> Result<FencePoint, SubmitError> {
        self.submit_batch(std::slice::from_ref(&cmd))
    }

    /// Submits one command, or fails with [`SubmitError::WouldBlock`] if the ring is full.
    pub fn try_submit(&mut self, cmd: Command) -> Result<FencePoint, SubmitError> {
        self.submit_batch_timeout(std::slice::from_ref(&cmd), Duration::ZERO)
    }

    /// Submits a batch with one doorbell, blocking while the ring lacks room. Returns the
    /// point of the batch's last packet. An empty batch returns [`Queue::last_submitted`].
    pub fn submit_batch(&mut self, cmds: &[Command]) -> Result<FencePoint, SubmitError> {
        self.submit_batch_timeout(cmds, Duration::MAX)
    }

    /// Submits a batch, waiting at most `timeout` for room ([`SubmitError::WouldBlock`] when
    /// `timeout` is zero and the ring is full, [`SubmitError::Timeout`] otherwise).
    pub fn submit_batch_timeout(
        &mut self,
        cmds: &[Command],
        timeout: Duration,
    ) -> Result<FencePoint, SubmitError> {
        let value = self.push(cmds, timeout)?;
        Ok(self.timeline.point(value))
    }

    /// The cheapest submit: like [`Queue::try_submit`] for a batch, but returns the batch's
    /// timeline value instead of a [`FencePoint`] (which holds a reference count on the
    /// fence). Turn it into a point with `queue.timeline().point(value)` when needed.
    #[inline(always)]
    pub fn enqueue(&mut self, cmds: &[Command]) -> Result<u64, SubmitError> {
        self.push(cmds, Duration::ZERO)
    }

    /// Submits `cmds`. The common submit, one plain command (no fence, no argument words,
    /// no buffers, no profiling) on an active queue whose cached read index shows room, is
    /// inlined into the caller ([`Queue::enqueue`]'s), and while the firmware polls the
    /// queue it stores nothing but the packet's slot and this side's `wptr` counter (the
    /// caller's own `Command` temporary aside): x86 commits stores in program order, and
    /// each slot store waits for its line to come back from the firmware's core, so every
    /// other store (a call's saved registers, a packet copied through the stack) holds a
    /// store-buffer entry behind it, and fewer slot lines are in flight at once. Toggled
    /// against the general path every 256 submits in one process: 7.3-14.4 -> 2.8-5.3 ns
    /// per submit with the vCPUs close, 39.7-40.1 -> 13.7-13.8 ns with them far apart
    /// (ARCHITECTURE, "Where a submit's time goes"). Everything else takes
    /// [`Queue::push_any`].
    #[inline(always)]
    fn push(&mut self, cmds: &[Command], timeout: Duration) -> Result<u64, SubmitError> {
        if let [c] = cmds {
            if c.is_plain()
                && self.profile.is_none()
                && self.cached_rptr >= self.read_index_needed(1)
                && self.is_active()
            {
                self.write_slot(c.cmd.encode());
                self.ring_doorbell();
                return Ok(self.wptr);
            }
        }
        self.push_any(cmds, timeout)
    }

    /// Submits any batch: checks it, makes room, writes it, rings the doorbell and keeps
    /// what its packets name.
    #[inline(never)]
    fn push_any(&mut self, cmds: &[Command], timeout: Duration) -> Result<u64, SubmitError> {
        // A stopped queue refuses at once.
        if !self.is_active() {
            match self.status() {
                QueueStatus::Faulted(f) => return Err(SubmitError::stopped(f)),
                QueueStatus::Destroyed => return Err(SubmitError::DeviceLost),
                // Stopping, its record not published yet: the ring decides below.
                QueueStatus::Active => {}
            }
        }
        // One pass over the batch: refuse it before anything reaches the ring.
        let mut dispatches = false;
        let mut holds = false;
        for c in cmds {
            holds |= c.fence.is_some() || !c.buffers().is_empty();
            if let Some(f) = &c.fence {
                if !Arc::ptr_eq(f.device(), &self.dev) {
                    return Err(SubmitError::ForeignFence);
                }
                let writes = matches!(
                    c.cmd,
                    packet::Command::SignalFence { .. } | packet::Command::SetFence { .. }
                );
                if f.is_timeline() && writes {
                    return Err(SubmitError::FenceNotWritable);
                }
            }
            if let Some(args) = c.kernel_args() {
                if args.len() > MAX_KERNEL_ARGS as usize {
                    return Err(SubmitError::TooManyKernelArgs);
                }
                dispatches = true;
            }
        }
        if dispatches && self.kernel_args.is_none() {
            let words = self.ring.entries() as usize * MAX_KERNEL_ARGS as usize;
            let dev = Device {
                inner: self.dev.clone(),
            };
            self.kernel_args = Some(
                dev.alloc::<u64>(words)
                    .map_err(|_| SubmitError::OutOfMemory)?,
            );
        }
        self.reserve(cmds.len(), timeout)?;
        let first = self.wptr;
        if dispatches || self.profile.is_some() {
            for c in cmds {
                let p = match c.kernel_args() {
                    None => c.cmd.encode(),
                    Some(_) => self.encode_with_args(c, self.wptr),
                };
                self.write(p);
            }
        } else {
            // The write index stays in a register: stored to `self` once per packet, it
            // would be one more store behind each slot's (see `Queue::push`). A loop of its
            // own: the general loop above with a local index (encoding arguments and
            // profiling by index) ran a NOP stream 15 % slower with the vCPUs far apart
            // (64-92 against 69-105 M/s, 4 alternated pairs of 3 rounds).
            for (i, c) in cmds.iter().enumerate() {
                ring::put(&self.ring, first + i as u64, c.cmd.encode());
            }
            self.wptr = first + cmds.len() as u64;
        }
        self.ring_doorbell();
        if holds {
            self.hold(first, cmds);
        }
        Ok(self.wptr)
    }

    /// Keeps the fences and buffers of the commands submitted from ring index `first` until
    /// their packets complete, and drops the holds of packets that have. Off the path of
    /// submits that hold nothing (NOPs, writes, timestamps).
    #[inline(never)]
    fn hold(&mut self, first: u64, cmds: &[Command]) {
        let held = self.holds.len();
        for (i, c) in cmds.iter().enumerate() {
            let value = first + i as u64 + 1;
            if let Some(f) = &c.fence {
                self.holds.push_back((value, Hold::Fence(f.clone())));
            }
            for b in c.buffers() {
                self.holds.push_back((value, Hold::Buffer(b.clone())));
            }
        }
        // What the caller dropped goes at the next submit that adds a hold after its packet
        // completed, not only once 64 holds have piled up.
        if held > 0 || self.holds.len() > 64 {
            self.release_holds();
        }
    }

    /// Encodes a command for ring position `index`, writing a DISPATCH's arguments into the
    /// argument area slot of that position.
    fn encode_with_args(&mut self, c: &Command, index: u64) -> Packet {
        let (packet::Command::Dispatch(mut d), Some(words), Some(area)) =
            (c.cmd, c.kernel_args(), self.kernel_args.as_mut())
        else {
            return c.cmd.encode();
        };
        let base = (index & (self.ring.entries() - 1)) as usize * MAX_KERNEL_ARGS as usize;
        for (i, w) in words.iter().enumerate() {
            area.write(base + i, *w);
        }
        d.args = area
            .address_of(base)
            .expect("slot inside the argument area");
        packet::Command::Dispatch(d).encode()
    }

    /// Drops the holds of packets that have completed.
    fn release_holds(&mut self) {
        let done = self.timeline.value();
        while self.holds.front().is_some_and(|(v, _)| *v <= done) {
            self.holds.pop_front();
        }
    }

    /// Submits packets as they are, unchecked: for tools and for tests of the firmware's
    /// validation. The firmware stops the queue on the first invalid one.
    pub fn submit_packets(
        &mut self,
        packets: &[Packet],
        timeout: Duration,
    ) -> Result<FencePoint, SubmitError> {
        self.reserve(packets.len(), timeout)?;
        for p in packets {
            self.write(*p);
        }
        self.ring_doorbell();
        Ok(self.timeline.point(self.wptr))
    }

    /// Waits until everything submitted so far has completed.
    pub fn finish(&self, timeout: Duration) -> Result<(), WaitError> {
        self.last_submitted().wait_with(WaitMode::Adaptive, timeout)
    }

    /// Whether the queue's state word says it is active. The word sits on its own line of
    /// the timeline page and changes only when the queue stops, so this load stays cached.
    #[inline(always)]
    fn is_active(&self) -> bool {
        self.timeline.queue_state() == userq_uapi::layout::QueueState::Active as u32
    }
}

/// Dropping a queue destroys it at once, like `hsa_queue_destroy`: packets that have not
/// completed never will, and their points fail with [`crate::ErrorCode::QueueDestroyed`].
/// Call [`Queue::finish`] first to let submitted work complete.
impl Drop for Queue {
    fn drop(&mut self) {
        let _ = self
            .dev
            .call(Request::DestroyQueue { slot: self.slot }, &[]);
    }
}
