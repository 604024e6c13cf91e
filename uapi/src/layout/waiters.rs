//! DOC: where waiters register: the shared [`FenceWaiters`] page of a fence (user-fence
//! host waiters, parked firmware queues) and each context's own [`ContextWaiters`] (its
//! host waiters per fence it holds, read by the firmware). See `crate::sync`'s
//! `register_waiter` for the protocol.

use super::{ObjectHeader, CACHE_LINE, PAGE_SIZE};
use core::sync::atomic::AtomicU32;

/// The shared waiter side of a fence, writable by every holder, on its own object so that
/// a read-only timeline fence still has somewhere for its parked queues to be counted.
#[repr(C, align(4096))]
#[derive(Debug)]
pub struct FenceWaiters {
    /// [`super::magic::FENCE_WAITERS`]; `id` is the global fence id.
    pub header: ObjectHeader,
    /// Holder bits and the parked-queue count.
    pub line: WaiterLine,
}

/// Who waits on a fence, as host signallers see it.
#[repr(C, align(64))]
#[derive(Debug, Default)]
pub struct WaiterLine {
    /// Host threads of every holder of a user fence in the blocking phase of a wait on it:
    /// what a host signaller checks before it makes the futex wake. Each waiter adds itself
    /// here before its own [`ContextWaiters`] count and removes itself after it, so its
    /// own count never exceeds what it added here; when a holder lets go of the fence or
    /// dies, kmd-shim subtracts the holder's own count, so a waiter killed while blocked
    /// costs nothing afterwards. (Timeline waiters are not counted here: only the
    /// firmware signals timelines, and it reads every holder's [`ContextWaiters`] count,
    /// which no other holder can write.)
    pub host: AtomicU32,
    /// Firmware queues parked on this fence by WAIT_FENCE. A host signaller kicks the
    /// firmware only when this is non-zero.
    pub firmware: AtomicU32,
}

/// Waiter counts in a [`ContextWaiters`]: the most fences a context can hold.
pub const WAITER_SLOTS: usize = (4 * PAGE_SIZE - CACHE_LINE) / 4;

/// A context's registrations as host waiter, one count per fence it holds: its own
/// object, writable only by that context (and kmd-shim), read by the firmware when it
/// signals. No other holder of a fence can change whether this context's waiters are
/// woken, and when the context goes its object goes with it.
#[repr(C, align(4096))]
#[derive(Debug)]
pub struct ContextWaiters {
    /// [`super::magic::CONTEXT_WAITERS`]; `id` is the context id.
    pub header: ObjectHeader,
    /// Host threads of this context in the blocking phase of a wait, per fence (by the
    /// [`WaiterSlot::slot`] kmd-shim gave the context's handle on it).
    pub counts: [AtomicU32; WAITER_SLOTS],
}

/// Where a context registers its waiters on one fence it holds: its count in the
/// context's [`ContextWaiters`]. Travels in one reply word.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct WaiterSlot {
    /// Index into [`ContextWaiters::counts`], below [`WAITER_SLOTS`].
    pub slot: u32,
}

impl WaiterSlot {
    /// The reply word.
    pub fn encode(&self) -> u64 {
        self.slot as u64
    }

    /// Decodes an untrusted word; `None` if it is out of range.
    pub fn decode(word: u64) -> Option<WaiterSlot> {
        u32::try_from(word)
            .ok()
            .filter(|&slot| (slot as usize) < WAITER_SLOTS)
            .map(|slot| WaiterSlot { slot })
    }
}
