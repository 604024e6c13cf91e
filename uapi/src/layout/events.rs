//! DOC: the device's event log ([`EventLog`]), as KFD's SMI events: what happened, when,
//! to whom.
//!
//! One object per device (it outlives firmware restarts), written by kmd-shim only,
//! read-only for everyone else. Writers reserve a record with `head.fetch_add`, write it,
//! then publish its sequence number (`index + 1`, release). A reader keeps its own cursor
//! and reads record `i` only if its sequence number is `i + 1` before (acquire) and after
//! reading it; a reader that falls behind by more than the log holds sees the sequence
//! numbers of later laps and counts those records as dropped, explicitly
//! ([`crate::observe::EventReader`]). Event kinds ([`EventKind`]) are append-only ABI: a
//! number, once given, keeps its meaning (KFD once broke its ABI by renumbering).

use super::{ObjectHeader, PaddedU64};
use crate::shm::{Access, ReadWrite};

/// Records the log holds.
pub const EVENT_LOG_ENTRIES: usize = 4096;

/// What an event is. Numbers are ABI and never reused.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// A process opened a context. `a`: pid.
    ProcessStart = 1,
    /// A context closed (its process ended or let go). `a`: pid.
    ProcessEnd = 2,
    /// A queue was created. `a`: priority.
    QueueCreated = 3,
    /// A queue was destroyed.
    QueueDestroyed = 4,
    /// kmd-shim started servicing a fault batch. `a`: faults in it, `b`: batch number.
    FaultBatchStart = 5,
    /// It finished. `a`: pages brought in, `b`: nanoseconds, `c`: pages evicted for it.
    FaultBatchEnd = 6,
    /// Pages moved by MIGRATE. `a`: pages, `b`: 0 to host, 1 to device, `c`: address.
    Migration = 7,
    /// Pages evicted. `a`: pages, `c`: first address.
    Eviction = 8,
    /// An invalidation acknowledged. `a`: pages, `b`: microseconds the pins took to
    /// drain, `c`: first address.
    Invalidation = 9,
    /// A queue's watchdog fired. `a`: error code, `b`: milliseconds, `c`: packet index.
    HangDetected = 10,
    /// A queue was reset. `a`: error code, `c`: packet index.
    QueueReset = 11,
    /// A context was banned.
    ContextBanned = 12,
    /// The firmware was lost. `a`: generation.
    DeviceLost = 13,
    /// A new firmware started. `a`: generation.
    FirmwareRestart = 14,
    /// A queue stopped on an error. `a`: error code, `b`: address, `c`: packet index.
    QueueError = 15,
}

impl EventKind {
    /// From its number (unknown numbers: `None`; a newer writer may add kinds).
    pub fn from_u32(v: u32) -> Option<Self> {
        use EventKind::*;
        Some(match v {
            1 => ProcessStart,
            2 => ProcessEnd,
            3 => QueueCreated,
            4 => QueueDestroyed,
            5 => FaultBatchStart,
            6 => FaultBatchEnd,
            7 => Migration,
            8 => Eviction,
            9 => Invalidation,
            10 => HangDetected,
            11 => QueueReset,
            12 => ContextBanned,
            13 => DeviceLost,
            14 => FirmwareRestart,
            15 => QueueError,
            _ => return None,
        })
    }

    /// A short lowercase name.
    pub fn name(self) -> &'static str {
        use EventKind::*;
        match self {
            ProcessStart => "process-start",
            ProcessEnd => "process-end",
            QueueCreated => "queue-created",
            QueueDestroyed => "queue-destroyed",
            FaultBatchStart => "fault-batch-start",
            FaultBatchEnd => "fault-batch-end",
            Migration => "migration",
            Eviction => "eviction",
            Invalidation => "invalidation",
            HangDetected => "hang-detected",
            QueueReset => "queue-reset",
            ContextBanned => "context-banned",
            DeviceLost => "device-lost",
            FirmwareRestart => "firmware-restart",
            QueueError => "queue-error",
        }
    }
}

/// The log.
#[repr(C, align(4096))]
#[derive(Debug)]
pub struct EventLog<A: Access = ReadWrite> {
    /// [`super::magic::EVENT_LOG`]; `param` is [`EVENT_LOG_ENTRIES`].
    pub header: ObjectHeader<A>,
    /// Records ever reserved (the next index).
    pub head: HeadLine<A>,
    /// Record `i` lives at `records[i % EVENT_LOG_ENTRIES]`.
    pub records: [EventRecord<A>; EVENT_LOG_ENTRIES],
}

/// The log's head, alone on its line.
#[repr(C, align(64))]
#[derive(Debug)]
pub struct HeadLine<A: Access = ReadWrite> {
    /// Records ever reserved.
    pub next: A::U64,
}

/// One event.
#[repr(C, align(64))]
#[derive(Debug)]
pub struct EventRecord<A: Access = ReadWrite> {
    /// `index + 1` once the record is written (0 while it is).
    pub seq: A::U64,
    /// An [`EventKind`].
    pub kind: A::U32,
    /// The context it concerns (0: the device).
    pub ctx: A::U32,
    /// The queue slot (`u32::MAX`: none).
    pub slot: A::U32,
    /// The process of the context (0: unknown).
    pub pid: A::U32,
    /// `CLOCK_MONOTONIC` nanoseconds.
    pub time_ns: A::U64,
    /// Kind-specific values.
    pub a: A::U64,
    /// Kind-specific values.
    pub b: A::U64,
    /// Kind-specific values.
    pub c: A::U64,
}

const _: () = {
    use crate::shm::ReadOnly;
    use core::mem::{offset_of, size_of};
    assert!(size_of::<EventRecord>() == super::CACHE_LINE);
    assert!(offset_of!(EventLog, head) == super::CACHE_LINE);
    assert!(offset_of!(EventLog, records) == 2 * super::CACHE_LINE);
    assert!(size_of::<EventLog<ReadOnly>>() == size_of::<EventLog>());
    assert!(size_of::<PaddedU64>() == super::CACHE_LINE);
};

/// `CLOCK_MONOTONIC` now, in nanoseconds: the time base of every event and telemetry
/// stamp (the same clock in every process).
pub fn monotonic_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// One event to record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewEvent {
    /// What.
    pub kind: EventKind,
    /// The context (0: the device).
    pub ctx: u32,
    /// The queue slot (`u32::MAX`: none).
    pub slot: u32,
    /// The context's process (0: unknown).
    pub pid: u32,
    /// Kind-specific values (see [`EventKind`]).
    pub a: u64,
    /// Kind-specific values.
    pub b: u64,
    /// Kind-specific values.
    pub c: u64,
}

impl EventLog {
    /// Records an event (any number of writer threads): reserve an index, clear the
    /// record's sequence number, write the fields, publish the sequence number (release).
    pub fn record(&self, e: NewEvent) {
        use core::sync::atomic::Ordering::{Relaxed, Release};
        let i = self.head.next.fetch_add(1, Relaxed);
        let r = &self.records[(i % EVENT_LOG_ENTRIES as u64) as usize];
        r.seq.store(0, Relaxed);
        core::sync::atomic::fence(Release);
        r.kind.store(e.kind as u32, Relaxed);
        r.ctx.store(e.ctx, Relaxed);
        r.slot.store(e.slot, Relaxed);
        r.pid.store(e.pid, Relaxed);
        r.time_ns.store(monotonic_ns(), Relaxed);
        r.a.store(e.a, Relaxed);
        r.b.store(e.b, Relaxed);
        r.c.store(e.c, Relaxed);
        r.seq.store(i + 1, Release);
    }
}
