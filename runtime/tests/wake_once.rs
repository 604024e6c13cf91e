//! A stream of doorbells, or of host signals of a fence a queue is parked on, that finds
//! the firmware asleep wakes it once. The firmware woken onto the submitting thread's CPU
//! cannot clear its sleep flag until it runs; every doorbell or signal in between used to
//! make a futex wake of its own. Alone in its test binary: it pins this process's threads
//! (its tests take turns, so that each finds one command processor).

mod common;

use common::{pin, threads};
use std::time::{Duration, Instant};
use userq::{Command, Device, WaitMode};

const LONG: Duration = Duration::from_secs(20);
/// Submits per stream: well under the ring's entries, so no submit waits for room.
const STREAM: usize = 2000;
const STREAMS: usize = 10;

/// One test at a time: each pins its device's command processor, found by name.
static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// An embedded device whose command processor shares this thread's CPU.
fn pinned_device() -> common::Env {
    let cpu = rustix::thread::sched_getcpu();
    let env = common::Env::new();
    let cp = threads("fw-emu");
    assert_eq!(cp.len(), 1, "one command processor thread: {cp:?}");
    // One CPU for both: the woken firmware waits for this thread to give the CPU up.
    pin(Some(cp[0]), cpu);
    pin(None, cpu);
    env
}

/// Once the firmware sleeps, runs `stream`, which returns the futex wakes it made, and
/// checks that they are at most one per firmware sleep it met (the one it found, and any
/// the firmware announced meanwhile). Returns the wakes and the sleeps.
fn one_wake_per_sleep(dev: &Device, what: &str, stream: impl FnOnce() -> u64) -> (u64, u64) {
    firmware_sleeps_past(dev, dev.firmware_sleeps());
    let s0 = dev.firmware_sleeps();
    let woke = stream();
    let sleeps = 1 + (dev.firmware_sleeps() - s0);
    assert!(
        woke <= sleeps,
        "{woke} futex wakes for {sleeps} firmware sleeps in a stream of {STREAM} {what}"
    );
    (woke, sleeps)
}

/// Waits (bounded) until the firmware announces a sleep after `after`.
fn firmware_sleeps_past(dev: &Device, after: u64) {
    let deadline = Instant::now() + LONG;
    while dev.firmware_sleeps() == after {
        assert!(Instant::now() < deadline, "the idle firmware never slept");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn a_stream_of_doorbells_wakes_a_sleeping_firmware_at_most_once_per_sleep() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let env = pinned_device();
    let dev = env.dev();
    let mut q = dev.queue().ring_entries(4096).create().unwrap();
    q.submit(Command::nop()).unwrap().wait(LONG).unwrap();
    let (mut wakes, mut sleeps) = (0, 0);
    for _ in 0..STREAMS {
        let (woke, met) = one_wake_per_sleep(dev, "doorbells", || {
            let w0 = q.firmware_wakes();
            for _ in 0..STREAM {
                q.enqueue(&[Command::nop()]).unwrap();
            }
            q.firmware_wakes() - w0
        });
        wakes += woke;
        sleeps += met;
        q.finish(LONG).unwrap();
    }
    // The streams did find the firmware asleep: the check above is not vacuous.
    assert!(wakes >= 1, "no stream woke the firmware ({sleeps} sleeps)");
    q.submit(Command::nop())
        .unwrap()
        .wait_with(WaitMode::Block, LONG)
        .unwrap();
}

#[test]
fn a_stream_of_host_signals_wakes_a_sleeping_firmware_at_most_once_per_sleep() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let env = pinned_device();
    let dev = env.dev();
    let mut q = dev.create_queue().unwrap();
    let (mut wakes, mut sleeps) = (0, 0);
    for _ in 0..STREAMS {
        // A queue parked on the fence: every signal below the wait's value finds it
        // parked and wakes the firmware, if it sleeps, to look.
        let f = dev.create_fence(0).unwrap();
        let parked = q
            .submit(Command::wait(&f.point(STREAM as u64 + 1)))
            .unwrap();
        let (woke, met) = one_wake_per_sleep(dev, "signals", || {
            let w0 = dev.firmware_wakes();
            for v in 1..=STREAM as u64 {
                f.signal(v).unwrap();
            }
            dev.firmware_wakes() - w0
        });
        wakes += woke;
        sleeps += met;
        f.signal(STREAM as u64 + 1).unwrap();
        parked.wait(LONG).unwrap();
    }
    assert!(wakes >= 1, "no stream woke the firmware ({sleeps} sleeps)");
}
