//! A client that scribbles on the device's kick word (writable by every client, since a
//! waker must change the word it wakes) and never wakes anyone, or clears the summary of
//! rung contexts beside it: another process's doorbells still reach the firmware. A wake
//! or a summary bit it erases can cost them up to the firmware's 100 ms heartbeat now and
//! then, never a lockout.

mod common;

use common::*;
use std::time::{Duration, Instant};
use userq::{Command, Device, WaitMode};

#[test]
fn a_client_scribbling_on_the_kick_word_does_not_lock_others_out() {
    let daemon = Daemon::start();
    let scribbler = client(&daemon.socket, &["hostile", "kick-scribbler:3000"]);
    let dev = Device::connect(&daemon.socket).expect("connect");
    let mut q = dev.create_queue().expect("queue");
    let (mut worst, mut rounds, mut woke) = (Duration::ZERO, 0, 0);
    let t = Instant::now();
    // Bounded: the scribbler runs 3 s; this side stops after 2.5 s or 200 rounds.
    while t.elapsed() < Duration::from_millis(2500) && rounds < 200 {
        // Idle past the firmware's 2 ms so that it sleeps, then a burst of doorbells: the
        // first wakes it, the others may find the sleep it woke still announced.
        std::thread::sleep(Duration::from_millis(4));
        let wakes = q.firmware_wakes();
        let start = Instant::now();
        let mut last = 0;
        for _ in 0..8 {
            last = q.enqueue(&[Command::nop()]).expect("submit");
        }
        q.timeline()
            .point(last)
            .wait_with(WaitMode::Block, Duration::from_secs(5))
            .expect("the burst completes");
        worst = worst.max(start.elapsed());
        woke += q.firmware_wakes() - wakes;
        rounds += 1;
    }
    eprintln!("{rounds} rounds, {woke} futex wakes, worst round trip {worst:?}");
    let out = scribbler.succeeded(Duration::from_secs(30));
    assert!(out.starts_with("scribbled"), "{out}");
    assert!(rounds >= 10, "only {rounds} rounds");
    assert!(
        woke > 0,
        "no burst found the firmware asleep: nothing was tested"
    );
    // The heartbeat bounds an erased wake at 100 ms; a second would be a lockout.
    assert!(worst < Duration::from_secs(1), "worst round trip {worst:?}");
    assert!(alive(daemon.fw_pid), "fw-emu survives");
    daemon.stop();
}

#[test]
fn a_client_clearing_the_summary_of_rung_contexts_does_not_lock_others_out() {
    let daemon = Daemon::start();
    let eraser = client(&daemon.socket, &["hostile", "summary-eraser:3000"]);
    let dev = Device::connect(&daemon.socket).expect("connect");
    let (mut worst, mut rounds) = (Duration::ZERO, 0);
    let t = Instant::now();
    // Bounded: the eraser runs 3 s; this side stops after 2.5 s or 100 rounds. A fresh
    // queue each round is not polled yet, so its doorbell goes through the summary.
    while t.elapsed() < Duration::from_millis(2500) && rounds < 100 {
        std::thread::sleep(Duration::from_millis(4));
        let mut q = dev.create_queue().expect("queue");
        let start = Instant::now();
        let v = q.enqueue(&[Command::nop()]).expect("submit");
        q.timeline()
            .point(v)
            .wait_with(WaitMode::Block, Duration::from_secs(5))
            .expect("the NOP completes");
        worst = worst.max(start.elapsed());
        rounds += 1;
    }
    eprintln!("{rounds} rounds, worst round trip {worst:?}");
    let out = eraser.succeeded(Duration::from_secs(30));
    assert!(out.starts_with("erased"), "{out}");
    assert!(rounds >= 10, "only {rounds} rounds");
    // The firmware's tick looks at every context's own pending words: an erased summary
    // bit costs at most a heartbeat; a second would be a lockout.
    assert!(worst < Duration::from_secs(1), "worst round trip {worst:?}");
    assert!(alive(daemon.fw_pid), "fw-emu survives");
    daemon.stop();
}
