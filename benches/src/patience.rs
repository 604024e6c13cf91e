//! Waiting for a partner process without waiting for good: the parents of the floors and
//! peers spin or sleep for each answer, and a partner that died would leave them there.

use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::time::{Duration, Instant};
use userq::uapi::sync::futex_wait;

/// How long a parent waits for one answer before it gives up on its partner (a process
/// that died, or never started): an answer takes micro- to milliseconds.
pub const ANSWER_BOUND: Duration = Duration::from_secs(10);

/// Notices, while a parent waits for an answer from its partner process (a floor's, a
/// peer's), that the partner stopped answering, and ends the run with a panic (which kills
/// and reaps the children) instead of waiting for good. Costs the timed loops a counter
/// per spin: the clock is read once every 65 536 spins, or when a futex wait returns
/// without a change.
pub struct Patience {
    spins: u32,
    /// The answer the last look was for, and since when it was awaited.
    awaiting: u64,
    since: Instant,
}

impl Default for Patience {
    fn default() -> Self {
        Self::new()
    }
}

impl Patience {
    /// Nothing awaited yet.
    pub fn new() -> Self {
        Patience {
            spins: 0,
            awaiting: u64::MAX,
            since: Instant::now(),
        }
    }

    /// One spin while waiting for `answer`.
    #[inline(always)]
    pub fn spun(&mut self, answer: u64) {
        self.spins = self.spins.wrapping_add(1);
        if self.spins % (1 << 16) == 0 {
            self.look(answer);
        }
    }

    /// Sleeps on `word` while it holds `seen` (at most a second at a time), waiting for
    /// `answer`.
    pub fn wait(&mut self, word: &AtomicU32, seen: u32, answer: u64) {
        futex_wait(word, seen, Some(Duration::from_secs(1)));
        if word.load(Relaxed) == seen {
            self.look(answer);
        }
    }

    /// Panics once `answer` has been awaited for longer than [`ANSWER_BOUND`].
    #[cold]
    #[inline(never)]
    fn look(&mut self, answer: u64) {
        if self.awaiting != answer {
            self.awaiting = answer;
            self.since = Instant::now();
        } else if self.since.elapsed() > ANSWER_BOUND {
            panic!("a partner process gave no answer in {ANSWER_BOUND:?}");
        }
    }
}
