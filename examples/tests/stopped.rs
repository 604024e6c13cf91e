//! A daemon that stops answering (SIGSTOP): a client's control requests fail with
//! `Timeout` after its control timeout instead of holding the thread for good, the client
//! counts the device as lost, and the daemon, once it runs again, reclaims that context and
//! serves others.

mod common;

use common::*;
use rustix::process::{kill_process, Pid, Signal};
use std::time::{Duration, Instant};
use userq::{Command, ControlError, Device, FenceError, OpenMode};

#[test]
fn a_stopped_daemon_fails_control_requests_with_a_timeout() {
    let daemon = Daemon::start();
    let dev = Device::builder()
        .socket(&daemon.socket)
        .mode(OpenMode::Connect)
        .control_timeout(Duration::from_secs(1))
        .open()
        .expect("open");
    let mut q = dev.create_queue().unwrap();
    q.submit(Command::nop())
        .unwrap()
        .wait(Duration::from_secs(10))
        .unwrap();

    let kmd = Pid::from_raw(daemon.kmd_pid as i32).expect("pid");
    kill_process(kmd, Signal::STOP).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !all_threads_stopped(daemon.kmd_pid) {
        assert!(Instant::now() < deadline, "kmd-shim did not stop");
        std::thread::sleep(Duration::from_millis(5));
    }
    let t = Instant::now();
    let r = dev.create_fence(0);
    let waited = t.elapsed();
    kill_process(kmd, Signal::CONT).unwrap();
    assert!(
        matches!(r, Err(FenceError::Control(ControlError::Timeout(_)))),
        "{r:?}"
    );
    assert!(
        waited < Duration::from_secs(20),
        "answered after {waited:?}"
    );
    // The connection is given up: the device counts as lost here, later calls fail at once.
    assert!(dev.is_lost());
    assert!(matches!(
        dev.create_fence(0),
        Err(FenceError::Control(ControlError::Disconnected))
    ));
    drop(q);
    drop(dev);

    // Running again, the daemon serves a newcomer.
    let other = Device::connect(&daemon.socket).expect("a newcomer opens the device");
    let mut q = other.create_queue().unwrap();
    q.submit(Command::nop())
        .unwrap()
        .wait(Duration::from_secs(10))
        .unwrap();
    drop((q, other));
    daemon.stop();
}
