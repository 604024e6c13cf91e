//! DOC: the kmd ↔ firmware messages.
//!
//! kmd-shim and the firmware talk through the two [`crate::layout::MsgRing`]s of the
//! [`crate::layout::ControlRegion`], like GuC's H2G/G2H command transport. Every message is
//! 64 bytes: word 0 holds the kind in its low 32 bits and a sequence number in its high 32
//! bits; words 1..8 are arguments.
//!
//! Memory objects cannot travel through shared memory, so kmd-shim first sends each
//! object's memfd on the *object channel*, a `SOCK_SEQPACKET` socketpair, as one message of
//! an 8-byte [`ObjectId`] with one `SCM_RIGHTS` fd, and then posts the request that names
//! it. The firmware takes objects off the channel until it finds the one named. At boot,
//! before any request, kmd-shim sends the [`boot`] objects.
//!
//! Every request is acknowledged with [`FwEvent::Ack`] carrying its sequence number; kmd-shim
//! waits for acks with a timeout. That wait is bounded: the firmware acks as soon as it has
//! processed the request and never waits on a job to do so.

use crate::error::ErrorCode;
use crate::ioctl::Priority;
use crate::packet::FenceHandle;
use crate::watchdog::Watchdog;

mod event;
mod request;
pub use event::{FwEvent, FwStatus};

/// Names a memory object sent on the object channel.
pub type ObjectId = u64;

/// A device-wide fence id, assigned by kmd-shim.
pub type FenceId = u64;

/// Objects sent at boot, with fixed ids.
pub mod boot {
    use super::ObjectId;
    /// The [`crate::layout::ControlRegion`].
    pub const CONTROL: ObjectId = 1;
    /// The [`crate::layout::DeviceStatus`].
    pub const STATUS: ObjectId = 2;
    /// The [`crate::layout::DeviceKick`].
    pub const KICK: ObjectId = 3;
    /// The device-memory pool: a memfd of the budget's size whose slots hold resident
    /// pages of on-demand buffers ([`crate::paging`]).
    pub const POOL: ObjectId = 4;
    /// The pool's use clock: one little-endian `u64` per slot, the firmware's clock at
    /// the slot's last use by a workgroup (kmd-shim evicts the least recently used).
    pub const POOL_USE: ObjectId = 5;
    /// The [`crate::layout::Telemetry`] of this generation.
    pub const TELEMETRY: ObjectId = 6;
    /// First id kmd-shim assigns to other objects.
    pub const FIRST_DYNAMIC: ObjectId = 16;
}

mod kind {
    pub const MAP_CONTEXT: u32 = 1;
    pub const UNMAP_CONTEXT: u32 = 2;
    pub const MAP_QUEUE: u32 = 3;
    pub const UNMAP_QUEUE: u32 = 4;
    pub const REGISTER_FENCE: u32 = 5;
    pub const BIND_FENCE: u32 = 6;
    pub const UNBIND_FENCE: u32 = 7;
    pub const POISON_FENCE: u32 = 8;
    pub const DROP_FENCE: u32 = 9;
    pub const MAP_BUFFER: u32 = 10;
    pub const UNMAP_BUFFER: u32 = 11;
    pub const SHUTDOWN: u32 = 12;
    pub const SUSPEND: u32 = 13;
    pub const RESUME: u32 = 14;
    pub const SET_WATCHDOG: u32 = 15;
    pub const RESET_QUEUE: u32 = 16;
    pub const BAN_CONTEXT: u32 = 17;
    pub const SYNC: u32 = 18;
    pub const MAP_ON_DEMAND: u32 = 19;
    pub const MAP_PAGES: u32 = 20;
    pub const INVALIDATE: u32 = 21;
    pub const FAULT_REPLY: u32 = 22;
    pub const WAIT_JOBS: u32 = 23;
    pub const MAP_PROFILE: u32 = 24;

    pub const ACK: u32 = 0x100;
    pub const QUEUE_ERROR: u32 = 0x101;
    pub const READY: u32 = 0x102;
    pub const HANG: u32 = 0x103;
    pub const FAULT: u32 = 0x104;
    pub const BUSY: u32 = 0x105;
}

/// A kmd → firmware request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FwRequest {
    /// A new context, its doorbell page and its waiter counts.
    MapContext {
        /// Context id.
        ctx: u32,
        /// The [`crate::layout::DoorbellPage`] object.
        doorbell: ObjectId,
        /// The [`crate::layout::ContextWaiters`] object.
        waiters: ObjectId,
        /// Its row in the [`crate::layout::Telemetry`] tables (below
        /// [`crate::layout::TELEMETRY_CONTEXTS`]).
        row: u32,
    },
    /// Tears down a context: every queue (timelines poisoned with
    /// [`ErrorCode::OwnerDied`]), binding and buffer.
    UnmapContext {
        /// Context id.
        ctx: u32,
    },
    /// A new queue. Its timeline fence must already be registered.
    MapQueue {
        /// Owning context.
        ctx: u32,
        /// Doorbell slot.
        slot: u32,
        /// The ring object.
        ring: ObjectId,
        /// Ring entries (a power of two).
        entries: u32,
        /// Priority.
        priority: Priority,
        /// The queue's timeline fence.
        timeline: FenceId,
        /// Engine time slice in microseconds (0: the firmware's default).
        time_slice_us: u32,
    },
    /// Removes a queue; its timeline fence is poisoned with [`ErrorCode::QueueDestroyed`].
    UnmapQueue {
        /// Owning context.
        ctx: u32,
        /// Doorbell slot.
        slot: u32,
    },
    /// Makes a fence known to the firmware.
    RegisterFence {
        /// Global id.
        fence: FenceId,
        /// The [`crate::layout::FenceState`] object.
        state: ObjectId,
        /// The [`crate::layout::FenceWaiters`] object.
        waiters: ObjectId,
    },
    /// Lets a context name a fence by a handle.
    BindFence {
        /// Context id.
        ctx: u32,
        /// The context's handle.
        handle: FenceHandle,
        /// Global id.
        fence: FenceId,
        /// Whether the context's queues may SIGNAL_FENCE it.
        writable: bool,
        /// The context's waiter count for it, in its
        /// [`crate::layout::ContextWaiters`] (below [`crate::layout::WAITER_SLOTS`]).
        waiter_slot: u32,
    },
    /// Removes a context's handle.
    UnbindFence {
        /// Context id.
        ctx: u32,
        /// The handle.
        handle: FenceHandle,
    },
    /// Poisons a fence that can no longer be signalled.
    PoisonFence {
        /// Global id.
        fence: FenceId,
        /// Why.
        code: ErrorCode,
    },
    /// Forgets a fence no context holds any more.
    DropFence {
        /// Global id.
        fence: FenceId,
    },
    /// Maps a buffer into a context's VM.
    MapBuffer {
        /// Context id.
        ctx: u32,
        /// Device virtual address.
        va: u64,
        /// Size in bytes.
        size: u64,
        /// The buffer object.
        object: ObjectId,
    },
    /// Unmaps a buffer.
    UnmapBuffer {
        /// Context id.
        ctx: u32,
        /// Device virtual address.
        va: u64,
    },
    /// Stops the firmware.
    Shutdown,
    /// Stops a queue, or every queue of a context (`slot: None`), from running anything:
    /// no packet is taken and no workgroup of its dispatches starts. Acknowledged once no
    /// workgroup of theirs is running any more (long kernels yield at their checkpoints).
    Suspend {
        /// Context id.
        ctx: u32,
        /// One queue, or the whole context.
        slot: Option<u32>,
    },
    /// Undoes [`FwRequest::Suspend`]; the work continues where it stopped.
    Resume {
        /// Context id.
        ctx: u32,
        /// One queue, or the whole context.
        slot: Option<u32>,
    },
    /// Sets a queue's hang detection (a new queue has [`Watchdog::default`]); applies to
    /// its running dispatch too.
    SetWatchdog {
        /// Context id.
        ctx: u32,
        /// Queue slot.
        slot: u32,
        /// The watchdog.
        watchdog: Watchdog,
    },
    /// Resets a queue kmd-shim found guilty of a hang: its running dispatch is cancelled,
    /// its timeline poisoned with `code` (error record first, then the queue's state word,
    /// then the poison and the wake), and the fences its pending SIGNAL_FENCE packets would
    /// have signalled are poisoned too. Other queues are not touched.
    ResetQueue {
        /// Context id.
        ctx: u32,
        /// Queue slot.
        slot: u32,
        /// Why ([`ErrorCode::JobTimeout`], [`ErrorCode::NoProgress`]).
        code: ErrorCode,
        /// The error record's detail (for a hang, the milliseconds it was timed).
        detail: u32,
        /// The DISPATCH's packet index, for the error record.
        packet_index: u64,
        /// The job the hang report named: if the queue no longer runs it (it completed
        /// meanwhile, or the slot holds another queue now), nothing is reset. `u64::MAX`:
        /// whatever the queue runs.
        job: u64,
    },
    /// Stops every queue of a banned context with [`ErrorCode::ContextBanned`].
    BanContext {
        /// Context id.
        ctx: u32,
    },
    /// Does nothing but get acknowledged: since events and acks leave on one ring in
    /// order, once its ack is in, kmd-shim has seen every event the firmware sent before.
    Sync,
    /// Maps an on-demand buffer into a context's VM: a device window of `size` bytes
    /// with no page resident.
    MapOnDemand {
        /// Context id.
        ctx: u32,
        /// Device virtual address (page-aligned).
        va: u64,
        /// Size in bytes.
        size: u64,
    },
    /// Makes `count` pages resident: page `i` at `va + i * DEVICE_PAGE` now lives in pool
    /// slot `slot + i`, whose data kmd-shim has copied in.
    MapPages {
        /// Context id.
        ctx: u32,
        /// Device address of the first page (page-aligned, inside one on-demand buffer).
        va: u64,
        /// Pool slot of the first page.
        slot: u32,
        /// Pages.
        count: u32,
    },
    /// Takes `count` resident pages from `va` away from the device. Acknowledged once no
    /// workgroup can touch them any more (running ones that pin them yield at their next
    /// checkpoint, and refault when they run again), never after a job completes: after
    /// the ack kmd-shim may copy the slots out and reuse them. A workgroup that does not
    /// yield within [`crate::fwmsg`]'s preemption bound gets its queue reset
    /// (`PreemptTimeout`) and the pages are taken anyway.
    Invalidate {
        /// Context id.
        ctx: u32,
        /// Device address of the first page.
        va: u64,
        /// Pages.
        count: u32,
    },
    /// The answer to a queue's faults: `code` 0 resumes the job named (its faulted
    /// workgroups run again from their last checkpoint); otherwise the queue stops with
    /// that [`ErrorCode`] and `address`.
    FaultReply {
        /// Context id.
        ctx: u32,
        /// Queue slot.
        slot: u32,
        /// The job the faults named.
        job: u64,
        /// 0, or the [`ErrorCode`] to stop the queue with.
        code: u32,
        /// The address for the error record.
        address: u64,
    },
    /// The counterfactual eviction policy's wait (`WaitForIdleJobs`, off by default):
    /// acknowledged once no unfinished job of `ctx` uses the buffer holding `va`, or with
    /// [`FwStatus::Busy`] after `timeout_ms` (the policy's deadlock watchdog), after one
    /// [`FwEvent::Busy`] per job still using it.
    WaitJobs {
        /// Context id.
        ctx: u32,
        /// Device address inside the buffer.
        va: u64,
        /// How long to wait, milliseconds.
        timeout_ms: u32,
    },
    /// Turns on per-packet profiling for a queue: its profile object
    /// ([`crate::layout::profile`]).
    MapProfile {
        /// Context id.
        ctx: u32,
        /// Queue slot.
        slot: u32,
        /// The profile object.
        object: ObjectId,
    },
}

/// A message as eight words.
pub type Words = [u64; 8];

fn head(kind: u32, seq: u32) -> u64 {
    kind as u64 | (seq as u64) << 32
}
