//! DOC: a fence in shared memory: its signalled side ([`FenceState`]: the hot
//! [`FenceSlot`] line of value, wake word and poison, then the [`ErrorRecord`], and for a
//! queue's timeline the [`QueueStatus`] word), and the [`FenceKind`] in its header.

use super::ObjectHeader;
use crate::shm::{Access, ReadWrite};

/// Kind of a fence, stored in the `param` of its [`FenceState`] header.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FenceKind {
    /// Created by a client; any holder may signal it from the host or from a queue.
    User = 1,
    /// A queue's timeline: only the firmware signals it; mapped read-only into clients.
    Timeline = 2,
}

impl FenceKind {
    /// Decodes a kind word.
    pub fn from_u32(v: u32) -> Option<Self> {
        match v {
            1 => Some(Self::User),
            2 => Some(Self::Timeline),
            _ => None,
        }
    }
}

/// The signalled side of a fence: value, futex wake word and poison word on one cache line,
/// then the error record.
///
/// Signal protocol ([`crate::sync`]): store `value` (release), then if a host waiter is
/// registered (the firmware reads each holder's [`ContextWaiters`](super::ContextWaiters) count; a host signaller
/// reads the shared count in [`FenceWaiters`](super::FenceWaiters)), bump `wake` and futex-wake it. Poison
/// protocol: write `record`, then `poison` (release), then bump `wake` and wake.
///
/// Clients map a queue's timeline read-only (`FenceState<ReadOnly>`): its words can only be
/// loaded there.
#[repr(C, align(4096))]
#[derive(Debug)]
pub struct FenceState<A: Access = ReadWrite> {
    /// [`magic::FENCE_STATE`](super::magic::FENCE_STATE); `param` is a [`FenceKind`], `id` the global fence id.
    pub header: ObjectHeader<A>,
    /// The hot line.
    pub slot: FenceSlot<A>,
    /// Why the fence was poisoned; valid once `slot.poison` is non-zero.
    pub record: ErrorRecord<A>,
    /// For timeline fences: the owning queue's status.
    pub queue: QueueStatus<A>,
}

/// The hot line of a fence.
#[repr(C, align(64))]
#[derive(Debug)]
pub struct FenceSlot<A: Access = ReadWrite> {
    /// The 64-bit payload. Timeline fences: the number of packets the queue has completed,
    /// `value ≤ read_index` of its ring; it never decreases.
    pub value: A::U64,
    /// 32-bit futex word beside the 64-bit value; bumped before every wake.
    pub wake: A::U32,
    /// Zero while healthy; an [`crate::ErrorCode`] once poisoned. Never cleared.
    pub poison: A::U32,
}

/// What went wrong, written before the word that announces it.
#[repr(C, align(64))]
#[derive(Debug)]
pub struct ErrorRecord<A: Access = ReadWrite> {
    /// An [`crate::ErrorCode`].
    pub code: A::U32,
    /// Code-specific detail (bad opcode, wait condition, …).
    pub detail: A::U32,
    /// Index of the offending packet (its fence value is `packet_index + 1`).
    pub packet_index: A::U64,
    /// Offending address or write index, when there is one.
    pub address: A::U64,
    /// The last value that completed before the error.
    pub last_completed: A::U64,
}

/// State word of a queue, in its timeline fence page.
#[repr(C, align(64))]
#[derive(Debug)]
pub struct QueueStatus<A: Access = ReadWrite> {
    /// A [`QueueState`].
    pub state: A::U32,
}

/// Life cycle of a queue as the firmware sees it.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueState {
    /// Created, not yet seen by the firmware.
    Created = 0,
    /// Mapped and accepting work.
    Active = 1,
    /// Stopped by an error; `FenceState::record` says which.
    Error = 2,
    /// Destroyed (by its owner or because its owner died).
    Destroyed = 3,
}

impl QueueState {
    /// Decodes a state word.
    pub fn from_u32(v: u32) -> Option<Self> {
        match v {
            0 => Some(Self::Created),
            1 => Some(Self::Active),
            2 => Some(Self::Error),
            3 => Some(Self::Destroyed),
            _ => None,
        }
    }
}
