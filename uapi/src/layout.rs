//! DOC: shared-memory layouts.
//!
//! Every page that crosses a process boundary is described here and nowhere else. Each
//! object is its own memfd, mapped at offset 0, and starts with an [`ObjectHeader`] whose
//! magic and ABI version are checked by every side when it maps the object
//! ([`ObjectHeader::check`]), through the typed handles of [`crate::shm`].
//!
//! Every field is an atomic: the memory is shared with processes that may write it at any
//! time, so it is never read through a plain reference. The layouts clients map read-only
//! take an [`Access`] parameter; in their `ReadOnly` form every field is a load-only
//! [`crate::shm::RoU32`]/[`crate::shm::RoU64`]. Fields written by different
//! parties sit on different cache lines ([`CACHE_LINE`]); the offset assertions at the
//! bottom of this file pin that down at compile time.
//!
//! | object | writers | readers | mapped into the client |
//! |---|---|---|---|
//! | [`DoorbellPage`] (one per context) | client | fw | read-write |
//! | ring ([`RingHeader`] + packets, one per queue) | client (packets), fw (read index) | both | read-write |
//! | [`FenceState`] (one per fence) | fw, kmd; host for user fences | all | read-only for queue timelines |
//! | [`FenceWaiters`] (one per fence) | every holder, fw, kmd | host signallers | read-write |
//! | [`ContextWaiters`] (one per context) | that context, kmd | fw | read-write |
//! | [`DeviceStatus`] (one per device) | fw, kmd | clients | read-only |
//! | [`DeviceKick`] (one per device) | any client, kmd | fw | read-write |
//! | [`ControlRegion`] (kmd ↔ fw only) | kmd, fw | kmd, fw | never |

use crate::shm::{Access, Layout, ReadWrite};
use core::sync::atomic::{AtomicU32, AtomicU64};

mod control;
mod device;
mod events;
mod fence;
pub mod profile;
mod telemetry;
mod waiters;
pub use control::{ControlRegion, MsgRing, CONTROL_REGION_SIZE, CONTROL_RING_ENTRIES};
pub use device::{
    ContextSummary, DeviceHealth, DeviceKick, DeviceState, DeviceStatus, KickLine, SleepFlag,
    CONTEXT_SUMMARY_BITS, CPU_UNKNOWN,
};
pub use events::{
    monotonic_ns, EventKind, EventLog, EventRecord, HeadLine, NewEvent, EVENT_LOG_ENTRIES,
};
pub use fence::{ErrorRecord, FenceKind, FenceSlot, FenceState, QueueState, QueueStatus};
pub use telemetry::{
    ContextTelemetry, DeviceTelemetry, EngineTelemetry, PagingTelemetry, QueueRunState,
    QueueTelemetry, Telemetry, TELEMETRY_CONTEXTS, TELEMETRY_ENGINES, TELEMETRY_SIZE,
};
pub use waiters::{ContextWaiters, FenceWaiters, WaiterLine, WaiterSlot, WAITER_SLOTS};

/// The ABI version. Bumped on any change to a layout, packet or message in this crate.
pub const ABI_VERSION: u32 = 12;

/// Size of a cache line on the machines userq targets. Fields written by different
/// parties are at least this far apart.
pub const CACHE_LINE: usize = 64;

/// Size of a page; every shared object is a whole number of pages.
pub const PAGE_SIZE: usize = 4096;

/// Queues one context can own; also the number of doorbell slots in a [`DoorbellPage`].
pub const MAX_QUEUES_PER_CONTEXT: usize = 256;

/// Smallest ring, in packets.
pub const MIN_RING_ENTRIES: u32 = 2;

/// Largest ring, in packets (4 MiB of packets).
pub const MAX_RING_ENTRIES: u32 = 1 << 16;

/// Byte offset of packet 0 inside a ring object.
pub const RING_PACKETS_OFFSET: usize = 3 * CACHE_LINE;

/// Rounds `bytes` up to a whole number of pages.
pub const fn page_round_up(bytes: usize) -> usize {
    bytes.div_ceil(PAGE_SIZE) * PAGE_SIZE
}

/// Size in bytes of a ring object holding `entries` packets.
pub const fn ring_object_size(entries: u32) -> usize {
    page_round_up(RING_PACKETS_OFFSET + entries as usize * crate::packet::PACKET_SIZE)
}

/// Magic numbers, one per kind of shared object, checked at map time.
pub mod magic {
    /// [`super::DoorbellPage`].
    pub const DOORBELL: u32 = u32::from_be_bytes(*b"UQDB");
    /// A queue ring ([`super::RingHeader`]).
    pub const RING: u32 = u32::from_be_bytes(*b"UQRG");
    /// [`super::FenceState`].
    pub const FENCE_STATE: u32 = u32::from_be_bytes(*b"UQFS");
    /// [`super::FenceWaiters`].
    pub const FENCE_WAITERS: u32 = u32::from_be_bytes(*b"UQFW");
    /// [`super::ContextWaiters`].
    pub const CONTEXT_WAITERS: u32 = u32::from_be_bytes(*b"UQCW");
    /// [`super::DeviceStatus`].
    pub const DEVICE_STATUS: u32 = u32::from_be_bytes(*b"UQDS");
    /// [`super::DeviceKick`].
    pub const DEVICE_KICK: u32 = u32::from_be_bytes(*b"UQDK");
    /// [`super::ControlRegion`].
    pub const CONTROL: u32 = u32::from_be_bytes(*b"UQCT");
    /// [`super::Telemetry`].
    pub const TELEMETRY: u32 = u32::from_be_bytes(*b"UQTM");
    /// [`super::EventLog`].
    pub const EVENT_LOG: u32 = u32::from_be_bytes(*b"UQEV");
    /// A queue's profile object ([`super::profile`]); `param` is the ring's entries.
    pub const PROFILE: u32 = u32::from_be_bytes(*b"UQPF");
}

/// Why an object failed its map-time check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// The object is not the kind the mapper expected.
    #[error("bad magic: expected {expected:#010x}, found {found:#010x}")]
    BadMagic {
        /// The magic the mapper expected.
        expected: u32,
        /// The magic found in the object.
        found: u32,
    },
    /// The object was laid out by a different ABI version.
    #[error("ABI version mismatch: this build speaks {ours}, the object says {theirs}")]
    AbiMismatch {
        /// [`ABI_VERSION`] of this build.
        ours: u32,
        /// Version written in the object.
        theirs: u32,
    },
    /// The object's parameter (a ring's entry count) is not the one expected.
    #[error("object parameter mismatch: expected {expected}, found {found}")]
    BadParam {
        /// The parameter the mapper expected.
        expected: u32,
        /// The parameter found in the object.
        found: u32,
    },
    /// The object is smaller than its layout needs.
    #[error("object too small: {len} bytes, layout needs {needed}")]
    TooSmall {
        /// Size of the mapping.
        len: usize,
        /// Size the layout needs.
        needed: usize,
    },
}

/// First cache line of every shared object. Written once by the creator (kmd-shim) before
/// the object is shared; read by each mapper once, at map time, and never trusted after.
#[repr(C, align(64))]
#[derive(Debug)]
pub struct ObjectHeader<A: Access = ReadWrite> {
    /// One of [`magic`].
    pub magic: A::U32,
    /// [`ABI_VERSION`] of the creator.
    pub abi_version: A::U32,
    /// Object-specific parameter (ring: entry count; fence: [`FenceKind`]).
    pub param: A::U32,
    /// Reserved, zero.
    pub reserved: A::U32,
    /// Object-specific identifier (fence: global fence id; ring: queue slot).
    pub id: A::U64,
}

impl ObjectHeader {
    /// Writes the header. Only the creator calls this, before sharing the object.
    pub fn init(&self, magic: u32, param: u32, id: u64) {
        use core::sync::atomic::Ordering::Relaxed;
        self.magic.store(magic, Relaxed);
        self.abi_version.store(ABI_VERSION, Relaxed);
        self.param.store(param, Relaxed);
        self.reserved.store(0, Relaxed);
        self.id.store(id, Relaxed);
    }

    /// Checks magic and ABI version.
    pub fn check(&self, expected: u32) -> Result<(), HeaderError> {
        use core::sync::atomic::Ordering::Relaxed;
        let found = self.magic.load(Relaxed);
        if found != expected {
            return Err(HeaderError::BadMagic { expected, found });
        }
        let theirs = self.abi_version.load(Relaxed);
        if theirs != ABI_VERSION {
            return Err(HeaderError::AbiMismatch {
                ours: ABI_VERSION,
                theirs,
            });
        }
        Ok(())
    }
}

/// A 64-bit word alone on its cache line.
#[repr(C, align(64))]
#[derive(Debug, Default)]
pub struct PaddedU64 {
    /// The value.
    pub value: AtomicU64,
}

/// Per-context doorbell page: one doorbell per queue slot and a pending summary, so the
/// firmware finds rung queues without scanning every slot.
///
/// Written by the client; the firmware treats every word as a hint to validate.
#[repr(C, align(4096))]
#[derive(Debug)]
pub struct DoorbellPage {
    /// [`magic::DOORBELL`]; `id` is the context id.
    pub header: ObjectHeader,
    /// Bit `q` of word `q / 64` is set (release) by the client after it publishes a new
    /// write index in `doorbells[q]`; the firmware swaps each non-zero word to 0 (acquire).
    pub pending: PendingSummary,
    /// `doorbells[q].value` is queue `q`'s ring write index: the count of packets ever
    /// published through the doorbell, never wrapping (while the firmware polls the queue,
    /// packets are published by their sequence tags alone and it lags). Each on its own line, so queues fed by different threads
    /// do not false-share.
    pub doorbells: [PaddedU64; MAX_QUEUES_PER_CONTEXT],
}

/// Bitmap of rung queue slots.
#[repr(C, align(64))]
#[derive(Debug, Default)]
pub struct PendingSummary {
    /// One bit per queue slot.
    pub words: [AtomicU64; MAX_QUEUES_PER_CONTEXT / 64],
}

/// Size of the doorbell object.
pub const DOORBELL_PAGE_SIZE: usize = page_round_up(core::mem::size_of::<DoorbellPage>());

/// The first three cache lines of a ring object; packets follow at [`RING_PACKETS_OFFSET`].
///
/// The ring's write index is the queue's doorbell ([`DoorbellPage::doorbells`]): the
/// producer's index lives in the producer's page and the consumer's here, on different
/// lines.
#[repr(C, align(64))]
#[derive(Debug)]
pub struct RingHeader {
    /// [`magic::RING`]; `param` is the number of entries (a power of two), `id` the slot.
    pub header: ObjectHeader,
    /// Count of packets the firmware has copied out of the ring, never wrapping. Written
    /// (release) by the firmware after each copy; the producer reads it only when its cached
    /// copy says the ring looks full. The firmware never reads it back. With the queue's
    /// timeline value: `completed ≤ read_index` (and `≤ doorbell` for packets published
    /// through it; polled packets are published by their tags alone); the producer keeps
    /// `wptr − cached_read_index ≤ entries`.
    pub read_index: PaddedU64,
    /// The firmware's "I am polling this queue" flag (the doorbell fast path).
    pub poll: RingPoll,
}

/// Whether the firmware polls a queue's next slot on its own.
///
/// While `polled` is non-zero, a client that registered for `membarrier(2)`
/// `GLOBAL_EXPEDITED` publishes packets by their tagged word 0 alone (a plain release
/// store): no write index, no pending bit, no sleep check. To stop polling, the firmware
/// clears the flag, issues `membarrier(GLOBAL_EXPEDITED)` (a full barrier on every
/// registered client thread), and then looks at the next slot's tag (and the write index)
/// once more; so a packet published against a stale non-zero flag is always seen. Written by the firmware only on transitions, so the line
/// stays in the clients' caches. A client writing it only confuses its own queue.
#[repr(C, align(64))]
#[derive(Debug, Default)]
pub struct RingPoll {
    /// Non-zero while the firmware polls the queue.
    pub polled: AtomicU32,
}

// SAFETY (this and each impl below): repr(C) structs of atomics (RoU32/RoU64 in the
// ReadOnly forms), every bit pattern valid, aligned to at most a page, starting with an
// ObjectHeader (asserted below); WRITABLE is false exactly for the read-only forms.
unsafe impl Layout for DoorbellPage {
    const MAGIC: u32 = magic::DOORBELL;
    const WRITABLE: bool = true;
}
// SAFETY: as above.
unsafe impl<A: Access> Layout for FenceState<A> {
    const MAGIC: u32 = magic::FENCE_STATE;
    const WRITABLE: bool = A::WRITABLE;
}
// SAFETY: as above.
unsafe impl Layout for FenceWaiters {
    const MAGIC: u32 = magic::FENCE_WAITERS;
    const WRITABLE: bool = true;
}
// SAFETY: as above.
unsafe impl Layout for ContextWaiters {
    const MAGIC: u32 = magic::CONTEXT_WAITERS;
    const WRITABLE: bool = true;
}
// SAFETY: as above.
unsafe impl<A: Access> Layout for DeviceStatus<A> {
    const MAGIC: u32 = magic::DEVICE_STATUS;
    const WRITABLE: bool = A::WRITABLE;
}
// SAFETY: as above.
unsafe impl Layout for DeviceKick {
    const MAGIC: u32 = magic::DEVICE_KICK;
    const WRITABLE: bool = true;
}
// SAFETY: as above.
unsafe impl<A: Access> Layout for Telemetry<A> {
    const MAGIC: u32 = magic::TELEMETRY;
    const WRITABLE: bool = A::WRITABLE;
}
// SAFETY: as above.
unsafe impl<A: Access> Layout for EventLog<A> {
    const MAGIC: u32 = magic::EVENT_LOG;
    const WRITABLE: bool = A::WRITABLE;
}
// SAFETY: as above.
unsafe impl Layout for ControlRegion {
    const MAGIC: u32 = magic::CONTROL;
    const WRITABLE: bool = true;
}

// ---- compile-time layout assertions -------------------------------------------------
const _: () = {
    use crate::shm::{ReadOnly, RoU32, RoU64};
    use core::mem::{offset_of, size_of};
    assert!(size_of::<RoU32>() == 4 && size_of::<RoU64>() == 8);
    assert!(offset_of!(FenceState<ReadOnly>, slot) == offset_of!(FenceState, slot));
    assert!(offset_of!(FenceState<ReadOnly>, record) == offset_of!(FenceState, record));
    assert!(offset_of!(FenceState<ReadOnly>, queue) == offset_of!(FenceState, queue));
    assert!(offset_of!(FenceSlot<ReadOnly>, poison) == offset_of!(FenceSlot, poison));
    assert!(
        offset_of!(ErrorRecord<ReadOnly>, last_completed)
            == offset_of!(ErrorRecord, last_completed)
    );
    assert!(offset_of!(DeviceStatus<ReadOnly>, health) == offset_of!(DeviceStatus, health));
    assert!(offset_of!(DeviceHealth<ReadOnly>, heartbeat) == offset_of!(DeviceHealth, heartbeat));
    assert!(
        offset_of!(DeviceHealth<ReadOnly>, faults_in_service)
            == offset_of!(DeviceHealth, faults_in_service)
    );
    assert!(
        offset_of!(DeviceHealth<ReadOnly>, faulting_contexts)
            == offset_of!(DeviceHealth, faulting_contexts)
    );
    assert!(size_of::<DeviceHealth>() == CACHE_LINE);
    assert!(offset_of!(ObjectHeader<ReadOnly>, id) == offset_of!(ObjectHeader, id));
    assert!(offset_of!(ObjectHeader, id) == 16);
    assert!(offset_of!(DoorbellPage, header) == 0 && offset_of!(FenceState, header) == 0);
    assert!(offset_of!(FenceWaiters, header) == 0 && offset_of!(DeviceStatus, header) == 0);
    assert!(offset_of!(DeviceKick, header) == 0 && offset_of!(ControlRegion, header) == 0);
    assert!(offset_of!(RingHeader, header) == 0 && offset_of!(ContextWaiters, header) == 0);
    assert!(offset_of!(Telemetry, header) == 0 && offset_of!(EventLog, header) == 0);
    assert!(
        offset_of!(ControlRegion, kmd_kick) == offset_of!(ControlRegion, kmd_sleep) + CACHE_LINE
    );
    assert!(size_of::<ObjectHeader>() == CACHE_LINE);
    assert!(size_of::<PaddedU64>() == CACHE_LINE);

    assert!(offset_of!(DoorbellPage, pending) == CACHE_LINE);
    assert!(offset_of!(DoorbellPage, doorbells) == 2 * CACHE_LINE);
    assert!(size_of::<PendingSummary>() == CACHE_LINE);
    assert!(size_of::<DoorbellPage>() == 5 * PAGE_SIZE);
    assert!(DOORBELL_PAGE_SIZE == 5 * PAGE_SIZE);

    assert!(offset_of!(RingHeader, read_index) == CACHE_LINE);
    assert!(offset_of!(RingHeader, poll) == 2 * CACHE_LINE);
    assert!(size_of::<RingHeader>() == RING_PACKETS_OFFSET);

    assert!(offset_of!(FenceState, slot) == CACHE_LINE);
    assert!(offset_of!(FenceSlot, value) == 0);
    assert!(offset_of!(FenceSlot, wake) == 8);
    assert!(offset_of!(FenceSlot, poison) == 12);
    assert!(size_of::<FenceSlot>() == CACHE_LINE);
    assert!(offset_of!(FenceState, record) == 2 * CACHE_LINE);
    assert!(size_of::<ErrorRecord>() == CACHE_LINE);
    assert!(offset_of!(FenceState, queue) == 3 * CACHE_LINE);
    assert!(size_of::<FenceState>() == PAGE_SIZE);

    assert!(offset_of!(FenceWaiters, line) == CACHE_LINE);
    assert!(size_of::<FenceWaiters>() == PAGE_SIZE);
    assert!(offset_of!(ContextWaiters, counts) == CACHE_LINE);
    assert!(size_of::<ContextWaiters>() == 4 * PAGE_SIZE);

    assert!(offset_of!(DeviceStatus, sleep) == CACHE_LINE);
    assert!(offset_of!(DeviceStatus, health) == 2 * CACHE_LINE);
    assert!(size_of::<DeviceStatus>() == PAGE_SIZE);
    assert!(size_of::<SleepFlag>() == CACHE_LINE);
    assert!(offset_of!(DeviceKick, kick) == CACHE_LINE);
    assert!(size_of::<DeviceKick>() == PAGE_SIZE);
    assert!(offset_of!(DeviceKick, contexts) == 2 * CACHE_LINE);
    assert!(size_of::<ContextSummary>() == 2 * CACHE_LINE);

    assert!(offset_of!(MsgRing, head) == CACHE_LINE);
    assert!(offset_of!(MsgRing, slots) == 2 * CACHE_LINE);
    assert!(offset_of!(ControlRegion, to_fw) == CACHE_LINE);
    assert!(CONTROL_RING_ENTRIES.is_power_of_two());
};
