//! DOC: the wait/wake protocols on shared memory, written once.
//!
//! Every sleeping party (a host thread waiting on fences, a producer waiting for ring
//! room, the async reactor, the firmware idling, kmd's event thread) uses the same
//! announce/re-check/sleep shape, which is the futex form of io_uring's SQPOLL
//! `NEED_WAKEUP` protocol. The sleeper's half after its announcement is [`sleep_unless`]
//! (with a flag, [`announce_and_sleep`], which takes its snapshot of the word before the
//! announcement); the waker's half is [`wake_if_announced`] (for a flag), [`ring_doorbell`]
//! and [`wake_once_if_announced`] (a flag, woken once per sleep) or [`wake_waiters`] (for a
//! fence's waiter counts).
//!
//! ```text
//! sleeper                                   waker
//! announce (store flag / waiters += 1)      publish work (store, release)
//! fence(SeqCst)                             fence(SeqCst)
//! w = word.load()                           if announced:
//! if work visible: return                       word += 1
//! futex_wait(word, w)                           futex_wake(word)
//! ```
//!
//! The two SeqCst fences form a Dekker pair: either the waker sees the announcement, or the
//! sleeper's re-check sees the work. The waker bumps the word before waking, so a wake that
//! lands between the sleeper's re-check and its `futex_wait` makes that wait return at once.
//!
//! Every futex here is *shared* (no `FUTEX_PRIVATE_FLAG`): the words live in memfds mapped
//! by several processes, and only a shared futex is keyed by the backing page, so only it
//! can wake another process.
//!
//! Words the sleeper may only read ([`crate::shm::RoU32`]) are loaded `Relaxed`, with the
//! SeqCst fence doing the ordering: relaxed loads are valid on read-only memory.

use crate::error::ErrorCode;
use crate::layout::{ContextWaiters, FenceState, FenceWaiters, SleepFlag, WaiterSlot};
use crate::shm::{Word32, Word64};
use core::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering::*};
use std::time::Duration;

mod backoff;
mod futex;
mod signalling;
pub use backoff::{Backoff, BackoffStep};
pub use futex::{futex_wait, futex_wait_any, futex_wake_all, wakes_delivered};
use signalling::assert_may_wait;
pub use signalling::{begin_signalling, in_signalling_section, SignallingSection};

/// Sleeper side, after the caller announced itself (set its flag, or registered in a
/// fence's waiter count): a full fence, a snapshot of `words`, then the re-check
/// `work_visible`; only if it saw no work, sleeps on the words for at most `timeout()` (not
/// at all if that is `None`: the caller's deadline has passed). The timeout is computed
/// only when it is needed, so a re-check that finds the work costs no clock read. Returns
/// early on any wake, signal or spurious wake-up: callers re-check in a loop.
#[track_caller]
pub fn sleep_unless(
    words: &[&dyn Word32],
    work_visible: impl FnOnce() -> bool,
    timeout: impl FnOnce() -> Option<Duration>,
) {
    // Even when the re-check would find the work: the annotation flags the attempt, so a
    // test catches it whatever the timing.
    assert_may_wait();
    /// Snapshots of up to this many words live on the stack (no allocation per sleep).
    const INLINE: usize = 8;
    static UNUSED: AtomicU32 = AtomicU32::new(0);
    let mut inline = [(&UNUSED as &dyn Word32, 0u32); INLINE];
    let mut heap = Vec::new();
    fence(SeqCst); // pairs with the waker's fence after it published work
    let seen: &[(&dyn Word32, u32)] = if words.len() <= INLINE {
        for (s, w) in inline.iter_mut().zip(words) {
            *s = (*w, w.relaxed());
        }
        &inline[..words.len()]
    } else {
        heap.extend(words.iter().map(|w| (*w, w.relaxed())));
        &heap
    };
    // Pairs with the waker's release bump of a word: a snapshot that already holds the
    // bump also sees the work published before it, so the re-check cannot miss that work
    // and then sleep past the wake that announced it.
    fence(Acquire);
    if work_visible() {
        return;
    }
    if let Some(t) = timeout() {
        futex_wait_any(seen, Some(t));
    }
}

/// The sleeper's half announced by a [`SleepFlag`] (the firmware's and kmd's
/// NEED_WAKEUP): numbers the sleep (`flag.sleeps`), sets the flag to that number, sleeps
/// on `word` (at most `timeout`) unless `work_visible`, clears the flag. Only the sleeper
/// writes the flag's line.
///
/// Unlike [`sleep_unless`] it takes the word's value *before* the announcement (and
/// publishes it, `flag.word_before`) and sleeps only while the word still holds it. Every
/// waker that saw this sleep's number bumps the word after that load (the number is stored
/// with release after it, and wakers load it, then an acquire fence), so each such bump
/// ends this sleep, whether it lands before the futex wait or wakes it. That is what lets
/// [`ring_doorbell`] skip waking a sleep it already woke. With a snapshot taken after the
/// announcement (as `sleep_unless` takes it), a waker's bump could land before the
/// snapshot, after the re-check's work had been taken by an earlier turn, and the sleep
/// would wait on the bumped value: the loom model of the doorbell finds that lost wake-up.
pub fn announce_and_sleep(
    flag: &SleepFlag,
    word: &AtomicU32,
    work_visible: impl FnOnce() -> bool,
    timeout: Duration,
) {
    assert_may_wait();
    let n = flag.sleeps.load(Relaxed) + 1;
    flag.sleeps.store(n, Relaxed);
    // Acquire: pairs with a waker's release bump, so the work behind a bump this value
    // already holds is visible to the re-check.
    let before = word.load(Acquire);
    flag.word_before.store(before, Relaxed);
    flag.sleeping.store(n, Release);
    fence(SeqCst); // pairs with the waker's fence after it published work
    if !work_visible() {
        futex_wait(word, before, Some(timeout));
    }
    flag.sleeping.store(0, Relaxed);
}

/// Waker side: after publishing work, wakes a sleeper that announced itself with `flag`.
/// Returns how many threads the wake found asleep: 0 when none was announced, when the
/// announced one had not gone to sleep yet or another waker woke it first, or when the
/// wake syscall failed.
#[inline]
pub fn wake_if_announced(flag: &impl Word64, word: &AtomicU32) -> usize {
    fence(SeqCst); // pairs with the sleeper's fence after its announcement
    if flag.relaxed() == 0 {
        return 0;
    }
    // As in `ring_doorbell`: the bump comes after the sleeper's load of the word.
    fence(Acquire);
    word.fetch_add(1, Release);
    futex_wake_all(word)
}

/// Registers this process for `membarrier(GLOBAL_EXPEDITED)`, the client's half of the
/// doorbell fast path ([`crate::layout::RingPoll`]). Returns whether the kernel supports
/// it; without it the client must always take the full doorbell path.
pub fn register_for_firmware_barrier() -> bool {
    use rustix::thread::{membarrier, membarrier_query, MembarrierCommand};
    membarrier_query().contains_command(MembarrierCommand::GlobalExpedited)
        && membarrier(MembarrierCommand::RegisterGlobalExpedited).is_ok()
}

/// The firmware's half of the doorbell fast path: a full memory barrier on every thread of
/// every registered process. Returns `false` if the kernel refused (then no queue may be
/// marked polled).
pub fn barrier_on_registered_clients() -> bool {
    use rustix::thread::{membarrier, MembarrierCommand};
    membarrier(MembarrierCommand::GlobalExpedited).is_ok()
}

/// Whether `membarrier(GLOBAL_EXPEDITED)` is available to the firmware.
pub fn firmware_barrier_available() -> bool {
    use rustix::thread::{membarrier_query, MembarrierCommand};
    membarrier_query().contains_command(MembarrierCommand::GlobalExpedited)
}

/// What [`ring_doorbell`] or [`wake_once_if_announced`] found the firmware doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Doorbell {
    /// Awake: no syscall.
    Awake,
    /// Asleep, and this call woke it: how many threads the wake syscall woke (0 when the
    /// firmware had announced its sleep but not gone to sleep yet: its re-check finds the
    /// work, or its futex wait returns at once on the bumped word).
    Woke(usize),
    /// Still in the sleep that the caller's memory says was woken (by its own earlier
    /// call, or by another thread sharing that memory, whose wake has returned), with the
    /// word still changed: no syscall, the earlier bump ends that sleep (the woken
    /// firmware has not run yet).
    Waking,
}

/// Client side of a doorbell: sets the queue's bit in its context's pending summary, then
/// the context's bit in the device-wide summary, then kicks the firmware if it announced
/// that it sleeps. The queue's bit is set before the context's (release), so a firmware
/// that takes the context's bit (acquire) finds the queue's. The SeqCst fence orders the
/// summary store before the flag load (Dekker with the firmware's flag store + fence +
/// re-check in [`announce_and_sleep`]); the flag is in the read-only device status page, so
/// it is loaded relaxed.
///
/// One wake per sleep: `woken` is the caller's own memory of the sleep number it last
/// woke. A doorbell that finds the firmware still in that sleep makes no syscall: the
/// earlier bump of `kick` ends that sleep ([`announce_and_sleep`] sleeps only on the
/// word's value from before its announcement), and the firmware re-checks for work before
/// it sleeps again, under a new number. That re-check sees this doorbell's bits: the flag
/// load read a value older than the next sleep's number, so this caller's fence precedes
/// that sleep's fence in the SeqCst order (the loom model checks the SeqCst half and the
/// firmware's snapshot; the release/acquire that orders the sleeper's load of the word
/// before the bump is a load-buffering shape, which loom does not explore, and which x86
/// forbids outright). Without it a firmware woken onto a busy submitter's CPU, which
/// cannot clear its flag until it runs, cost every doorbell of that submitter's stream a
/// futex wake (thousands in a millisecond). Sleep numbers are 64-bit, so one is never
/// announced twice.
///
/// The memory is private, but the word is not: any client may write it. A client that
/// writes it back to `word_before` erases a wake that came before the firmware's futex
/// wait, so a doorbell skips only while the word still differs from `word_before`, and
/// wakes again otherwise. What is left is what writing the word allowed before: erase a
/// bump at the right moment and the woken work waits for the next wake or the 100 ms
/// heartbeat; a client that also writes a fresh value afterwards can make this queue's
/// further doorbells in that sleep skip too, within the same bound.
#[inline]
pub fn ring_doorbell(
    pending: (&AtomicU64, u64),
    context: (&AtomicU64, u64),
    flag: (&impl Word64, &impl Word32),
    kick: &AtomicU32,
    woken: &mut u64,
) -> Doorbell {
    pending.0.fetch_or(pending.1, Release);
    context.0.fetch_or(context.1, SeqCst);
    wake_once_if_announced(flag, kick, woken)
}

/// The waker's half with one wake per sleep, after the caller published its work: what
/// [`ring_doorbell`] does once its bits are set (see there), for any waker that keeps a
/// memory `woken` of the sleep it last woke (host signallers of fences that queues are
/// parked on, too). `flag` is the sleeper's (`sleeping`, `word_before`). `woken` is set
/// only after the wake syscall returned, so a memory shared by threads never says a sleep
/// was woken while its wake is still to come.
#[inline]
pub fn wake_once_if_announced(
    (sleeping, word_before): (&impl Word64, &impl Word32),
    kick: &AtomicU32,
    woken: &mut u64,
) -> Doorbell {
    fence(SeqCst); // pairs with the sleeper's fence after its announcement
    let sleep = sleeping.relaxed();
    // Pairs with the sleeper's release store of the number: its load of the word came
    // before, so the bump below comes after it (see `announce_and_sleep`). The status page
    // is read-only here: a relaxed load and a fence.
    fence(Acquire);
    if sleep == 0 {
        *woken = 0;
        return Doorbell::Awake;
    }
    if sleep == *woken && kick.load(Relaxed) != word_before.relaxed() {
        return Doorbell::Waking;
    }
    kick.fetch_add(1, Release);
    let n = futex_wake_all(kick);
    *woken = sleep;
    Doorbell::Woke(n)
}

/// The device-summary word and bit of context `ctx`.
#[inline]
pub fn context_bit(summary: &crate::layout::ContextSummary, ctx: u32) -> (&AtomicU64, u64) {
    let b = ctx as usize % crate::layout::CONTEXT_SUMMARY_BITS;
    (&summary.words[b / 64], 1u64 << (b % 64))
}

/// Signals a fence: stores `value`, then wakes host waiters if any registered. For the
/// firmware's timeline completions (monotonic by construction) and flag-word sets; a
/// signal that must not move the fence backwards uses [`advance_fence`].
///
/// Returns whether firmware queues are parked on the fence; the caller then kicks the
/// firmware (host signallers) or re-checks its parked queues (the firmware itself).
///
/// `host_waiting` says whether a host thread waits: the firmware asks every holder's
/// [`ContextWaiters`] count, a host signaller [`host_waiting`].
#[inline]
pub fn signal_fence(
    state: &FenceState,
    waiters: &FenceWaiters,
    value: u64,
    host_waiting: impl FnOnce() -> bool,
) -> bool {
    state.slot.value.store(value, Release);
    wake_waiters(state, waiters, host_waiting)
}

/// Advances a fence to `value` unless it is above it already (one atomic max, so two
/// signallers racing cannot move it backwards either), then wakes as [`signal_fence`]
/// does. `Err(current)`: the fence is above `value`; nothing changed.
#[inline]
pub fn advance_fence(
    state: &FenceState,
    waiters: &FenceWaiters,
    value: u64,
    host_waiting: impl FnOnce() -> bool,
) -> Result<bool, u64> {
    let before = state.slot.value.fetch_max(value, Release);
    if before > value {
        return Err(before);
    }
    Ok(wake_waiters(state, waiters, host_waiting))
}

/// Poisons a fence: writes the error record, then the poison word, then wakes. A fence is
/// poisoned once; later calls do nothing. Returns as [`signal_fence`] does.
pub fn poison_fence(
    state: &FenceState,
    waiters: &FenceWaiters,
    code: ErrorCode,
    packet_index: u64,
    address: u64,
    detail: u32,
) -> bool {
    if !write_error_record(state, code, packet_index, address, detail) {
        return false;
    }
    publish_poison(state, waiters, code)
}

/// The first half of [`poison_fence`]: claims and writes the error record. Of two
/// poisoners (the firmware and kmd-shim at device stop) only the first writes it, so it is
/// never a mix of both; returns whether this call did. A queue that stops writes its state
/// word between this and [`publish_poison`]: record, then state, then poison, then wake.
pub fn write_error_record(
    state: &FenceState,
    code: ErrorCode,
    packet_index: u64,
    address: u64,
    detail: u32,
) -> bool {
    let r = &state.record;
    if r.code
        .compare_exchange(0, code as u32, Relaxed, Relaxed)
        .is_err()
    {
        return false;
    }
    r.detail.store(detail, Relaxed);
    r.packet_index.store(packet_index, Relaxed);
    r.address.store(address, Relaxed);
    r.last_completed
        .store(state.slot.value.load(Relaxed), Relaxed);
    true
}

/// The second half of [`poison_fence`], after [`write_error_record`] claimed the record:
/// the poison word (release: whoever sees it sees the record), then the wake. Poisons are
/// rare, and a poisoner (kmd-shim at device loss) may not see the waiter counts: it wakes
/// whether or not anyone is registered.
pub fn publish_poison(state: &FenceState, waiters: &FenceWaiters, code: ErrorCode) -> bool {
    state.slot.poison.store(code as u32, Release);
    wake_waiters(state, waiters, || true)
}

/// Wakes a fence's registered host waiters (bumping its wake word first). Signal and
/// poison end with it; on its own it tells waiters to re-check what else they wait for
/// (a producer blocked on a full ring re-reads the read index). Returns whether firmware
/// queues are parked on the fence.
#[inline]
pub fn wake_waiters(
    state: &FenceState,
    waiters: &FenceWaiters,
    host_waiting: impl FnOnce() -> bool,
) -> bool {
    fence(SeqCst); // pairs with the waiter's registration (`register_waiter`) + its fence
    if host_waiting() {
        state.slot.wake.fetch_add(1, Release);
        futex_wake_all(&state.slot.wake);
    }
    waiters.line.firmware.load(Relaxed) != 0
}

/// Whether a host thread waits on a user fence (its shared count): what a host signaller
/// checks. Relaxed: the caller's SeqCst fence orders it.
#[inline]
pub fn host_waiting(waiters: &FenceWaiters) -> bool {
    waiters.line.host.load(Relaxed) != 0
}

/// Registers one host thread of a context as waiting on a fence: for a user fence the
/// shared count first (what host signallers read), then its count in the context's own
/// [`ContextWaiters`] (what the firmware reads). SeqCst, then the waiter's own fence and
/// re-check (see [`sleep_unless`]): either the signaller sees the registration, or the
/// waiter sees the value. The order keeps the context's own count at or below what it
/// added to the shared one, even if the process dies between the two, so kmd-shim can
/// subtract the own count when the holder goes without ever taking a live waiter's share.
pub fn register_waiter(mine: &ContextWaiters, fence: &FenceWaiters, at: WaiterSlot, user: bool) {
    let Some(c) = mine.counts.get(at.slot as usize) else {
        return;
    };
    if user {
        fence.line.host.fetch_add(1, SeqCst);
    }
    c.fetch_add(1, SeqCst);
}

/// Undoes [`register_waiter`], in the opposite order. If kmd-shim already took this
/// waiter off the counts (it closed the connection of a live client, see
/// [`take_holder_waiters`]), the own count is zero and nothing is undone twice; neither
/// count goes below zero.
pub fn unregister_waiter(mine: &ContextWaiters, fence: &FenceWaiters, at: WaiterSlot, user: bool) {
    let Some(c) = mine.counts.get(at.slot as usize) else {
        return;
    };
    if c.fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
        .is_err()
    {
        return;
    }
    if user {
        let _ = fence
            .line
            .host
            .fetch_update(SeqCst, SeqCst, |h| h.checked_sub(1));
    }
}

/// Takes a holder's waiters off a user fence's counts when the holder lets go of it or
/// its connection closes: swaps its own count to zero and subtracts what it held from the
/// shared count (which it never exceeds), never below zero. Returns how many. kmd-shim
/// calls it; a live waiter of that holder that unregisters later finds its own count at
/// zero and subtracts nothing.
pub fn take_holder_waiters(mine: &ContextWaiters, fence: &FenceWaiters, at: WaiterSlot) -> u32 {
    let Some(c) = mine.counts.get(at.slot as usize) else {
        return 0;
    };
    let own = c.swap(0, SeqCst);
    if own > 0 {
        let _ = fence
            .line
            .host
            .fetch_update(SeqCst, SeqCst, |h| Some(h.saturating_sub(own)));
    }
    own
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shm::{Sealing, Shm};

    #[test]
    fn a_departing_holder_takes_only_its_own_waiters_off_the_shared_count() {
        let (_f, fence) = Shm::<FenceWaiters>::create("t-waiters", Sealing::Final, 0, 1).unwrap();
        let (_a, mine) = Shm::<ContextWaiters>::create("t-mine", Sealing::Final, 0, 1).unwrap();
        let (_b, theirs) = Shm::<ContextWaiters>::create("t-theirs", Sealing::Final, 0, 2).unwrap();
        let (at_mine, at_theirs) = (WaiterSlot { slot: 3 }, WaiterSlot { slot: 0 });
        register_waiter(&mine, &fence, at_mine, true);
        register_waiter(&mine, &fence, at_mine, true);
        register_waiter(&theirs, &fence, at_theirs, true);
        assert_eq!(fence.line.host.load(Relaxed), 3);
        assert_eq!(mine.counts[3].load(Relaxed), 2);
        // "mine" goes with two waiters blocked: kmd-shim takes its own count off.
        assert_eq!(take_holder_waiters(&mine, &fence, at_mine), 2);
        assert_eq!(
            fence.line.host.load(Relaxed),
            1,
            "the live waiter stays counted"
        );
        assert!(host_waiting(&fence));
        // Had "mine" still been alive, its waiters' unregistering subtracts nothing more.
        unregister_waiter(&mine, &fence, at_mine, true);
        assert_eq!(fence.line.host.load(Relaxed), 1);
        unregister_waiter(&theirs, &fence, at_theirs, true);
        assert!(!host_waiting(&fence));
        // Never below zero, whatever a holder's own page claims.
        mine.counts[3].store(1000, Relaxed);
        assert_eq!(take_holder_waiters(&mine, &fence, at_mine), 1000);
        assert_eq!(fence.line.host.load(Relaxed), 0);
        unregister_waiter(&theirs, &fence, at_theirs, true);
        assert_eq!(fence.line.host.load(Relaxed), 0);
        // Timeline waiters (user = false) are only in the holder's own count.
        register_waiter(&theirs, &fence, at_theirs, false);
        assert_eq!(fence.line.host.load(Relaxed), 0);
        assert_eq!(theirs.counts[0].load(Relaxed), 1);
        // A slot outside the page is ignored, not a panic.
        register_waiter(&theirs, &fence, WaiterSlot { slot: u32::MAX }, true);
        assert_eq!(fence.line.host.load(Relaxed), 0);
    }

    #[test]
    fn a_waker_wakes_each_sleep_once_unless_the_word_was_put_back() {
        let (sleeping, before, kick) = (AtomicU64::new(0), AtomicU32::new(40), AtomicU32::new(40));
        let ring = |woken: &mut u64| wake_once_if_announced((&sleeping, &before), &kick, woken);
        let mut woken = 7;
        // Awake: no wake, and the memory is forgotten.
        assert_eq!(ring(&mut woken), Doorbell::Awake);
        assert_eq!((woken, kick.load(Relaxed)), (0, 40));
        // Sleep 5: the first wakes it (nobody sleeps on the word here: 0 woken)...
        sleeping.store(5, Relaxed);
        assert_eq!(ring(&mut woken), Doorbell::Woke(0));
        assert_eq!((woken, kick.load(Relaxed)), (5, 41));
        // ...the next finds the word still moved and makes no syscall.
        assert_eq!(ring(&mut woken), Doorbell::Waking);
        assert_eq!(kick.load(Relaxed), 41);
        // Another client put the word back (erasing the bump): wake again.
        kick.store(40, Relaxed);
        assert_eq!(ring(&mut woken), Doorbell::Woke(0));
        assert_eq!(kick.load(Relaxed), 41);
        // A later sleep is woken, whatever the word says.
        sleeping.store(6, Relaxed);
        before.store(41, Relaxed);
        kick.store(99, Relaxed);
        assert_eq!(ring(&mut woken), Doorbell::Woke(0));
        assert_eq!((woken, kick.load(Relaxed)), (6, 100));
    }
}
