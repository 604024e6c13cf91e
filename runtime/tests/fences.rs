//! Fences never go backwards: a host signal below the fence's value is refused, a queue's
//! SIGNAL_FENCE below it stops that queue, racing signallers never move it down, and a
//! fence used as a flag word goes down only through `set`.

mod common;
use common::Env;
use std::time::Duration;
use userq::{Command, ErrorCode, SignalError, WaitError};

const LONG: Duration = Duration::from_secs(10);

#[test]
fn fences_never_go_backwards_from_the_host_or_a_queue() {
    let env = Env::new();
    let dev = env.dev();
    let f = dev.create_fence(0).unwrap();
    f.signal(5).unwrap();
    assert_eq!(
        f.signal(3),
        Err(SignalError::Backwards {
            current: 5,
            requested: 3
        })
    );
    assert_eq!(f.value(), 5);
    f.signal(5).unwrap(); // the current value again changes nothing
                          // A queue's SIGNAL_FENCE below the fence stops that queue and leaves the fence.
    let mut q = dev.create_queue().unwrap();
    let p = q.submit(Command::signal(&f, 2)).unwrap();
    match p.wait(LONG) {
        Err(WaitError::Faulted(fault)) => {
            assert_eq!(fault.code, Some(ErrorCode::FenceBackwards));
            assert_eq!(fault.address, 5, "the record names the fence's value");
        }
        other => panic!("expected FenceBackwards, got {other:?}"),
    }
    assert_eq!(f.value(), 5);
    // A flag word may go down, from the host and from a queue.
    f.set(1).unwrap();
    assert_eq!(f.value(), 1);
    let mut q2 = dev.create_queue().unwrap();
    q2.submit(Command::set_fence(&f, 0))
        .unwrap()
        .wait(LONG)
        .unwrap();
    assert_eq!(f.value(), 0);
}

#[test]
fn racing_host_signallers_never_move_a_fence_backwards() {
    let env = Env::new();
    let dev = env.dev();
    let f = dev.create_fence(0).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (f, stop) = (f.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut last = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let v = f.value();
                assert!(v >= last, "the fence went from {last} to {v}");
                last = v;
            }
        })
    };
    let signallers: Vec<_> = (0..2)
        .map(|t| {
            let f = f.clone();
            std::thread::spawn(move || {
                let mut refused = 0u32;
                for v in (1..=20_000u64).filter(|v| v % 2 == t) {
                    if f.signal(v).is_err() {
                        refused += 1; // the other thread got further: refused, not lost
                    }
                }
                refused
            })
        })
        .collect();
    for s in signallers {
        s.join().unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    watcher.join().unwrap();
    assert_eq!(f.value(), 20_000);
}
