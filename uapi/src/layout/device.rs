//! DOC: the device-wide pages: [`DeviceStatus`] (the firmware's sleep flag and the
//! device's health, read-only in clients) and [`DeviceKick`] (the firmware's wake word and
//! the summary of rung contexts, written by every client).

use super::ObjectHeader;
use crate::shm::{Access, ReadWrite};
use core::sync::atomic::{AtomicU32, AtomicU64};

/// Device state word.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceState {
    /// Firmware alive.
    Running = 1,
    /// Firmware died or stopped its heartbeat; every object of this generation is lost.
    Lost = 2,
}

/// Per-device status, written by the firmware and kmd-shim, read-only in clients
/// (`DeviceStatus<ReadOnly>`).
#[repr(C, align(4096))]
#[derive(Debug)]
pub struct DeviceStatus<A: Access = ReadWrite> {
    /// [`magic::DEVICE_STATUS`](super::magic::DEVICE_STATUS); `id` is the device generation.
    pub header: ObjectHeader<A>,
    /// The firmware's NEED_WAKEUP flag: set while it is in (or entering) its futex sleep on
    /// [`DeviceKick::kick`]. Read by every submitter after its doorbell; changes only when
    /// the firmware sleeps or wakes.
    pub sleep: SleepFlag<A>,
    /// Written periodically; on its own line so it does not disturb `sleep`.
    pub health: DeviceHealth<A>,
}

/// A sleeper's NEED_WAKEUP flag, alone on its cache line (see [`crate::sync`]).
#[repr(C, align(64))]
#[derive(Debug)]
pub struct SleepFlag<A: Access = ReadWrite> {
    /// While the sleeper is in (or entering) its futex sleep, that sleep's number
    /// (`sleeps`, never 0); 0 while it is awake. A waker that remembers the number it woke
    /// need not wake the same sleep again (see [`crate::sync::ring_doorbell`]).
    pub sleeping: A::U64,
    /// How many sleeps the sleeper has announced (64 bits: never wraps). Written only by
    /// the sleeper.
    pub sleeps: A::U64,
    /// The sleep's futex word as the sleeper read it before announcing `sleeping`: the
    /// sleep lasts only while the word holds this value. Stored before the number.
    pub word_before: A::U32,
}

/// [`DeviceHealth::cp_cpu`] before the firmware has said where it runs.
pub const CPU_UNKNOWN: u32 = u32::MAX;

/// Liveness of the device.
#[repr(C, align(64))]
#[derive(Debug)]
pub struct DeviceHealth<A: Access = ReadWrite> {
    /// A [`DeviceState`].
    pub state: A::U32,
    /// The CPU the firmware's command processor last ran on ([`CPU_UNKNOWN`] until it
    /// says). A hint, stored only when it changes: the firmware looks every few loop turns
    /// and after each wake-up. A host thread on that CPU should not spin for the
    /// firmware's work: its spin holds the CPU the command processor needs to do it.
    pub cp_cpu: A::U32,
    /// Device generation; bumped by kmd-shim each time it (re)starts the firmware.
    pub generation: A::U64,
    /// Incremented by the firmware at least every [`crate::HEARTBEAT_PERIOD_MS`].
    pub heartbeat: A::U64,
    /// How many jobs wait for a page fault's reply from kmd-shim (stored by the firmware
    /// only when the count changes).
    pub faults_in_service: A::U32,
    /// Which contexts have a job waiting for a page fault's reply from kmd-shim: bit
    /// `ctx % 64` (contexts sharing a bit share it; a hint, stored by the firmware only
    /// when it changes). While its context's bit is set, a host thread spinning for that
    /// context's work gives its CPU up between bursts of checks: kmd-shim's event and
    /// pager threads must run for the fault to be serviced, and one woken onto the
    /// spinner's CPU would wait for the scheduler's tick. Other contexts' spinners keep
    /// spinning, so a fault storm does not slow them.
    pub faulting_contexts: A::U64,
}

/// The futex word the firmware sleeps on, and the device-wide summary of rung contexts.
/// Writable by every client: a waker must change the word it wakes, or a wake landing
/// between the firmware's last check and its `futex_wait` is lost. Writing garbage here
/// causes spurious wake-ups or extra looks at doorbell pages, which are harmless; a client
/// that writes the word back to its old value between another's bump and the firmware's
/// `futex_wait` erases that wake, delaying the other's work until its next doorbell or
/// the 100 ms heartbeat (see `sync::ring_doorbell`). One that clears another's summary bit
/// before the firmware takes it hides that doorbell from the summary only: the firmware
/// reads every context's own pending words before it sleeps, after a wake-up that finds
/// no work, and at every tick (10 ms).
#[repr(C, align(4096))]
#[derive(Debug)]
pub struct DeviceKick {
    /// [`magic::DEVICE_KICK`](super::magic::DEVICE_KICK).
    pub header: ObjectHeader,
    /// The wake word.
    pub kick: KickLine,
    /// Which contexts have a pending doorbell bit set (a hint, like every bit here).
    pub contexts: ContextSummary,
}

/// Bits in the [`ContextSummary`]: context `c` uses bit `c % CONTEXT_SUMMARY_BITS`.
pub const CONTEXT_SUMMARY_BITS: usize = 1024;

/// The device-wide second level of the pending-doorbell bitmaps: a client sets its
/// context's bit (`ctx % CONTEXT_SUMMARY_BITS`, release) after setting a queue's bit in its
/// [`PendingSummary`](super::PendingSummary), so the firmware finds rung queues by looking at this summary instead
/// of every context's doorbell page: idle contexts cost it nothing. Contexts whose ids share
/// a bit share it harmlessly (the firmware looks at each of them).
#[repr(C, align(64))]
#[derive(Debug)]
pub struct ContextSummary {
    /// One bit per context bucket.
    pub words: [AtomicU64; CONTEXT_SUMMARY_BITS / 64],
}

/// The firmware's wake word.
#[repr(C, align(64))]
#[derive(Debug, Default)]
pub struct KickLine {
    /// Bumped before each futex wake.
    pub word: AtomicU32,
}
