//! Engine recovery: a workgroup that ignores its reset keeps its engine thread (the CPU
//! cannot stop a thread), and the firmware starts a replacement so that other contexts'
//! work runs. In its own test binary: its runaway threads burn two cores for seconds, which
//! would distort the timing of tests running beside it.

mod common;
use common::Env;
use std::time::{Duration, Instant};
use userq::{kernels, Device, ErrorCode, WaitError};

const LONG: Duration = Duration::from_secs(30);

#[test]
fn an_engine_held_by_a_runaway_workgroup_is_replaced() {
    let env = Env::with(Device::builder().engines(2));
    let dev = env.dev();
    let other = env.second();
    let mut stuck = dev
        .queue()
        .job_timeout(Duration::from_millis(100))
        .create()
        .unwrap();
    // Two workgroups that ignore the reset, one on each engine, for 4 s.
    let hung = stuck
        .submit(kernels::runaway(2, Duration::from_secs(4)).unwrap())
        .unwrap();
    let f = match hung.wait(LONG) {
        Err(WaitError::Faulted(f)) => f,
        other => panic!("expected a reset, got {other:?}"),
    };
    assert_eq!(f.code, Some(ErrorCode::JobTimeout));
    // Both engine threads are still held; replacements run the other context's work.
    let t = Instant::now();
    let mut q = other.create_queue().unwrap();
    // 4096 items: more than the command processor runs itself, so the engines run it (it
    // helps only while every engine thread is parked, and the held ones are not).
    let n = 4096;
    let mut buf = other.alloc::<f32>(n).unwrap();
    // Several dispatches one after another, with pauses that let the engines go idle:
    // the replacements stay in the pool until the held threads come back.
    for round in 0..5 {
        buf.copy_from_slice(&vec![5.0; n]);
        q.submit(kernels::scale(n as u32, 2.0, &buf).unwrap())
            .unwrap()
            .wait(LONG)
            .unwrap();
        assert!(buf.to_vec().iter().all(|&x| x == 10.0), "round {round}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "small dispatches waited {:?} for the held engines",
        t.elapsed()
    );
}
