//! Hangs and resets (modelled on IGT xe_exec_reset, gem_reset_stats and xe_waitfence): a
//! hung queue is reset and only it; its waiters get the error with the last value that
//! completed; fences it would have signalled fail; a context that keeps hanging is banned;
//! an engine a runaway workgroup holds is replaced. Every wait here is bounded, or
//! unbounded on purpose where the test is that it returns; bounds are generous.

mod common;
use common::Env;
use std::time::{Duration, Instant};
use userq::{
    kernels, AllocError, Command, Device, ErrorCode, FenceError, QueueCreateError, ResetStatus,
    SubmitError, WaitCondition, WaitError, Watchdog, WatchdogError,
};

const LONG: Duration = Duration::from_secs(30);

/// The fault a failed wait reports, or a panic saying what happened instead.
fn fault_of(r: Result<(), WaitError>) -> userq::FenceFault {
    match r {
        Err(WaitError::Faulted(f)) => f,
        other => panic!("expected a poisoned fence, got {other:?}"),
    }
}

/// A small dispatch on `dev`, checked: `n` floats scaled by 2.
/// A dispatch for the engines (4096 items: more than the command processor runs itself;
/// it may run some of it while every engine is parked, never while one is held).
fn small_dispatch(dev: &Device, q: &mut userq::Queue, seed: f32) {
    let n = 4096;
    let mut buf = dev.alloc::<f32>(n).unwrap();
    let input: Vec<f32> = (0..n).map(|i| seed + i as f32).collect();
    buf.copy_from_slice(&input);
    q.submit(kernels::scale(n as u32, 2.0, &buf).unwrap())
        .unwrap()
        .wait(LONG)
        .unwrap();
    let want: Vec<f32> = input.iter().map(|x| 2.0 * x).collect();
    assert_eq!(buf.to_vec(), want, "context with seed {seed}");
}

#[test]
fn hang_one_of_32_contexts_only_that_one_is_guilty() {
    let env = Env::new();
    let mut devs: Vec<Device> = (0..31).map(|_| env.second()).collect();
    const GUILTY: usize = 7;
    let mut guilty_q = devs[GUILTY]
        .queue()
        .job_timeout(Duration::from_millis(200))
        .create()
        .unwrap();
    let hung = guilty_q.submit(kernels::no_progress()).unwrap();
    // Every other context keeps working meanwhile, behind and beside the hung dispatch.
    devs.push(Device::connect(env.dev().socket_path()).unwrap());
    let mut work = Vec::new();
    for (i, dev) in devs.iter().enumerate().filter(|(i, _)| *i != GUILTY) {
        let n = 4096usize; // engine work (the guilty one holds an engine: no help)
        let mut buf = dev.alloc::<f32>(n).unwrap();
        buf.copy_from_slice(&vec![i as f32; n]);
        let mut q = dev.create_queue().unwrap();
        let mut last = None;
        for _ in 0..4 {
            last = Some(
                q.submit(kernels::scale(n as u32, 2.0, &buf).unwrap())
                    .unwrap(),
            );
        }
        work.push((i, q, buf, last.unwrap()));
    }
    // No timeout: the reset must end this wait.
    let f = fault_of(hung.wait(Duration::MAX));
    assert_eq!(f.code, Some(ErrorCode::JobTimeout));
    for (i, _q, buf, last) in &work {
        last.wait(LONG).unwrap();
        assert!(
            buf.to_vec().iter().all(|&x| x == 16.0 * *i as f32),
            "context {i} lost work"
        );
    }
    for (i, dev) in devs.iter().enumerate() {
        let stats = dev.reset_stats().unwrap();
        if i == GUILTY {
            assert_eq!(stats.guilty, 1);
            assert_eq!(stats.status(), ResetStatus::Guilty);
            assert!(!stats.banned);
        } else {
            assert_eq!(stats.status(), ResetStatus::Unaffected, "context {i}");
        }
    }
    drop(work);
    drop(guilty_q);
}

#[test]
fn a_wait_without_timeout_on_a_reset_queue_returns_the_error_and_the_last_value() {
    let env = Env::new();
    let dev = env.dev();
    let other = env.second();
    let flag = dev.create_fence(0).unwrap();
    let flag_there = other.import_fence(flag.export().unwrap()).unwrap();
    let out = dev.alloc::<u64>(2).unwrap();
    let mut q = dev
        .queue()
        .job_timeout(Duration::from_millis(100))
        .create()
        .unwrap();
    // Another context's queue waits for the fence the hung queue would signal.
    let theirs = other.alloc::<u64>(1).unwrap();
    let mut waiter = other.create_queue().unwrap();
    let after_wait = waiter
        .submit_batch(&[
            Command::wait_fence(&flag_there, 1, WaitCondition::GreaterOrEqual, u64::MAX),
            Command::write_value(theirs.address_of(0).unwrap(), 9),
        ])
        .unwrap();
    q.submit(Command::write_value(out.address_of(0).unwrap(), 1))
        .unwrap();
    let hung = q.submit(kernels::no_progress()).unwrap();
    let after = q
        .submit_batch(&[
            Command::signal(&flag, 1),
            Command::write_value(out.address_of(1).unwrap(), 2),
        ])
        .unwrap();
    let t = Instant::now();
    let f = fault_of(after.wait(Duration::MAX));
    assert!(t.elapsed() < LONG);
    assert_eq!(f.code, Some(ErrorCode::JobTimeout));
    assert_eq!(f.packet_index, 1, "the record names the hung DISPATCH");
    assert_eq!(f.last_completed, 1, "the write before it completed");
    assert!(
        f.detail >= 100,
        "the record says how long it ran: {} ms",
        f.detail
    );
    assert_eq!(fault_of(hung.wait(LONG)), f);
    assert_eq!(out.to_vec(), vec![1, 0], "nothing after the hang ran");
    // The fence the reset queue would have signalled fails for its waiters...
    let g = fault_of(flag.wait(1, Duration::MAX));
    assert_eq!(g.code, Some(ErrorCode::JobTimeout));
    // ...and the queue parked on it fails in turn, naming the cause.
    let h = fault_of(after_wait.wait(LONG));
    assert_eq!(h.code, Some(ErrorCode::DependencyFailed));
    assert_eq!(h.detail, ErrorCode::JobTimeout as u32);
    assert_eq!(theirs.read(0), 0);
    // The first submit after the reset is refused.
    assert!(matches!(
        q.submit(Command::nop()),
        Err(SubmitError::QueueFaulted(_))
    ));
    assert_eq!(dev.reset_stats().unwrap().status(), ResetStatus::Guilty);
    let theirs_stats = other.reset_stats().unwrap();
    assert_eq!((theirs_stats.guilty, theirs_stats.innocent), (0, 1));
    assert_eq!(theirs_stats.status(), ResetStatus::Innocent);
    // The innocent context still works.
    let mut fresh = other.create_queue().unwrap();
    small_dispatch(&other, &mut fresh, 3.0);
}

#[test]
fn a_context_that_keeps_hanging_is_banned_and_the_others_go_on() {
    let env = Env::new();
    let bad = env.second();
    let good = env.second();
    let mut survivor = bad.create_queue().unwrap();
    for hang in 1..=3u32 {
        let mut q = bad
            .queue()
            .job_timeout(Duration::from_millis(50))
            .create()
            .unwrap();
        let f = fault_of(q.submit(kernels::no_progress()).unwrap().wait(LONG));
        assert_eq!(f.code, Some(ErrorCode::JobTimeout), "hang {hang}");
        let mut g = good.create_queue().unwrap();
        small_dispatch(&good, &mut g, hang as f32);
    }
    let stats = bad.reset_stats().unwrap();
    assert_eq!(stats.guilty, 3, "its reset count equals its hangs");
    assert!(stats.banned);
    assert!(matches!(bad.create_queue(), Err(QueueCreateError::Banned)));
    assert!(matches!(bad.alloc::<u64>(1), Err(AllocError::Banned)));
    assert!(matches!(bad.create_fence(0), Err(FenceError::Banned)));
    assert!(matches!(
        survivor.set_watchdog(Watchdog::JobTimeout(Duration::from_secs(1))),
        Err(WatchdogError::Banned)
    ));
    // Its queue that never hung is stopped too: the ban reaches it right after the reset.
    let deadline = Instant::now() + LONG;
    loop {
        match survivor.submit(Command::nop()) {
            Err(SubmitError::Banned) => break,
            Ok(p) => {
                let _ = p.wait(LONG);
            }
            Err(e) => panic!("unexpected {e:?}"),
        }
        assert!(Instant::now() < deadline, "the ban never reached the queue");
        std::thread::sleep(Duration::from_millis(5));
    }
    let good_stats = good.reset_stats().unwrap();
    assert_eq!(good_stats.status(), ResetStatus::Unaffected);
    let mut g = good.create_queue().unwrap();
    small_dispatch(&good, &mut g, 9.0);
}

#[test]
fn a_changed_watchdog_applies_to_the_running_dispatch() {
    let env = Env::new();
    let dev = env.dev();
    let mut q = dev
        .queue()
        .job_timeout(Duration::from_secs(30))
        .create()
        .unwrap();
    // 5 s of spinning (with checkpoints): fine under a 30 s timeout.
    let p = q.submit(kernels::spin(1, 5_000_000_000).unwrap()).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let t = Instant::now();
    q.set_watchdog(Watchdog::JobTimeout(Duration::from_millis(100)))
        .unwrap();
    let f = fault_of(p.wait(LONG));
    assert_eq!(f.code, Some(ErrorCode::JobTimeout));
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "reset after {:?}: the new timeout did not apply",
        t.elapsed()
    );
    assert!(q
        .set_watchdog(Watchdog::JobTimeout(Duration::ZERO))
        .is_err());
    assert!(matches!(
        dev.queue()
            .watchdog(Watchdog::NoProgress(Duration::from_secs(601)))
            .create(),
        Err(QueueCreateError::BadWatchdog(_))
    ));
}

#[test]
fn a_long_running_queue_is_reset_for_no_progress_not_for_its_length() {
    let env = Env::new();
    let dev = env.dev();
    let mut q = dev
        .queue()
        .long_running(Duration::from_millis(100))
        .create()
        .unwrap();
    // 600 ms of checkpointed work: longer than the watchdog, but always progressing.
    q.submit(kernels::spin(1, 600_000_000).unwrap())
        .unwrap()
        .wait(LONG)
        .unwrap();
    let f = fault_of(q.submit(kernels::no_progress()).unwrap().wait(LONG));
    assert_eq!(f.code, Some(ErrorCode::NoProgress));
    assert!(f.detail >= 100);
}

#[test]
fn a_no_progress_kernel_on_every_engine_does_not_stop_another_context() {
    let env = Env::with(Device::builder().engines(2));
    let dev = env.dev();
    let other = env.second();
    let mut stuck = dev
        .queue()
        .job_timeout(Duration::from_millis(200))
        .create()
        .unwrap();
    let hung = stuck.submit(kernels::no_progress_wide(4)).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let mut q = other.create_queue().unwrap();
    small_dispatch(&other, &mut q, 1.0);
    assert_eq!(fault_of(hung.wait(LONG)).code, Some(ErrorCode::JobTimeout));
}

#[test]
fn reset_stress_loses_nothing_and_leaves_no_wait_hanging() {
    // xe_exec_reset's gt-reset-stress, as this device has it: a hang (and its reset) every
    // 250 ms from contexts that hang once each, while 4 threads of other contexts submit
    // and check their work for 3 s.
    let env = Env::new();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let socket = env.dev().socket_path().to_owned();
    let submitters: Vec<_> = (0..4)
        .map(|t| {
            let stop = stop.clone();
            let socket = socket.clone();
            std::thread::spawn(move || {
                let dev = Device::connect(&socket).unwrap();
                let mut q = dev.create_queue().unwrap();
                let done = dev.create_fence(0).unwrap();
                let mut rounds = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let n = 256;
                    let mut buf = dev.alloc::<f32>(n).unwrap();
                    buf.copy_from_slice(&vec![t as f32 + 1.0; n]);
                    rounds += 1;
                    q.submit_batch(&[
                        kernels::scale(n as u32, 3.0, &buf).unwrap(),
                        Command::signal(&done, rounds),
                    ])
                    .unwrap();
                    // Every fence completes (these queues never hang) within the bound.
                    done.wait(rounds, LONG).unwrap();
                    assert!(
                        buf.to_vec().iter().all(|&x| x == 3.0 * (t as f32 + 1.0)),
                        "thread {t} round {rounds}: wrong result"
                    );
                }
                rounds
            })
        })
        .collect();
    let t = Instant::now();
    let mut resets = 0;
    while t.elapsed() < Duration::from_secs(3) {
        let guilty = Device::connect(&socket).unwrap();
        let mut q = guilty
            .queue()
            .job_timeout(Duration::from_millis(50))
            .create()
            .unwrap();
        let f = fault_of(q.submit(kernels::no_progress()).unwrap().wait(LONG));
        assert_eq!(f.code, Some(ErrorCode::JobTimeout));
        resets += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for s in submitters {
        let rounds = s.join().expect("a submitter failed");
        assert!(
            rounds > 0,
            "a submitter made no progress through the resets"
        );
    }
    assert!(resets >= 5, "only {resets} resets in 3 s");
}

#[test]
fn a_hang_is_named_all_along_a_chain_of_timeline_waits() {
    let env = Env::new();
    let (a, b, c) = (env.second(), env.second(), env.second());
    let mut qa = a
        .queue()
        .job_timeout(Duration::from_millis(100))
        .create()
        .unwrap();
    let (mut qb, mut qc) = (b.create_queue().unwrap(), c.create_queue().unwrap());
    let a_there = b.import_fence(qa.timeline().export().unwrap()).unwrap();
    let b_there = c.import_fence(qb.timeline().export().unwrap()).unwrap();
    let hung = qa.submit(kernels::no_progress()).unwrap();
    // B waits for A's hung dispatch; C waits for B's wait.
    let pb = qb.submit(Command::wait(&a_there.point(1))).unwrap();
    let pc = qc.submit(Command::wait(&b_there.point(1))).unwrap();
    assert_eq!(fault_of(hung.wait(LONG)).code, Some(ErrorCode::JobTimeout));
    for (name, p) in [("B", pb), ("C", pc)] {
        let f = fault_of(p.wait(LONG));
        assert_eq!(f.code, Some(ErrorCode::DependencyFailed), "{name}");
        assert_eq!(
            f.detail,
            ErrorCode::JobTimeout as u32,
            "{name} names the root cause"
        );
    }
    for (name, dev) in [("B", &b), ("C", &c)] {
        let s = dev.reset_stats().unwrap();
        assert_eq!((s.guilty, s.innocent), (0, 1), "{name}");
    }
    assert_eq!(a.reset_stats().unwrap().status(), ResetStatus::Guilty);
}
