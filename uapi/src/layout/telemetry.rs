//! DOC: device telemetry in shared memory ([`Telemetry`]), in the spirit of DRM fdinfo and
//! amdgpu's/xe's per-queue counters.
//!
//! One object per device generation, created by kmd-shim, mapped writable by the firmware
//! and kmd-shim only, read-only by everyone else (sealed like [`super::DeviceStatus`]).
//! Every line is written by one party and never by a client, and no client writes or
//! polls a line of it, so keeping it costs the submit and complete paths nothing:
//!
//! - the firmware publishes queue and engine lines (and the command processor's inline
//!   work in the device line) from its 10 ms tick (engines count
//!   their busy time in process, per job, and the tick folds it in);
//! - kmd-shim writes the context lines (who opened it, reset statistics) and the two
//!   paging lines (every counter of [`crate::paging::PagingStats`]).
//!
//! Readers take relaxed snapshots: a line may be half updated, and a counter may appear
//! to go backwards between two reads (as DRM fdinfo's `drm-engine-` values may); tools
//! tolerate both.

use super::{ObjectHeader, MAX_QUEUES_PER_CONTEXT};
use crate::shm::{Access, ReadWrite};

/// Context rows in the telemetry table (kmd-shim's default context limit).
pub const TELEMETRY_CONTEXTS: usize = 1024;

/// Engine lines.
pub const TELEMETRY_ENGINES: usize = 64;

/// A queue's state, as [`QueueTelemetry::state`] says it.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QueueRunState {
    /// No packet to run.
    Idle = 1,
    /// Packets to run, or a dispatch on the engines.
    Running = 2,
    /// Parked on a WAIT_FENCE.
    Parked = 3,
    /// Its dispatch waits for kmd-shim to service a page fault.
    PageFault = 4,
    /// Suspended by kmd-shim.
    Suspended = 5,
    /// Stopped on an error (its timeline is poisoned).
    Faulted = 6,
}

impl QueueRunState {
    /// From its word (unknown values: `None`).
    pub fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            1 => Self::Idle,
            2 => Self::Running,
            3 => Self::Parked,
            4 => Self::PageFault,
            5 => Self::Suspended,
            6 => Self::Faulted,
            _ => return None,
        })
    }

    /// A short lowercase name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Running => "running",
            Self::Parked => "parked",
            Self::PageFault => "page-fault",
            Self::Suspended => "suspended",
            Self::Faulted => "faulted",
        }
    }
}

/// The device's telemetry.
#[repr(C, align(4096))]
#[derive(Debug)]
pub struct Telemetry<A: Access = ReadWrite> {
    /// [`super::magic::TELEMETRY`]; `id` is the device generation.
    pub header: ObjectHeader<A>,
    /// Device-wide figures.
    pub device: DeviceTelemetry<A>,
    /// Device paging counters (kmd-shim).
    pub paging: PagingTelemetry<A>,
    /// One line per engine thread (the firmware).
    pub engines: [EngineTelemetry<A>; TELEMETRY_ENGINES],
    /// One line per context row (kmd-shim, and the firmware's engine time).
    pub contexts: [ContextTelemetry<A>; TELEMETRY_CONTEXTS],
    /// Per context row, one line per queue slot (the firmware; `open` and `priority` by
    /// kmd-shim).
    pub queues: [[QueueTelemetry<A>; MAX_QUEUES_PER_CONTEXT]; TELEMETRY_CONTEXTS],
}

/// Device-wide figures.
#[repr(C, align(64))]
#[derive(Debug)]
pub struct DeviceTelemetry<A: Access = ReadWrite> {
    /// Engine threads the device has (engine lines in use).
    pub engines: A::U32,
    /// The firmware's pid (0 in embedded mode: the firmware is a thread of kmd-shim's
    /// process).
    pub firmware_pid: A::U32,
    /// `CLOCK_MONOTONIC` nanoseconds of the firmware's last tick.
    pub tick_ns: A::U64,
    /// Device-memory budget in bytes.
    pub vram_bytes: A::U64,
    /// Nanoseconds the command processor ran workgroups itself: small dispatches instead
    /// of waking an engine, and larger ones' while every engine was parked (the
    /// firmware).
    pub inline_ns: A::U64,
    /// Workgroups it ran so (the firmware).
    pub inline_workgroups: A::U64,
}

/// Paging counters, every one of [`crate::paging::PagingStats`] (kmd-shim, after each
/// operation), in two lines: `parts` in the order of [`crate::paging::PagingStats::parts`]
/// (faults, batches, pages in, pages out, refaults, violations; service ns, copy ns,
/// resident pages, budget pages, peak resident pages, eviction deadlocks).
#[repr(C, align(64))]
#[derive(Debug)]
pub struct PagingTelemetry<A: Access = ReadWrite> {
    /// The two halves of the counters.
    pub parts: [[A::U64; 6]; 2],
}

/// One engine thread.
#[repr(C, align(64))]
#[derive(Debug)]
pub struct EngineTelemetry<A: Access = ReadWrite> {
    /// Nanoseconds it has run workgroups.
    pub busy_ns: A::U64,
    /// Workgroups it finished.
    pub workgroups: A::U64,
}

/// One open context.
#[repr(C, align(64))]
#[derive(Debug)]
pub struct ContextTelemetry<A: Access = ReadWrite> {
    /// The context id, or 0 while the row is free.
    pub ctx: A::U32,
    /// The process that opened it.
    pub pid: A::U32,
    /// Hangs of its queues (guilty).
    pub guilty: A::U32,
    /// Queues stopped by others' hangs or a device loss (innocent).
    pub innocent: A::U32,
    /// 1 once banned.
    pub banned: A::U32,
    /// Reserved.
    pub reserved: A::U32,
    /// Nanoseconds its queues ran on engines, or on the command processor inline (DRM
    /// fdinfo's `drm-engine-compute`).
    pub engine_ns: A::U64,
    /// The process's name (`/proc/<pid>/comm`), NUL-padded.
    pub comm: [A::U64; 2],
}

/// One queue slot of a context.
#[repr(C, align(64))]
#[derive(Debug)]
pub struct QueueTelemetry<A: Access = ReadWrite> {
    /// 1 while a queue has the slot (kmd-shim).
    pub open: A::U32,
    /// Its [`crate::ioctl::Priority`] (kmd-shim).
    pub priority: A::U32,
    /// A [`QueueRunState`] (the firmware).
    pub state: A::U32,
    /// The error code that stopped it (for `Faulted`).
    pub error: A::U32,
    /// Packets published by the client, as the firmware last saw its write index.
    pub submitted: A::U64,
    /// Packets the firmware has taken off the ring.
    pub consumed: A::U64,
    /// The last completed packet (its timeline's value).
    pub completed: A::U64,
    /// Nanoseconds its dispatches ran on engines, or on the command processor inline.
    pub engine_ns: A::U64,
    /// Page faults its dispatches took.
    pub faults: A::U64,
}

/// Size of the telemetry object.
pub const TELEMETRY_SIZE: usize = core::mem::size_of::<Telemetry>();

const _: () = {
    use crate::shm::ReadOnly;
    use core::mem::{offset_of, size_of};
    assert!(offset_of!(Telemetry, header) == 0);
    assert!(offset_of!(Telemetry, device) == super::CACHE_LINE);
    assert!(size_of::<QueueTelemetry>() == super::CACHE_LINE);
    assert!(size_of::<ContextTelemetry>() == super::CACHE_LINE);
    assert!(size_of::<EngineTelemetry>() == super::CACHE_LINE);
    assert!(size_of::<PagingTelemetry>() == 2 * super::CACHE_LINE);
    assert!(offset_of!(Telemetry<ReadOnly>, queues) == offset_of!(Telemetry, queues));
    assert!(offset_of!(Telemetry<ReadOnly>, contexts) == offset_of!(Telemetry, contexts));
    assert!(size_of::<Telemetry<ReadOnly>>() == size_of::<Telemetry>());
    assert!(TELEMETRY_SIZE % super::PAGE_SIZE == 0);
};
