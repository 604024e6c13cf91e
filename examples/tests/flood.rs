//! A hostile client floods the daemon's socket with connections that never send a request;
//! a well-behaved client still opens the device and runs work, and the daemon stays
//! bounded in threads and descriptors (it serves connections from one epoll set with a
//! fixed pool of workers, closes connections that never open a context, and makes room at
//! its bound by closing the oldest such connection). Out of descriptors with every
//! connection holding a context, it still answers newcomers, with `LimitExceeded`.

mod common;

use common::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use userq::{kernels, Device};

/// Raises this process's descriptor limit to its hard limit (the flood needs thousands).
fn raise_nofile() -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut l = getrlimit(Resource::Nofile);
    l.current = l.maximum;
    let _ = setrlimit(Resource::Nofile, l);
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// `Threads:` of a process, from /proc.
fn threads(pid: u32) -> usize {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    s.lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("Threads line")
}

fn descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fd dir")
        .count()
}

#[test]
fn thousands_of_idle_connections_do_not_lock_out_a_new_client() {
    let limit = raise_nofile();
    let idle_count = 3000.min(limit.saturating_sub(200) as usize);
    let daemon = Daemon::start();
    let kmd = daemon.proc.pid();
    let mut idle = Vec::with_capacity(idle_count);
    let t = Instant::now();
    while idle.len() < idle_count {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "connecting took too long"
        );
        idle.push(userq::uapi::socket::connect(&daemon.socket).expect("connect"));
    }
    // The flood goes on while the good client comes.
    let stop = Arc::new(AtomicBool::new(false));
    let flooding = stop.clone();
    let socket = daemon.socket.clone();
    let flood = std::thread::spawn(move || {
        let mut held = Vec::new();
        let mut made = 0usize;
        let deadline = Instant::now() + Duration::from_secs(60);
        while !flooding.load(Ordering::Relaxed) && Instant::now() < deadline {
            if let Ok(s) = userq::uapi::socket::connect(&socket) {
                held.push(s);
                made += 1;
            }
            if held.len() >= 1000 {
                held.drain(..500);
            }
        }
        made
    });
    std::thread::sleep(Duration::from_millis(50));
    let dev = Device::connect(&daemon.socket).expect("a new client opens the device");
    let n = 4096;
    let mut buf = dev.alloc::<f32>(n).unwrap();
    buf.copy_from_slice(&vec![1.5; n]);
    let mut q = dev.create_queue().unwrap();
    q.submit(kernels::scale(n as u32, 2.0, &buf).unwrap())
        .unwrap()
        .wait(Duration::from_secs(30))
        .unwrap();
    assert!(buf.to_vec().iter().all(|&x| x == 3.0));
    stop.store(true, Ordering::Relaxed);
    let made = flood.join().expect("flood thread");
    assert!(made > 0, "the flood made no connection");
    // No thread per connection (main, events, the workers, and room for one or two
    // helpers), and descriptors stay near the connection bound.
    let bound = kmd_shim::ServerLimits::default().workers + 4;
    assert!(
        threads(kmd) <= bound,
        "kmd-shim has {} threads (bound {bound})",
        threads(kmd)
    );
    let fds = descriptors(kmd);
    assert!(
        fds <= kmd_shim::ServerLimits::default().max_connections + 128,
        "kmd-shim holds {fds} descriptors"
    );
    drop((q, buf, dev, idle));
    daemon.stop();
}

/// The lowest descriptor number a process has free: the next one it would be given.
fn lowest_free_descriptor(pid: u32) -> u64 {
    let open: std::collections::HashSet<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fd dir")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    (0..).find(|n| !open.contains(n)).expect("a free number")
}

/// A process's hard descriptor limit (`None`: unlimited), from /proc.
fn hard_descriptor_limit(pid: u32) -> Option<u64> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files line");
    let hard = line.split_whitespace().nth(4).expect("hard limit column");
    hard.parse().ok()
}

/// Sets a process's descriptor limit; returns the one it had.
fn set_descriptor_limit(pid: u32, l: rustix::process::Rlimit) -> rustix::process::Rlimit {
    use rustix::process::{prlimit, Pid, Resource};
    prlimit(
        Some(Pid::from_raw(pid as i32).expect("pid")),
        Resource::Nofile,
        l,
    )
    .expect("prlimit")
}

#[test]
fn a_daemon_out_of_descriptors_answers_newcomers_limit_exceeded() {
    let daemon = Daemon::start();
    let kmd = daemon.kmd_pid;
    // Two clients hold contexts: no connection kmd-shim could close to make room.
    let held: Vec<Device> = (0..2)
        .map(|_| Device::connect(&daemon.socket).expect("connect"))
        .collect();
    let mut queues: Vec<_> = held.iter().map(|d| d.create_queue().unwrap()).collect();
    // Any new descriptor now takes a number at or past the limit: accept fails with EMFILE.
    // (The soft limit only, so that putting it back needs no privilege.) kmd-shim may still
    // be closing a descriptor or two (a reply's, the start-up probe's connection): the
    // limit follows the lowest free number down until it holds still.
    let hard = hard_descriptor_limit(kmd);
    let limit_at = |n| rustix::process::Rlimit {
        current: Some(n),
        maximum: hard,
    };
    let mut n = lowest_free_descriptor(kmd);
    let before = set_descriptor_limit(kmd, limit_at(n));
    let settle = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let now = lowest_free_descriptor(kmd);
        if now == n {
            break;
        }
        assert!(
            settle.elapsed() < Duration::from_secs(10),
            "kmd-shim's descriptors never settled"
        );
        n = now;
        set_descriptor_limit(kmd, limit_at(n));
    }

    // Newcomers hear why instead of waiting in the backlog for good.
    for _ in 0..3 {
        let (tx, rx) = std::sync::mpsc::channel();
        let socket = daemon.socket.clone();
        std::thread::spawn(move || tx.send(Device::connect(&socket).map(drop)));
        let answer = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("an answer within 20 s");
        assert!(
            matches!(
                answer,
                Err(userq::OpenError::Control(userq::ControlError::Rejected(
                    userq::uapi::KmdStatus::LimitExceeded
                )))
            ),
            "{answer:?}"
        );
    }
    // The clients already in keep working.
    for q in &mut queues {
        q.submit(userq::Command::nop())
            .unwrap()
            .wait(Duration::from_secs(10))
            .unwrap();
    }
    // With descriptors again, a newcomer gets in.
    set_descriptor_limit(kmd, before);
    let dev = Device::connect(&daemon.socket).expect("a newcomer opens the device");
    drop((dev, queues, held));
    daemon.stop();
}

#[test]
fn an_embedded_device_leaves_its_application_most_of_its_descriptors() {
    let dir = TempDir::new("embedded-flood");
    let sock = dir.path().join("dev.sock");
    // The application hosting the device may have 256 descriptors: the device serves at
    // most 64 connections.
    let mut host = host_embedded(&sock, Some(256));
    let pid = host.pid();
    let before = descriptors(pid);
    // A flood of connections that never open a context, then a client that does: it is
    // served after every connection before it was taken.
    let idle: Vec<_> = (0..200)
        .map(|_| userq::uapi::socket::connect(&sock).expect("connect"))
        .collect();
    let dev = Device::connect(&sock).expect("a client joins past the flood");
    let mut q = dev.create_queue().unwrap();
    q.submit(userq::Command::nop())
        .unwrap()
        .wait(Duration::from_secs(10))
        .unwrap();
    let grown = descriptors(pid).saturating_sub(before);
    assert!(
        grown <= 64 + 16,
        "the device took {grown} of the application's 256 descriptors"
    );
    drop((q, dev, idle));
    host.signal(rustix::process::Signal::KILL);
    host.wait_for(Duration::from_secs(10));
}
