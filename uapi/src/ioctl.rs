//! DOC: the control socket ("ioctls") between clients and kmd-shim.
//!
//! The socket is a Unix `SOCK_SEQPACKET` socket, so message boundaries survive. Every
//! request is exactly one [`RawRequest`] (64 bytes) with the file descriptors the op takes
//! attached as `SCM_RIGHTS`; every reply is exactly one [`RawReply`] with the op's file
//! descriptors attached. A connection carries at most one context: the first request must be
//! [`Request::OpenContext`], and closing the connection destroys the context and everything
//! it owns. Requests are answered in order, one at a time.
//!
//! | op | request args | reply values | fds in | fds out |
//! |---|---|---|---|---|
//! | OPEN_CONTEXT | abi version | [`OpenContextReply`]: ctx id, device generation | | doorbell page (rw), device status (ro), device kick (rw), context waiters (rw) |
//! | CREATE_QUEUE | ring entries, [`Priority`], time slice µs (0: default), [`Watchdog`] word, profiling (0/1) | [`CreateQueueReply`]: slot, timeline fence handle, global fence id, [`crate::layout::WaiterSlot`] | | ring (rw), fence state (ro), fence waiters (rw) |
//! | DESTROY_QUEUE | slot | [`EmptyReply`] | | |
//! | CREATE_FENCE | initial value | [`CreateFenceReply`]: handle, global fence id, waiter slot | | fence state (rw), fence waiters (rw) |
//! | IMPORT_FENCE | | [`ImportFenceReply`]: handle, global fence id, [`crate::layout::FenceKind`], waiter slot | fence state, fence waiters | |
//! | RELEASE_FENCE | handle | [`EmptyReply`] | | |
//! | ALLOC_BUFFER | size in bytes, flags ([`crate::paging::ON_DEMAND`]) | [`BufferReply`]: device address, size (as asked; the memfd is whole pages) | | buffer memfd (rw) |
//! | FREE_BUFFER | device address | [`EmptyReply`] | | |
//! | IMPORT_BUFFER | | [`BufferReply`]: device address, size | buffer memfd (another context's) | |
//! | SET_WATCHDOG | slot, [`Watchdog`] word | [`EmptyReply`] | | |
//! | RESET_STATS | | [`ResetStatsReply`]: hangs (guilty), queues stopped by others' hangs or device loss (innocent), banned | | |
//! | MIGRATE | device address, bytes, [`crate::paging::MigrateTo`] | [`EmptyReply`] | | |
//! | PAGING_STATS | part (0 or 1) | [`PagingStatsReply`]: six values of [`crate::paging::PagingStats::parts`] | | |
//! | PROFILE_FD (also without a context) | ctx, slot | [`EmptyReply`] | | the queue's profile object (ro) |
//! | OBSERVE (also as a connection's first request, without a context) | abi version | [`ObserveReply`]: device generation | | device status (ro), [`crate::layout::Telemetry`] (ro), [`crate::layout::EventLog`] (ro) |
//!
//! Reply values sit in [`RawReply::values`] in the order the table lists them; the values an
//! op does not use are zero. Each reply type's [`Reply::decode`] checks exactly that.

use crate::error::KmdStatus;
use crate::packet::FenceHandle;
use crate::watchdog::Watchdog;
use bytemuck::{Pod, Zeroable};

mod reply;
mod request;
pub use reply::{
    BufferReply, CreateFenceReply, CreateQueueReply, EmptyReply, ImportFenceReply, ObserveReply,
    OpenContextReply, PagingStatsReply, Reply, ReplyDecodeError, ResetStatsReply,
};

/// Largest buffer one ALLOC_BUFFER may ask for (16 GiB).
pub const MAX_BUFFER_SIZE: u64 = 16 << 30;

/// Longest time slice a queue may ask for (1 s).
pub const MAX_TIME_SLICE_US: u32 = 1_000_000;

/// Most file descriptors any message carries.
pub const MAX_FDS_PER_MESSAGE: usize = 4;

/// Request op codes.
pub mod op {
    /// See [`super::Request::OpenContext`].
    pub const OPEN_CONTEXT: u32 = 1;
    /// See [`super::Request::CreateQueue`].
    pub const CREATE_QUEUE: u32 = 2;
    /// See [`super::Request::DestroyQueue`].
    pub const DESTROY_QUEUE: u32 = 3;
    /// See [`super::Request::CreateFence`].
    pub const CREATE_FENCE: u32 = 4;
    /// See [`super::Request::ImportFence`].
    pub const IMPORT_FENCE: u32 = 5;
    /// See [`super::Request::ReleaseFence`].
    pub const RELEASE_FENCE: u32 = 6;
    /// See [`super::Request::AllocBuffer`].
    pub const ALLOC_BUFFER: u32 = 7;
    /// See [`super::Request::FreeBuffer`].
    pub const FREE_BUFFER: u32 = 8;
    /// See [`super::Request::ImportBuffer`].
    pub const IMPORT_BUFFER: u32 = 9;
    /// See [`super::Request::SetWatchdog`].
    pub const SET_WATCHDOG: u32 = 10;
    /// See [`super::Request::ResetStats`].
    pub const RESET_STATS: u32 = 11;
    /// See [`super::Request::Migrate`].
    pub const MIGRATE: u32 = 12;
    /// See [`super::Request::PagingStats`].
    pub const PAGING_STATS: u32 = 13;
    /// See [`super::Request::Observe`].
    pub const OBSERVE: u32 = 14;
    /// See [`super::Request::ProfileFd`].
    pub const PROFILE_FD: u32 = 15;
}

/// Scheduling priority of a queue.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Priority {
    /// Background work.
    Low = 0,
    /// The default.
    #[default]
    Normal = 1,
    /// Latency-sensitive work.
    High = 2,
}

impl Priority {
    /// Decodes a priority word.
    pub fn from_u64(v: u64) -> Option<Self> {
        match v {
            0 => Some(Self::Low),
            1 => Some(Self::Normal),
            2 => Some(Self::High),
            _ => None,
        }
    }
}

/// A request as it travels on the socket.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Pod, Zeroable)]
pub struct RawRequest {
    /// One of [`op`].
    pub op: u32,
    /// Zero.
    pub reserved: u32,
    /// Op-specific arguments; unused ones are zero.
    pub args: [u64; 7],
}

/// A reply as it travels on the socket.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Pod, Zeroable)]
pub struct RawReply {
    /// A [`KmdStatus`] word.
    pub status: u32,
    /// Zero.
    pub reserved: u32,
    /// Op-specific values.
    pub values: [u64; 7],
}

/// Size of every request and reply.
pub const MESSAGE_SIZE: usize = 64;
const _: () = assert!(core::mem::size_of::<RawRequest>() == MESSAGE_SIZE);
const _: () = assert!(core::mem::size_of::<RawReply>() == MESSAGE_SIZE);

/// A decoded request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Opens this connection's context.
    OpenContext {
        /// The client's [`crate::ABI_VERSION`].
        abi_version: u32,
    },
    /// Creates a queue.
    CreateQueue {
        /// Ring size in packets: a power of two in
        /// [`crate::layout::MIN_RING_ENTRIES`]..=[`crate::layout::MAX_RING_ENTRIES`].
        ring_entries: u32,
        /// Scheduling priority.
        priority: Priority,
        /// Engine time slice of its dispatches in microseconds, up to
        /// [`MAX_TIME_SLICE_US`]; 0 for the firmware's default.
        time_slice_us: u32,
        /// Hang detection for its dispatches.
        watchdog: Watchdog,
        /// Per-packet profiling timestamps ([`crate::layout::profile`]): the reply then
        /// carries a fourth fd, the queue's profile object (rw).
        profile: bool,
    },
    /// Destroys a queue; its timeline fence is poisoned for values it never reached.
    DestroyQueue {
        /// The queue's slot.
        slot: u32,
    },
    /// Creates a user fence.
    CreateFence {
        /// Its initial value.
        initial: u64,
    },
    /// Imports a fence exported by another context; two fds attached. A fence the
    /// context already holds (created, or imported before) gets the handle it has, with
    /// one more reference: one handle a fence and context.
    ImportFence,
    /// Drops one reference to this context's handle on a fence (the handle goes with its
    /// last: one from its creation or first import, one from each repeat import).
    ReleaseFence {
        /// The handle to drop.
        handle: FenceHandle,
    },
    /// Allocates a CPU-visible buffer in the context's device address space.
    AllocBuffer {
        /// Size in bytes, 1..=[`MAX_BUFFER_SIZE`].
        size: u64,
        /// 0, or [`crate::paging::ON_DEMAND`]: no device pages until a kernel touches
        /// them (the memfd returned is the host backing).
        flags: u64,
    },
    /// Frees a buffer.
    FreeBuffer {
        /// Its device address.
        va: u64,
    },
    /// Maps a buffer another context allocated (its memfd attached) into this context's
    /// VM. The memory is shared; the allocating context's budget pays for it.
    ImportBuffer,
    /// Changes a queue's hang detection; applies to the dispatch running now too.
    SetWatchdog {
        /// The queue's slot.
        slot: u32,
        /// The new watchdog.
        watchdog: Watchdog,
    },
    /// Asks how resets touched this context (as `GL_ARB_robustness` and
    /// `gem_reset_stats`).
    ResetStats,
    /// Moves a range of an on-demand buffer to host or device memory (see
    /// [`crate::paging::MigrateTo`]); returns once it is there.
    Migrate {
        /// Device address inside an on-demand buffer.
        va: u64,
        /// Bytes from `va` (clipped to the buffer's end; at least 1).
        len: u64,
        /// Where to.
        to: crate::paging::MigrateTo,
    },
    /// Reads half of the device's [`crate::paging::PagingStats`].
    PagingStats {
        /// 0 or 1.
        part: u32,
    },
    /// Asks for the device's read-only observation objects: its status page, telemetry
    /// and event log (what `userq status`, `top`, `events` and `trace` read). Allowed as a
    /// connection's first request: an observer needs no context.
    Observe {
        /// The client's [`crate::ABI_VERSION`].
        abi_version: u32,
    },
    /// A read-only descriptor of a queue's profile object, for tracers (needs no
    /// context, like OBSERVE).
    ProfileFd {
        /// The queue's context.
        ctx: u32,
        /// The queue's slot.
        slot: u32,
    },
}

impl RawReply {
    /// A reply with a status and values.
    pub fn new(status: KmdStatus, values: &[u64]) -> Self {
        let mut r = RawReply::zeroed();
        r.status = status as u32;
        r.values[..values.len()].copy_from_slice(values);
        r
    }

    /// Decodes untrusted bytes from the socket.
    pub fn decode(bytes: &[u8]) -> Result<RawReply, KmdStatus> {
        bytemuck::try_pod_read_unaligned(bytes).map_err(|_| KmdStatus::Malformed)
    }
}
