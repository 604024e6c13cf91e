//! DOC: waiting for fence points: the spin, yield and sleep phases of one wait on any number
//! of points, and the waiter registrations of its blocking phase.

use crate::error::WaitError;
use crate::fence::{FenceInner, FencePoint};
use std::time::{Duration, Instant};
use userq_uapi::shm::Word32;
use userq_uapi::sync::{self, Backoff, BackoffStep};

/// How a wait spends the time before the value arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WaitMode {
    /// Spin (with a pause hint) until done or timed out. Lowest latency; burns a core, which
    /// must not be the one the firmware's command processor runs on
    /// ([`crate::Device::firmware_cpu`]): there the spin holds off the completion it waits
    /// for until the scheduler moves one of them (a tick, about 4 ms here). It never
    /// sleeps, so it never hands its placement back to the scheduler's wake-up choice,
    /// which on a busy machine puts a woken thread next to its waker: a spin wait that
    /// slept on the command processor's CPU was woken there again, round trip after round
    /// trip (thousands of 10-70 us round trips in a row, measured). While a job of its
    /// context waits for a page fault's reply ([`crate::Device::context_fault_in_service`]) it
    /// yields once per burst of checks, so that kmd-shim's threads, which the fault needs,
    /// get the CPU.
    Spin,
    /// Sleep on the futex at once. Costs a wake-up (tens of microseconds).
    Block,
    /// Spin briefly (20 us), yield briefly (to 100 us), then sleep; but sleep at once when
    /// every point waits on work that this process's queue submitted while the firmware
    /// slept, so that its doorbell had to wake it ([`crate::Queue::firmware_wakes`]), or
    /// is a queue timeline's value on a device whose sleeping firmware a
    /// [`crate::Fence::signal`] or [`crate::Fence::set`] of this connection woke less than
    /// 100 us ago (for queues parked on that fence): that completion is at least one
    /// wake-up away, and spinning for it would only hold a CPU the firmware may be queued
    /// on. It also sleeps after one burst of 64 checks when it finds itself on the CPU where
    /// the command processor runs, awake ([`crate::Device::firmware_cpu`]): 14 us a round
    /// trip there, against 85-92 us for its whole spin and yield budget.
    #[default]
    Adaptive,
}

/// How long an adaptive wait spins.
const ADAPTIVE_SPIN: Duration = Duration::from_micros(20);

/// Until when (from its start) an adaptive wait yields before it sleeps.
pub(crate) const ADAPTIVE_YIELD_UNTIL: Duration = Duration::from_micros(100);

impl WaitMode {
    /// How long a wait in this mode on `points` spins, and until when it yields, before it
    /// sleeps.
    fn phases(self, points: &[Target<'_>]) -> (Duration, Duration) {
        match self {
            WaitMode::Spin => (Duration::MAX, Duration::MAX),
            WaitMode::Block => (Duration::ZERO, Duration::ZERO),
            WaitMode::Adaptive if points.iter().all(|(f, v)| f.cold(*v)) => {
                (Duration::ZERO, Duration::ZERO)
            }
            WaitMode::Adaptive => (ADAPTIVE_SPIN, ADAPTIVE_YIELD_UNTIL),
        }
    }
}

/// Waits until every point is reached. Fails as soon as one cannot be.
pub fn wait_all(points: &[FencePoint], mode: WaitMode, timeout: Duration) -> Result<(), WaitError> {
    wait_many(&targets(points), true, mode, timeout).map(|_| ())
}

/// Waits until any point is reached and returns its index. Fails as soon as one point can
/// never be reached (its fence was poisoned) while none is reached. An empty set is an
/// immediate timeout.
pub fn wait_any(
    points: &[FencePoint],
    mode: WaitMode,
    timeout: Duration,
) -> Result<usize, WaitError> {
    wait_many(&targets(points), false, mode, timeout)
}

/// A wait target: a fence and the value waited for, borrowed (no reference count).
pub(crate) type Target<'a> = (&'a FenceInner, u64);

fn targets(points: &[FencePoint]) -> Vec<Target<'_>> {
    points.iter().map(FencePoint::target).collect()
}

/// The wait's result if the values alone end it (every point reached: `Ok(0)`; with
/// `!all`, the first reached point's index), as [`decide`] would return it: a spinning
/// wait's check, without the error words `decide` also reads.
#[inline]
fn reached(points: &[Target<'_>], all: bool) -> Option<usize> {
    if all {
        points.iter().all(|(f, v)| f.reached(*v)).then_some(0)
    } else {
        points.iter().position(|(f, v)| f.reached(*v))
    }
}

fn decide(points: &[Target<'_>], all: bool) -> Option<Result<usize, WaitError>> {
    if !all {
        // A reached point wins over another point's error.
        if let Some(i) = points.iter().position(|(f, v)| f.check(*v) == Some(Ok(()))) {
            return Some(Ok(i));
        }
    }
    let mut pending = false;
    for (f, v) in points {
        match f.check(*v) {
            Some(Ok(())) => {}
            Some(Err(e)) => return Some(Err(e)),
            None => pending = true,
        }
    }
    (all && !pending).then_some(Ok(0))
}

/// Undoes the waiter registrations of the blocking phase, however it ends.
pub(crate) struct Registered<'a, 'b>(&'a [Target<'b>]);

impl<'a, 'b> Registered<'a, 'b> {
    pub(crate) fn new(points: &'a [Target<'b>]) -> Self {
        for (f, _) in points {
            f.register();
        }
        Registered(points)
    }
}

impl Drop for Registered<'_, '_> {
    fn drop(&mut self) {
        for (f, _) in self.0 {
            f.unregister();
        }
    }
}

pub(crate) fn wait_many(
    points: &[Target<'_>],
    all: bool,
    mode: WaitMode,
    timeout: Duration,
) -> Result<usize, WaitError> {
    if points.is_empty() {
        return if all { Ok(0) } else { Err(WaitError::Timeout) };
    }
    // Decided already: no clock read at all.
    if let Some(r) = decide(points, all) {
        return r;
    }
    // The deadline is taken at the first clock read, after the first burst of checks: a
    // wait that ends within it (a spin round trip) reads no clock at all.
    let mut deadline: Option<Option<Instant>> = None;
    let mut expired = || {
        let now = Instant::now();
        let d = *deadline.get_or_insert_with(|| now.checked_add(timeout));
        d.is_some_and(|d| now >= d)
    };
    let (spin, yield_until) = mode.phases(points);
    let mut backoff = Backoff::new(spin, yield_until);
    'spinning: loop {
        // A burst of checks with one pause each, like a bare polling loop; the clock (for
        // the timeout and the back-off) only between bursts.
        if !spin.is_zero() {
            // Each check of the burst loads the values alone (as a bare polling loop
            // does), and a reached value ends the wait as `decide` would; poison and
            // device loss are looked at after the burst, a microsecond or two later at
            // most.
            for _ in 0..64 {
                if let Some(i) = reached(points, all) {
                    return Ok(i);
                }
                core::hint::spin_loop();
            }
            if let Some(r) = decide(points, all) {
                return r;
            }
            // Not done within a burst: if this thread shares its CPU with the command
            // processor that must complete a queue timeline it waits for, spinning (or
            // yielding, which under EEVDF need not hand the CPU over) holds off the very
            // work it waits for. An adaptive wait sleeps: the completion's wake is then a
            // local switch. A spin wait does not (see `WaitMode::Spin`).
            if mode == WaitMode::Adaptive && points.iter().any(|(f, _)| f.on_firmware_cpu()) {
                break 'spinning;
            }
            // A page fault in service needs kmd-shim's event and pager threads, and the
            // scheduler may have queued them on this CPU (with the other one busy, or idle
            // but not yet balancing): a spin would hold them off until its tick, 1-4 ms
            // (`perf sched timehist`). Give way once a burst while a fault of this context
            // is in service; with nothing else runnable the yield returns at once. Other
            // contexts' spinners do not: yielding to a fault storm's threads cost an
            // innocent spinner 35 us at p99 in one round of five (`userq-bench compare`, paging).
            // (Past the spin phase the back-off yields once a burst itself.)
            if backoff.is_spinning() && points.iter().any(|(f, _)| f.context_faulting()) {
                std::thread::yield_now();
            }
        } else if let Some(r) = decide(points, all) {
            return r;
        }
        if expired() {
            return Err(WaitError::Timeout);
        }
        loop {
            match backoff.step() {
                BackoffStep::Sleep => break 'spinning,
                BackoffStep::Yield => continue 'spinning,
                BackoffStep::Spin if backoff.elapsed() < spin => continue 'spinning,
                BackoffStep::Spin => {}
            }
        }
    }
    // The deadline was taken by `expired`, unless the first burst found this thread on
    // the firmware's CPU: then it is taken here.
    let deadline = deadline.unwrap_or_else(|| Instant::now().checked_add(timeout));
    let _registered = Registered::new(points);
    let words: Vec<&dyn Word32> = points
        .iter()
        .map(|(f, _)| &f.state().slot.wake as &dyn Word32)
        .collect();
    loop {
        let mut decided = None;
        let mut expired = false;
        sync::sleep_unless(
            &words,
            || {
                decided = decide(points, all);
                decided.is_some()
            },
            // Bounded so that a lost device is noticed even if nobody wakes this waiter.
            || {
                let left = deadline.map_or(Some(Duration::MAX), |d| {
                    d.checked_duration_since(Instant::now())
                        .filter(|l| !l.is_zero())
                });
                expired = left.is_none();
                left.map(|l| l.min(Duration::from_millis(200)))
            },
        );
        if let Some(r) = decided {
            return r;
        }
        if expired {
            return Err(WaitError::Timeout);
        }
        // Woken (most often by the completion itself), or the bounded sleep ran out: the
        // values first, then the connection, whose check is a syscall (a zero-timeout poll
        // of the control socket). In the other order every blocking round trip paid that
        // syscall between its wake and its return: 4.5-5.8 us of a cold round trip's p50
        // here (toggled every round trip, six runs of 1000).
        if let Some(r) = decide(points, all) {
            return r;
        }
        if points.iter().any(|(f, _)| f.device_gone()) {
            return Err(WaitError::DeviceLost);
        }
    }
}

#[cfg(all(test, feature = "embedded"))]
mod tests {
    use super::*;
    use crate::{Command, Device, OpenMode};

    /// Removes the device's directory however the test ends.
    struct Dir(std::path::PathBuf);

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// An embedded device on a socket of its own; bind both, the device second, so it
    /// goes before its directory.
    fn embedded(tag: &str) -> (Dir, Device) {
        let dir = Dir(std::env::temp_dir().join(format!("userq-{tag}-{}", std::process::id())));
        let dev = Device::builder()
            .socket(dir.0.join("dev.sock"))
            .mode(OpenMode::Embedded)
            .open()
            .expect("embedded device");
        (dir, dev)
    }

    #[test]
    fn an_adaptive_wait_sleeps_at_once_only_for_work_that_had_to_wake_the_firmware() {
        let (_dir, dev) = embedded("cold");
        let mut q = dev.create_queue().expect("queue");
        let user = dev.create_fence(0).expect("user fence");
        let zero = (Duration::ZERO, Duration::ZERO);
        let adaptive = (ADAPTIVE_SPIN, ADAPTIVE_YIELD_UNTIL);
        let (mut cold, mut warm) = (None, None);
        // Bounded: each turn leaves the device idle past the firmware's 2 ms before it
        // sleeps, then submits twice: the first usually wakes it, the second (right after
        // the first completed) usually finds it awake. The queue's wake count says which.
        for _ in 0..200 {
            if cold.is_some() && warm.is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
            for _ in 0..2 {
                let wakes = q.firmware_wakes();
                let v = q.enqueue(&[Command::nop()]).expect("submit");
                let point = [(&*q.timeline().inner, v)];
                if q.firmware_wakes() == wakes {
                    // No wake syscall: the firmware was awake, the wait may spin.
                    assert_eq!(WaitMode::Adaptive.phases(&point), adaptive, "value {v}");
                    warm = Some(v);
                } else if WaitMode::Adaptive.phases(&point) == zero {
                    cold = Some(v); // (a wake that found it still re-checking is neither)
                }
                q.timeline()
                    .wait_with(v, WaitMode::Adaptive, Duration::from_secs(10))
                    .expect("the NOP completes");
            }
        }
        let (Some(c), Some(w)) = (cold, warm) else {
            panic!("no cold and warm submit in 200 turns: {cold:?} {warm:?}");
        };
        let tl = &*q.timeline().inner;
        // The mark is a high-water mark: work submitted before a cold submit is cold too
        // (the test's warm submit came after it), work after it is not.
        assert_eq!(WaitMode::Adaptive.phases(&[(tl, c)]), zero);
        assert_eq!(WaitMode::Adaptive.phases(&[(tl, c.max(w) + 1)]), adaptive);
        // Every point must be cold: one warm point (or a user fence, never marked) keeps
        // the spin.
        let u = &*user.inner;
        assert_eq!(WaitMode::Adaptive.phases(&[(tl, c), (u, 1)]), adaptive);
        assert_eq!(
            WaitMode::Adaptive.phases(&[(tl, c), (tl, c.max(w) + 1)]),
            adaptive
        );
        // The other modes never look at the mark.
        assert_eq!(WaitMode::Block.phases(&[(tl, c.max(w) + 1)]), zero);
        assert_eq!(
            WaitMode::Spin.phases(&[(tl, c)]),
            (Duration::MAX, Duration::MAX)
        );
    }

    #[test]
    fn an_adaptive_wait_sleeps_at_once_just_after_a_host_signal_woke_the_firmware() {
        let (_dir, dev) = embedded("sig");
        let mut q = dev.create_queue().expect("queue");
        let gate = dev.create_fence(0).expect("gate");
        let other = dev.create_fence(0).expect("a user fence");
        let zero = (Duration::ZERO, Duration::ZERO);
        let adaptive = (ADAPTIVE_SPIN, ADAPTIVE_YIELD_UNTIL);
        let (mut cold, mut warm) = (false, false);
        // Bounded: a queue parks on the gate, and the device idles before the gate is
        // signalled: past the firmware's 2 ms (it sleeps, and the signal usually has to
        // wake it), or 300 us (past the mark's window; the firmware usually still awake).
        for i in 1..=100u64 {
            if cold && warm {
                break;
            }
            for (k, idle) in [Duration::from_millis(5), Duration::from_micros(300)]
                .into_iter()
                .enumerate()
            {
                let v = 2 * i - 1 + k as u64;
                let p = q
                    .submit_batch(&[Command::wait(&gate.point(v)), Command::nop()])
                    .expect("submit");
                std::thread::sleep(idle);
                let (wakes, mark) = (sync::wakes_delivered(), dev.inner.signal_woke_mark());
                gate.signal(v).expect("signal");
                // The mark moves exactly when this thread's wake found the firmware asleep.
                let woke = sync::wakes_delivered() != wakes;
                assert_eq!(dev.inner.signal_woke_mark() != mark, woke, "value {v}");
                // The window only closes (no other signaller): `before` false means the
                // wait spins, `after` true that it sleeps at once.
                let before = dev.inner.signal_woke_firmware_recently();
                let phases = WaitMode::Adaptive.phases(&[p.target()]);
                let after = dev.inner.signal_woke_firmware_recently();
                if after {
                    assert_eq!(phases, zero, "value {v}");
                }
                if !before {
                    assert_eq!(phases, adaptive, "value {v}");
                }
                // A user fence is never marked: another host thread may signal it.
                assert_eq!(WaitMode::Adaptive.phases(&[(&*other.inner, 1)]), adaptive);
                assert_eq!(
                    WaitMode::Spin.phases(&[p.target()]),
                    (Duration::MAX, Duration::MAX)
                );
                cold |= woke && after;
                warm |= !woke;
                p.wait_with(WaitMode::Adaptive, Duration::from_secs(10))
                    .expect("the gated NOP completes");
            }
        }
        assert!(
            cold && warm,
            "no cold and warm signal in 100 turns: {cold} {warm}"
        );
        // The window is short: 5 ms later the wait spins again.
        std::thread::sleep(Duration::from_millis(5));
        assert!(!dev.inner.signal_woke_firmware_recently());
        assert_eq!(
            WaitMode::Adaptive.phases(&[q.last_submitted().target()]),
            adaptive
        );
    }
}
