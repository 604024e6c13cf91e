//! DOC: the back-off every poller takes: spin, then yield, then sleep.

use std::time::{Duration, Instant};

/// Spin, then yield, then sleep: the back-off every poller uses so that two pollers on a
/// two-core machine do not starve everything else.
#[derive(Debug, Clone)]
pub struct Backoff {
    /// Read at the first step, not at `new`/`reset`: a poller that finds work before its
    /// first step never reads the clock (a read costs as much as a cache-line transfer).
    start: Option<Instant>,
    steps: u32,
    spinning: bool,
    spin_for: Duration,
    yield_for: Duration,
}

/// What a poller should do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackoffStep {
    /// Keep spinning (a `spin_loop` hint was issued).
    Spin,
    /// The thread yielded its time slice.
    Yield,
    /// Spinning and yielding are used up: go to sleep.
    Sleep,
}

impl Backoff {
    /// A back-off that spins for `spin_for`, then yields until `yield_for` has passed
    /// since the start.
    pub fn new(spin_for: Duration, yield_for: Duration) -> Self {
        Backoff {
            start: None,
            steps: 0,
            spinning: true,
            spin_for,
            yield_for,
        }
    }

    /// Time since the first step after the back-off started (or was reset); zero before
    /// it.
    pub fn elapsed(&self) -> Duration {
        self.start.map_or(Duration::ZERO, |s| s.elapsed())
    }

    /// Whether the back-off is still in its spin phase (it has not yielded or said to
    /// sleep since it started or was reset).
    pub fn is_spinning(&self) -> bool {
        self.spinning
    }

    /// When the back-off started, read now if it was not read yet.
    fn started(&mut self) -> Instant {
        *self.start.get_or_insert_with(Instant::now)
    }

    /// Starts over, after the poller found work. Reads no clock.
    pub fn reset(&mut self) {
        self.start = None;
        self.steps = 0;
        self.spinning = true;
    }

    /// One step: spin a little, or yield, or report that it is time to sleep.
    pub fn step(&mut self) -> BackoffStep {
        self.started();
        self.steps = self.steps.wrapping_add(1);
        if self.spinning {
            // Read the clock only every 32 steps (it costs more than a spin), but at once
            // when there is no spin budget at all.
            if !self.spin_for.is_zero()
                && (self.steps % 32 != 0 || self.started().elapsed() < self.spin_for)
            {
                // One pause per step: the caller re-checks its condition between pauses,
                // so a longer spin here would only delay noticing the change.
                core::hint::spin_loop();
                return BackoffStep::Spin;
            }
            self.spinning = false;
        }
        if self.yield_for.is_zero() {
            return BackoffStep::Sleep;
        }
        if self.started().elapsed() < self.yield_for {
            std::thread::yield_now();
            BackoffStep::Yield
        } else {
            BackoffStep::Sleep
        }
    }
}
