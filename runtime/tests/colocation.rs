//! An adaptive wait (the default) for a queue timeline does not spin on the CPU the
//! firmware's command processor runs on: the command processor could not run the work it
//! waits for until the scheduler preempted the spinner. It sleeps there, and spins
//! elsewhere. A spin wait spins even there (the caller chose to burn that core). Alone in
//! its test binary: it pins this process's threads.

mod common;

use common::{pin, threads};
use std::time::{Duration, Instant};
use userq::{Command, Device, WaitMode};

const LONG: Duration = Duration::from_secs(20);
const ROUND_TRIPS: u64 = 50;

/// The calling thread's voluntary context switches: each sleep is one; a spin makes none.
fn voluntary_switches() -> u64 {
    std::fs::read_to_string("/proc/thread-self/status")
        .expect("status")
        .lines()
        .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
        .expect("voluntary_ctxt_switches")
        .trim()
        .parse()
        .expect("a count")
}

/// Runs `n` NOP round trips waiting with `mode`; returns how many times this thread slept.
fn round_trips(q: &mut userq::Queue, mode: WaitMode, n: u64) -> u64 {
    let before = voluntary_switches();
    for _ in 0..n {
        q.submit(Command::nop())
            .unwrap()
            .wait_with(mode, LONG)
            .unwrap();
    }
    voluntary_switches() - before
}

/// Waits (bounded) until the firmware says its command processor runs on `cpu`.
fn firmware_moves_to(dev: &Device, q: &mut userq::Queue, cpu: u32) {
    let deadline = Instant::now() + LONG;
    while dev.firmware_cpu() != Some(cpu) {
        assert!(
            Instant::now() < deadline,
            "firmware_cpu is {:?}, not {cpu}",
            dev.firmware_cpu()
        );
        // Work makes the firmware loop turn (it publishes every few turns).
        q.submit(Command::nop())
            .unwrap()
            .wait_with(WaitMode::Block, LONG)
            .unwrap();
    }
}

/// The CPUs this process may run on.
fn allowed_cpus() -> Vec<usize> {
    let set = rustix::thread::sched_getaffinity(None).expect("affinity");
    (0..rustix::thread::CpuSet::MAX_CPU)
        .filter(|&c| set.is_set(c))
        .collect()
}

#[test]
fn adaptive_waits_sleep_on_the_command_processors_cpu_and_spin_elsewhere() {
    let cpus = allowed_cpus();
    let env = common::Env::new();
    let dev = env.dev();
    let mut q = dev.create_queue().unwrap();
    q.submit(Command::nop()).unwrap().wait(LONG).unwrap();
    let cp = threads("fw-emu");
    assert_eq!(cp.len(), 1, "one command processor thread: {cp:?}");
    pin(Some(cp[0]), cpus[0]);
    firmware_moves_to(dev, &mut q, cpus[0] as u32);

    // Here, on the command processor's CPU: every wait that was not done within its first
    // burst of checks slept (the command processor cannot run while this thread spins).
    pin(None, cpus[0]);
    let slept = round_trips(&mut q, WaitMode::Adaptive, ROUND_TRIPS);
    assert!(
        slept >= ROUND_TRIPS / 2,
        "adaptive waits on the firmware's CPU slept {slept} times in {ROUND_TRIPS} round trips"
    );
    // A spin wait does not sleep, even here: each round trip waits until the scheduler
    // preempts it (a tick), so only a few.
    assert_eq!(
        round_trips(&mut q, WaitMode::Spin, 3),
        0,
        "spin waits never sleep"
    );

    // Elsewhere they spin: the command processor completes the NOP meanwhile.
    if let Some(&other) = cpus.get(1) {
        pin(None, other);
        let slept = round_trips(&mut q, WaitMode::Adaptive, ROUND_TRIPS);
        assert_eq!(dev.firmware_cpu(), Some(cpus[0] as u32), "still pinned");
        assert!(
            slept < ROUND_TRIPS / 2,
            "adaptive waits on another CPU slept {slept} times in {ROUND_TRIPS} round trips"
        );
    }
}
