//! DOC: the shared-futex primitives every wait and wake on shared memory goes through.

use super::signalling::assert_may_wait;
use crate::shm::Word32;
use core::sync::atomic::{AtomicU32, Ordering::*};
use rustix::thread::futex;
use std::time::Duration;

std::thread_local! {
    /// How many of this thread's wakes found a sleeper (see [`wakes_delivered`]).
    static DELIVERED: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Sleeps on a shared futex word while it holds `expected`, for at most `timeout`.
/// Returns early on a wake, a changed word, a signal or a spurious wake-up: callers
/// re-check their condition in a loop. Panics in debug builds inside a
/// [`SignallingSection`](super::SignallingSection).
#[track_caller]
pub fn futex_wait(word: &impl Word32, expected: u32, timeout: Option<Duration>) {
    assert_may_wait();
    let ts = timeout.map(|d| rustix::time::Timespec {
        tv_sec: d.as_secs().min(i64::MAX as u64) as i64,
        tv_nsec: d.subsec_nanos() as _,
    });
    // Errors (EAGAIN: word changed; ETIMEDOUT; EINTR) all mean "go and re-check".
    let _ = futex::wait(word.futex(), futex::Flags::empty(), expected, ts.as_ref());
}

/// Wakes every thread, in any process, sleeping on a shared futex word. Returns how many
/// the kernel woke.
pub fn futex_wake_all(word: &AtomicU32) -> usize {
    let woken = futex::wake(word, futex::Flags::empty(), i32::MAX as u32).unwrap_or(0);
    if woken > 0 {
        DELIVERED.with(|d| d.set(d.get().wrapping_add(1)));
    }
    woken
}

/// How many of this thread's wakes (every wake on shared memory goes through
/// [`futex_wake_all`]) found at least one sleeper, since the thread started. A poller
/// compares two readings to learn whether it just woke somebody: a futex wake carries no
/// "sync" hint (as a pipe write does), so the woken thread is often queued on the waker's
/// own CPU, where it waits for the waker's time slice unless the waker yields (see the
/// firmware's loop).
#[inline]
pub fn wakes_delivered() -> u64 {
    DELIVERED.with(|d| d.get())
}

/// Sleeps until any of `words[i]` differs from `expected[i]` (or a wake, or `timeout`),
/// with one `futex_waitv` (Linux 5.16+). Falls back to waiting on the first word for at
/// most a millisecond where the kernel lacks `futex_waitv`, so callers still poll.
#[track_caller]
pub fn futex_wait_any(words: &[(&dyn Word32, u32)], timeout: Option<Duration>) {
    assert_may_wait();
    const MAX: usize = 128;
    if words.is_empty() {
        return;
    }
    if words.len() == 1 || words.len() > MAX {
        let t = if words.len() == 1 {
            timeout
        } else {
            Some(timeout.map_or(Duration::from_millis(1), |t| {
                t.min(Duration::from_millis(1))
            }))
        };
        return futex_wait(&Dyn(words[0].0), words[0].1, t);
    }
    let mut waits = [futex::Wait::new(); MAX];
    for (w, &(word, expected)) in waits.iter_mut().zip(words) {
        w.val = expected as u64;
        w.uaddr = futex::WaitPtr::new(word.futex().as_ptr().cast());
        w.flags = futex::WaitFlags::SIZE_U32;
    }
    // futex_waitv takes an absolute timeout on the given clock.
    let abs = timeout.map(|d| {
        let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
        let total = now.tv_nsec as u128 + d.as_nanos();
        rustix::time::Timespec {
            tv_sec: now.tv_sec + (total / 1_000_000_000).min(i64::MAX as u128 / 2) as i64,
            tv_nsec: (total % 1_000_000_000) as _,
        }
    });
    let r = if WAITV_BROKEN.load(Relaxed) {
        Err(rustix::io::Errno::NOSYS)
    } else {
        futex::waitv(
            &waits[..words.len()],
            futex::WaitvFlags::empty(),
            abs.as_ref(),
            rustix::time::ClockId::Monotonic,
        )
    };
    match r {
        Ok(_)
        | Err(rustix::io::Errno::AGAIN)
        | Err(rustix::io::Errno::TIMEDOUT)
        | Err(rustix::io::Errno::INTR) => {}
        Err(_) => {
            // No futex_waitv here (old kernel, or a seccomp filter refusing it): wait on
            // the first word in slices of a millisecond, so callers still re-check the rest.
            WAITV_BROKEN.store(true, Relaxed);
            futex_wait(
                &Dyn(words[0].0),
                words[0].1,
                Some(timeout.map_or(Duration::from_millis(1), |t| {
                    t.min(Duration::from_millis(1))
                })),
            );
        }
    }
}

/// A `&dyn Word32` as an `impl Word32`.
struct Dyn<'a>(&'a dyn Word32);

impl crate::shm::sealed::Sealed for Dyn<'_> {}

impl Word32 for Dyn<'_> {
    fn relaxed(&self) -> u32 {
        self.0.relaxed()
    }
    fn futex(&self) -> &AtomicU32 {
        self.0.futex()
    }
}

/// Set once `futex_waitv` failed with an error that means "not available".
static WAITV_BROKEN: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// The state letter of thread `tid` of this process (`S`: sleeping).
    fn thread_state(tid: i32) -> Option<char> {
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
        stat.rsplit_once(") ")?.1.chars().next()
    }

    #[test]
    fn only_a_wake_that_finds_a_sleeper_counts_as_delivered() {
        let word = std::sync::Arc::new(AtomicU32::new(0));
        let before = wakes_delivered();
        assert_eq!(futex_wake_all(&word), 0, "nobody sleeps on the word yet");
        assert_eq!(wakes_delivered(), before, "a wake that found nobody");

        let (tx, rx) = std::sync::mpsc::channel();
        let w = word.clone();
        let sleeper = std::thread::spawn(move || {
            tx.send(rustix::thread::gettid().as_raw_nonzero().get())
                .unwrap();
            while w.load(Acquire) == 0 {
                futex_wait(&*w, 0, Some(Duration::from_secs(10)));
            }
        });
        let tid = rx.recv().unwrap();
        // Bounded: the sleeper is in its futex wait once its state reads `S`.
        let deadline = Instant::now() + Duration::from_secs(10);
        while thread_state(tid) != Some('S') {
            assert!(Instant::now() < deadline, "the sleeper never slept");
            std::thread::sleep(Duration::from_millis(1));
        }
        word.store(1, Release);
        assert_eq!(futex_wake_all(&word), 1, "the sleeper was woken");
        assert_eq!(wakes_delivered(), before + 1);
        sleeper.join().unwrap();
        // Counted per thread: another thread's wakes do not show here.
        let other = std::thread::spawn(wakes_delivered).join().unwrap();
        assert_eq!(other, 0);
    }
}
