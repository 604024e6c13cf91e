//! Waiter registrations belong to their holder. Every wake a signaller makes bumps the
//! fence's wake word first, so the word counts the wakes: these tests count them.
//!
//! - Three processes blocked on a user fence and on a queue timeline are SIGKILLed: once
//!   kmd-shim has reclaimed them, a thousand signals of each fence make no wake at all
//!   (before this design, every later signal made one, for the fence's whole life).
//! - A holder that scribbles over the fence's shared waiter page cannot keep another
//!   holder's timeline waiter from being woken: the firmware reads each holder's own count.

mod common;

use common::*;
use rustix::fd::AsFd;
use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixListener;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};
use userq::uapi::layout::{FenceState, FenceWaiters};
use userq::uapi::shm::{ReadOnly, Shm};
use userq::{Command, Device, Fence, WaitMode};

const LONG: Duration = Duration::from_secs(30);

/// A fence's state and waiter pages, mapped from an export of it, to count its wakes.
struct Peek {
    state: Shm<FenceState<ReadOnly>>,
    waiters: Shm<FenceWaiters>,
}

/// Waits for `point` by polling it, never as a registered waiter, whose wake would count
/// (a spin wait never registers either, but that is its wait policy's choice, not this
/// test's).
fn poll_until_reached(point: &userq::FencePoint) {
    let deadline = Instant::now() + LONG;
    while !point.poll().expect("reached, not failed") {
        assert!(Instant::now() < deadline, "never reached");
        // Give way: the firmware may share this CPU, and a poller does not register.
        std::thread::yield_now();
    }
}

impl Peek {
    fn of(f: &Fence) -> Peek {
        let e = f.export().expect("export");
        let (s, w) = e.as_fds();
        Peek {
            state: Shm::map(s).expect("map state"),
            waiters: Shm::map(w).expect("map waiters"),
        }
    }

    fn wakes(&self) -> u32 {
        self.state.slot.wake.load()
    }
}

#[test]
fn waiters_killed_while_blocked_cost_no_wake_afterwards() {
    let daemon = Daemon::start();
    let dev = Device::connect(&daemon.socket).expect("connect");
    let mut q = dev.create_queue().expect("queue");
    let user = dev.create_fence(0).expect("fence");
    let (user_peek, timeline_peek) = (Peek::of(&user), Peek::of(q.timeline()));
    let rv_dir = TempDir::new("waiters");
    let mut blocked = Vec::new();
    for i in 0..3 {
        let rv = rv_dir.path().join(format!("rv{i}.sock"));
        let listener = UnixListener::bind(&rv).expect("bind");
        let mut c = client(&daemon.socket, &["blocked", rv.to_str().expect("utf-8")]);
        let (sock, _) = listener.accept().expect("client connects");
        user.export().unwrap().send(&sock).unwrap();
        q.timeline().export().unwrap().send(&sock).unwrap();
        let out = c.child.as_mut().and_then(|c| c.stdout.take()).unwrap();
        let mut line = String::new();
        BufReader::new(out).read_line(&mut line).expect("read");
        assert_eq!(line.trim(), "ready");
        blocked.push(c);
    }
    // Their threads are in the blocking phase: signals wake them.
    let deadline = Instant::now() + LONG;
    while user_peek.waiters.line.host.load(Relaxed) < 3 {
        assert!(Instant::now() < deadline, "the waiters never registered");
        std::thread::sleep(Duration::from_millis(5));
    }
    let u0 = user_peek.wakes();
    user.signal(1).unwrap();
    assert!(
        user_peek.wakes() > u0,
        "a host signal woke the blocked waiters"
    );
    // The timeline waiters register on their own thread, unseen from here: completions
    // wake them once they have.
    let deadline = Instant::now() + LONG;
    loop {
        let t0 = timeline_peek.wakes();
        poll_until_reached(&q.submit(Command::nop()).unwrap());
        if timeline_peek.wakes() > t0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "completions never woke the blocked timeline waiters"
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    for mut c in blocked {
        c.signal(rustix::process::Signal::KILL);
        c.wait_for(Duration::from_secs(10));
    }
    // kmd-shim reclaims their contexts: the firmware drops their own counts, then their
    // waiters come off the user fence's shared count.
    let deadline = Instant::now() + LONG;
    while user_peek.waiters.line.host.load(Relaxed) != 0 {
        assert!(Instant::now() < deadline, "the dead waiters stayed counted");
        std::thread::sleep(Duration::from_millis(5));
    }
    let (u1, t1) = (user_peek.wakes(), timeline_peek.wakes());
    for v in 2..1002 {
        user.signal(v).unwrap();
    }
    let nops = vec![Command::nop(); 100];
    for _ in 0..10 {
        // Polling: this thread must not register as a waiter itself.
        poll_until_reached(&q.submit_batch(&nops).unwrap());
    }
    assert_eq!(
        user_peek.wakes(),
        u1,
        "host signals still woke dead waiters"
    );
    assert_eq!(
        timeline_peek.wakes(),
        t1,
        "completions still woke dead waiters"
    );
    // A live waiter is still woken.
    let p = user.point(2000);
    let w = std::thread::spawn(move || p.wait_with(WaitMode::Block, LONG));
    std::thread::sleep(Duration::from_millis(100));
    user.signal(2000).unwrap();
    assert_eq!(w.join().unwrap(), Ok(()));
    drop((q, user, dev));
    daemon.stop();
}

#[test]
fn a_holder_scribbling_on_the_shared_page_cannot_stop_a_timeline_wake() {
    let daemon = Daemon::start();
    let owner = Device::connect(&daemon.socket).expect("connect");
    let waiter = Device::connect(&daemon.socket).expect("connect");
    let mut q = owner.create_queue().expect("queue");
    let theirs = waiter
        .import_fence(q.timeline().export().unwrap())
        .expect("import");
    // The hostile holder: a third context with the timeline's descriptors, zeroing the
    // shared waiter page as fast as it can.
    let peek = Peek::of(q.timeline());
    let hostile_fds = q.timeline().export().unwrap();
    let (_, w) = hostile_fds.as_fds();
    let scribbled: Shm<FenceWaiters> = Shm::map(w.as_fd()).expect("map");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let scribbler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(Relaxed) {
                scribbled.line.host.store(0, Relaxed);
                scribbled.line.firmware.store(0, Relaxed);
                std::thread::yield_now(); // hostile, but leaving the others a core
            }
        })
    };
    const TARGET: u64 = 1000;
    let point = theirs.point(TARGET);
    let blocked = std::thread::spawn(move || point.wait_with(WaitMode::Block, LONG));
    // Completions, one at a time, until one wakes the blocked waiter (it registers on its
    // own thread, unseen from here): with the shared page zeroed all along, only the
    // waiter's own count can tell the firmware to wake it.
    let deadline = Instant::now() + LONG;
    let mut done = 0u64;
    loop {
        let before = peek.wakes();
        poll_until_reached(&q.submit(Command::nop()).unwrap());
        done += 1;
        if peek.wakes() > before {
            break;
        }
        assert!(
            Instant::now() < deadline && done < TARGET,
            "the firmware never woke the registered waiter"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let rest: Vec<Command> = (done..TARGET).map(|_| Command::nop()).collect();
    for chunk in rest.chunks(128) {
        q.submit_batch(chunk).unwrap();
    }
    assert_eq!(blocked.join().unwrap(), Ok(()));
    stop.store(true, Relaxed);
    scribbler.join().unwrap();
    drop((q, theirs, owner, waiter));
    daemon.stop();
}
