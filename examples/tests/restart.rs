//! A lost firmware (killed under load, or frozen with SIGSTOP) turns every waiter into
//! DeviceLost and is restarted by kmd-shim under a new device generation: new contexts
//! run work, old ones stay lost, restarts are bounded. Real kmd-shim and fw-emu processes.

mod common;

use common::*;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use userq::{kernels, Device, SubmitError, WaitError};

const LONG: Duration = Duration::from_secs(30);

/// The running firmware of a daemon other than `old`, waiting up to 10 s for it.
fn new_firmware(daemon: &Daemon, old: u32) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(&fw) = children_of(daemon.proc.pid())
            .iter()
            .find(|&&p| p != old && alive(p))
        {
            return fw;
        }
        assert!(Instant::now() < deadline, "no new fw-emu within 10 s");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A context on the restarted device, retrying while the device is still lost.
fn reconnect(daemon: &Daemon) -> Device {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Device::connect(&daemon.socket) {
            Ok(d) => return d,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "device not back within 10 s: {e}"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// A small dispatch, checked.
fn small_dispatch(dev: &Device) {
    let n = 4096;
    let mut buf = dev.alloc::<f32>(n).unwrap();
    let input: Vec<f32> = (0..n).map(|i| i as f32).collect();
    buf.copy_from_slice(&input);
    let mut q = dev.create_queue().unwrap();
    q.submit(kernels::scale(n as u32, 3.0, &buf).unwrap())
        .unwrap()
        .wait(LONG)
        .unwrap();
    assert_eq!(
        buf.to_vec(),
        input.iter().map(|x| 3.0 * x).collect::<Vec<_>>()
    );
}

/// Four threads blocked without a timeout on fences of `dev`, each returning what its wait
/// ended with and when.
fn blocked_waiters(dev: &Device) -> Vec<std::thread::JoinHandle<(Result<(), WaitError>, Instant)>> {
    (0..4)
        .map(|_| {
            let f = dev.create_fence(0).unwrap();
            std::thread::spawn(move || {
                let r = f.wait(1, Duration::MAX);
                (r, Instant::now())
            })
        })
        .collect()
}

#[test]
fn a_firmware_killed_under_load_is_restarted_and_new_contexts_run() {
    let daemon = Daemon::start();
    let old = Device::connect(&daemon.socket).unwrap();
    assert_eq!(old.generation(), 1);
    let mut q = old.create_queue().unwrap();
    // Load: a long dispatch on the engines and a stream of packets.
    let busy = q.submit(kernels::spin(200, 5_000_000).unwrap()).unwrap();
    for _ in 0..100 {
        q.submit(userq::Command::nop()).unwrap();
    }
    let waiters = blocked_waiters(&old);
    std::thread::sleep(Duration::from_millis(100));
    let killed = Instant::now();
    let _ = rustix::process::kill_process(
        rustix::process::Pid::from_raw(daemon.fw_pid as i32).unwrap(),
        rustix::process::Signal::KILL,
    );
    for w in waiters {
        let (r, at) = w.join().unwrap();
        assert_eq!(r, Err(WaitError::DeviceLost));
        assert!(at.duration_since(killed) < Duration::from_secs(5));
    }
    assert_eq!(busy.wait(LONG), Err(WaitError::DeviceLost));
    assert!(old.is_lost());
    assert_eq!(
        q.submit(userq::Command::nop()).err(),
        Some(SubmitError::DeviceLost)
    );
    // The firmware comes back under a new generation; the old context stays lost.
    let fw = new_firmware(&daemon, daemon.fw_pid);
    let fresh = reconnect(&daemon);
    assert_eq!(fresh.generation(), 2);
    small_dispatch(&fresh);
    assert!(old.create_queue().is_err(), "an old context stays lost");
    assert!(old.is_lost());
    // It can still learn what happened to it: the loss counts as an innocent reset.
    let stats = old.reset_stats().expect("reset stats of a lost context");
    assert_eq!((stats.guilty, stats.innocent), (0, 1));
    assert_eq!(
        fresh.reset_stats().unwrap().status(),
        userq::ResetStatus::Unaffected
    );
    drop((q, old, fresh));
    assert!(alive(fw));
    daemon.stop();
    assert!(!alive(fw), "the restarted fw-emu outlived kmd-shim");
}

#[test]
fn a_frozen_firmware_is_detected_by_its_heartbeat_and_replaced() {
    let daemon = Daemon::start();
    let dev = Device::connect(&daemon.socket).unwrap();
    let waiters = blocked_waiters(&dev);
    std::thread::sleep(Duration::from_millis(50));
    let frozen = Instant::now();
    let _ = rustix::process::kill_process(
        rustix::process::Pid::from_raw(daemon.fw_pid as i32).unwrap(),
        rustix::process::Signal::STOP,
    );
    let mut last = frozen;
    for w in waiters {
        let (r, at) = w.join().unwrap();
        assert_eq!(r, Err(WaitError::DeviceLost));
        last = last.max(at);
    }
    // The heartbeat timeout is 2 s; the bound leaves room for a loaded machine.
    assert!(
        last.duration_since(frozen) < Duration::from_secs(10),
        "waiters returned {:?} after the freeze",
        last.duration_since(frozen)
    );
    let fresh = reconnect(&daemon);
    assert_eq!(fresh.generation(), 2);
    small_dispatch(&fresh);
    // The frozen process was killed, not left behind.
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive(daemon.fw_pid) {
        assert!(
            Instant::now() < deadline,
            "the frozen fw-emu was left running"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    drop((dev, fresh));
    daemon.stop();
}

#[test]
fn a_firmware_that_keeps_dying_is_not_restarted_past_the_policy() {
    let dir = TempDir::new("restarts");
    let socket = dir.path().join("dev.sock");
    let mut kmd = Proc::spawn(
        "kmd-shim",
        Command::new(workspace_bin("kmd-shim"))
            .arg("--socket")
            .arg(&socket)
            .args(["--quiet", "--max-restarts", "1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let kmd_pid = kmd.pid();
    let firmware = |old: Option<u32>| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(&p) = children_of(kmd_pid)
                .iter()
                .find(|&&p| Some(p) != old && alive(p))
            {
                return p;
            }
            assert!(Instant::now() < deadline, "no fw-emu within 10 s");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    let kill = |pid: u32| {
        let _ = rustix::process::kill_process(
            rustix::process::Pid::from_raw(pid as i32).unwrap(),
            rustix::process::Signal::KILL,
        );
    };
    // Up and serving first (a firmware that dies while booting fails the start instead).
    let deadline = Instant::now() + Duration::from_secs(10);
    while Device::connect(&socket).is_err() {
        assert!(
            Instant::now() < deadline,
            "kmd-shim did not come up within 10 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let first = firmware(None);
    kill(first);
    let second = firmware(Some(first));
    kill(second);
    // No third firmware: the device stays lost, and says so to new clients.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(children_of(kmd_pid).iter().all(|&p| !alive(p)));
    assert!(Device::connect(&socket).is_err());
    assert!(alive(kmd_pid), "kmd-shim itself keeps serving");
    kmd.signal(rustix::process::Signal::TERM);
    assert!(kmd.wait_for(Duration::from_secs(10)).success());
    assert!(!socket.exists());
}
