//! The runtime API against an embedded device: ordering, back-pressure, waits, and how
//! errors reach the caller (sharing across contexts: `sharing.rs`).

use std::time::{Duration, Instant};
use userq::{
    wait_all, wait_any, Command, ErrorCode, Packet, QueueStatus, SubmitError, WaitError, WaitMode,
};

mod common;
use common::{fault_code, Env};

const LONG: Duration = Duration::from_secs(10);

#[test]
fn packets_complete_in_order_and_the_timeline_counts_them() {
    let env = Env::new();
    let mut q = env.dev().queue().ring_entries(16).create().unwrap();
    let buf = env.dev().alloc::<u64>(1).unwrap();
    let addr = buf.address_of(0).unwrap();
    let mut last = None;
    for i in 1..=10u64 {
        last = Some(q.submit(Command::write_value(addr, i)).unwrap());
    }
    let last = last.unwrap();
    assert_eq!(last.value(), 10);
    last.wait(LONG).unwrap();
    assert_eq!(buf.read(0), 10, "the last write in submission order wins");
    assert_eq!(q.timeline().value(), 10);
    assert_eq!(q.status(), QueueStatus::Active);
}

#[test]
fn ten_times_the_ring_wraps_around_in_order() {
    let env = Env::new();
    let mut q = env.dev().queue().ring_entries(8).create().unwrap();
    let n = 8 * 12;
    let stamps = env.dev().alloc::<u64>(n).unwrap();
    for chunk in (0..n).collect::<Vec<_>>().chunks(5) {
        let cmds: Vec<_> = chunk
            .iter()
            .map(|&i| Command::timestamp(stamps.address_of(i).unwrap()))
            .collect();
        q.submit_batch(&cmds).unwrap();
    }
    q.finish(LONG).unwrap();
    let ts = stamps.to_vec();
    assert!(ts.iter().all(|&t| t != 0), "every packet ran");
    assert!(ts.windows(2).all(|w| w[0] <= w[1]), "in order");
    assert_eq!(q.timeline().value(), n as u64);
}

#[test]
fn a_full_ring_gives_would_block_and_never_overwrites() {
    let env = Env::new();
    let dev = env.dev();
    let mut q = dev.queue().ring_entries(4).create().unwrap();
    let gate = dev.create_fence(0).unwrap();
    let buf = dev.alloc::<u64>(8).unwrap();
    let w = |i: usize| Command::write_value(buf.address_of(i).unwrap(), i as u64 + 100);
    // The wait is consumed and parks the queue; everything behind it stays in the ring.
    q.submit_batch(&[Command::wait(&gate.point(1)), w(0), w(1), w(2)])
        .unwrap();
    // Fill the ring. Once the firmware has consumed the wait packet (freeing one slot),
    // nothing moves until the gate opens, so two refusals 20 ms apart mean "full for good".
    let mut accepted = 0;
    let mut refusals = 0;
    while refusals < 2 {
        match q.try_submit(w(3 + accepted)) {
            Ok(_) => {
                accepted += 1;
                refusals = 0;
            }
            Err(e) => {
                assert_eq!(e, SubmitError::WouldBlock);
                refusals += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        assert!(
            accepted <= 1,
            "a 4-entry ring holding 3 packets takes one more at most"
        );
    }
    assert_eq!(
        q.submit_batch_timeout(&[w(7)], Duration::from_millis(30))
            .err(),
        Some(SubmitError::Timeout)
    );
    assert!(matches!(
        q.submit_batch(&std::array::from_fn::<_, 5, _>(|_| Command::nop())),
        Err(SubmitError::BatchTooLarge {
            batch: 5,
            entries: 4
        })
    ));
    gate.signal(1).unwrap();
    q.submit(w(7)).unwrap().wait(LONG).unwrap();
    for i in 0..3 + accepted {
        assert_eq!(buf.read(i), i as u64 + 100, "slot {i}");
    }
    assert_eq!(buf.read(7), 107);
}

#[test]
fn waits_time_out_in_every_mode() {
    let env = Env::new();
    let f = env.dev().create_fence(0).unwrap();
    for mode in [WaitMode::Spin, WaitMode::Block, WaitMode::Adaptive] {
        let t = Instant::now();
        assert_eq!(
            f.point(1).wait_with(mode, Duration::from_millis(30)),
            Err(WaitError::Timeout)
        );
        let e = t.elapsed();
        assert!(
            e >= Duration::from_millis(30) && e < Duration::from_secs(5),
            "{mode:?}: {e:?}"
        );
    }
    assert_eq!(f.point(0).poll(), Ok(true));
    assert_eq!(f.point(1).poll(), Ok(false));
}

#[test]
fn wait_any_returns_the_first_reached_and_wait_all_needs_every_one() {
    let env = Env::new();
    let a = env.dev().create_fence(0).unwrap();
    let b = env.dev().create_fence(0).unwrap();
    let points = [a.point(1), b.point(1)];
    let b2 = b.clone();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(20));
        b2.signal(1).unwrap();
    });
    assert_eq!(wait_any(&points, WaitMode::Block, LONG), Ok(1));
    t.join().unwrap();
    assert_eq!(
        wait_all(&points, WaitMode::Adaptive, Duration::from_millis(20)),
        Err(WaitError::Timeout)
    );
    a.signal(5).unwrap();
    assert_eq!(wait_all(&points, WaitMode::Block, LONG), Ok(()));
    assert_eq!(
        wait_any(&[], WaitMode::Spin, Duration::ZERO),
        Err(WaitError::Timeout)
    );
}

#[test]
fn a_host_signal_wakes_a_parked_queue_and_a_sleeping_waiter() {
    let env = Env::new();
    let dev = env.dev();
    let mut q = dev.create_queue().unwrap();
    let gate = dev.create_fence(0).unwrap();
    let done = dev.create_fence(0).unwrap();
    q.submit_batch(&[Command::wait(&gate.point(7)), Command::signal(&done, 1)])
        .unwrap();
    let waiter = {
        let done = done.clone();
        std::thread::spawn(move || done.point(1).wait_with(WaitMode::Block, LONG))
    };
    // Long enough for the firmware to go to sleep and the waiter to block.
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(done.value(), 0, "nothing runs past the unsignalled wait");
    gate.signal(6).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(done.value(), 0, "6 is not 7");
    gate.signal(7).unwrap();
    waiter.join().unwrap().unwrap();
    assert_eq!(done.value(), 1);
}

#[test]
fn wait_conditions_with_masks_gate_a_queue() {
    let env = Env::new();
    let dev = env.dev();
    let mut q = dev.create_queue().unwrap();
    let flag = dev.create_fence(0xff00).unwrap();
    let out = dev.alloc::<u64>(1).unwrap();
    q.submit_batch(&[
        Command::wait_fence(&flag, 0x0a, userq::WaitCondition::Equal, 0xff),
        Command::write_value(out.address_of(0).unwrap(), 1),
    ])
    .unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(out.read(0), 0);
    flag.set(0x770a).unwrap(); // low byte 0x0a: matches under the mask (a flag may go down)
    q.finish(LONG).unwrap();
    assert_eq!(out.read(0), 1);
}

#[test]
fn a_bad_packet_faults_only_its_queue_with_a_typed_error() {
    let env = Env::new();
    let dev = env.dev();
    let mut bad = dev.create_queue().unwrap();
    let mut good = dev.create_queue().unwrap();
    let mut garbage = Packet::from_words([0; 8]);
    garbage.header = 0xee;
    let p = bad
        .submit_packets(
            &[Command::nop().packet(), garbage, Command::nop().packet()],
            LONG,
        )
        .unwrap();
    match p.wait(LONG) {
        Err(WaitError::Faulted(f)) => {
            assert_eq!(f.code, Some(ErrorCode::UnknownOpcode));
            assert_eq!((f.packet_index, f.detail, f.last_completed), (1, 0xee, 1));
        }
        other => panic!("expected UnknownOpcode, got {other:?}"),
    }
    assert!(matches!(bad.status(), QueueStatus::Faulted(_)));
    // The point before the bad packet did complete.
    assert_eq!(bad.timeline().point(1).poll(), Ok(true));
    good.submit(Command::nop()).unwrap().wait(LONG).unwrap();
}

#[test]
fn memory_violations_report_the_address_and_leave_memory_untouched() {
    let env = Env::new();
    let dev = env.dev();
    let buf = dev.alloc::<u64>(512).unwrap();
    let mut q = dev.create_queue().unwrap();
    let outside = buf.device_address() + 4096;
    let r = q
        .submit(Command::write_value(outside, 1))
        .unwrap()
        .wait(LONG);
    match r {
        Err(WaitError::Faulted(f)) => {
            assert_eq!(f.code, Some(ErrorCode::MemoryViolation));
            assert_eq!(f.address, outside);
        }
        other => panic!("{other:?}"),
    }
    let mut q = dev.create_queue().unwrap();
    let r = q
        .submit(Command::timestamp(buf.device_address() + 3))
        .unwrap()
        .wait(LONG);
    assert_eq!(fault_code(r), ErrorCode::MisalignedAddress);
    assert!(buf.to_vec().iter().all(|&v| v == 0));
}

#[test]
fn a_queue_waiting_on_a_poisoned_fence_fails_in_turn() {
    let env = Env::new();
    let dev = env.dev();
    let mut broken = dev.create_queue().unwrap();
    let mut dependent = dev.create_queue().unwrap();
    let later = broken.timeline().point(5);
    let r = dependent.submit(Command::wait(&later)).unwrap();
    broken
        .submit(Command::write_value(0x10, 0))
        .unwrap()
        .wait(LONG)
        .unwrap_err();
    assert_eq!(fault_code(r.wait(LONG)), ErrorCode::DependencyFailed);
}

#[test]
fn destroying_a_queue_poisons_only_values_it_never_reached() {
    let env = Env::new();
    let dev = env.dev();
    let mut q = dev.create_queue().unwrap();
    let gate = dev.create_fence(0).unwrap();
    let reached = q.submit(Command::nop()).unwrap();
    reached.wait(LONG).unwrap();
    let never = q.submit(Command::wait(&gate.point(1))).unwrap();
    drop(q);
    assert_eq!(reached.wait(LONG), Ok(()));
    assert_eq!(fault_code(never.wait(LONG)), ErrorCode::QueueDestroyed);
}

#[test]
fn buffers_are_zeroed_and_bounds_checked() {
    let env = Env::new();
    let mut b = env.dev().alloc::<u32>(1000).unwrap();
    assert_eq!(b.len(), 1000);
    assert!(b.to_vec().iter().all(|&v| v == 0));
    assert_eq!(b.address_of(999), Some(b.device_address() + 999 * 4));
    assert_eq!(b.address_of(1000), None);
    b.copy_from_slice(&[1, 2, 3]);
    assert_eq!(&b.to_vec()[..4], &[1, 2, 3, 0]);
    assert!(matches!(
        env.dev().alloc::<u64>(0),
        Err(userq::AllocError::BadSize)
    ));
}

#[test]
fn a_submitted_command_keeps_its_fence_alive() {
    let env = Env::new();
    let dev = env.dev();
    let mut q = dev.create_queue().unwrap();
    let gate = dev.create_fence(0).unwrap();
    let gate2 = gate.clone();
    let out = dev.alloc::<u64>(1).unwrap();
    q.submit_batch(&[
        Command::wait(&gate.point(1)),
        Command::write_value(out.address_of(0).unwrap(), 9),
    ])
    .unwrap();
    drop(gate); // the caller's handle goes; the parked packet still names the fence
    std::thread::sleep(Duration::from_millis(20));
    gate2.signal(1).unwrap();
    q.finish(LONG).unwrap();
    assert_eq!(out.read(0), 9);
}

#[test]
fn wait_any_prefers_a_reached_point_over_a_poisoned_one() {
    let env = Env::new();
    let dev = env.dev();
    let mut broken = dev.create_queue().unwrap();
    let poisoned = broken.submit(Command::write_value(0x8, 0)).unwrap();
    assert!(poisoned.wait(LONG).is_err());
    let ok = dev.create_fence(3).unwrap();
    assert_eq!(
        wait_any(&[poisoned.clone(), ok.point(2)], WaitMode::Spin, LONG),
        Ok(1)
    );
    assert!(matches!(
        wait_any(&[poisoned, ok.point(4)], WaitMode::Spin, LONG),
        Err(WaitError::Faulted(_))
    ));
}

#[test]
fn a_spinning_wait_sees_its_queue_fault_while_it_spins() {
    let env = Env::new();
    let dev = env.dev();
    let mut q = dev.create_queue().unwrap();
    let gate = dev.create_fence(0).unwrap();
    // Parked behind the gate, then a write to an unmapped address: the point can only fail,
    // and only once the gate opens, while the waiter below is spinning (a spin wait reads
    // the error words after each burst of value checks, not at every check).
    let bad = q
        .submit_batch(&[Command::wait(&gate.point(1)), Command::write_value(0x8, 0)])
        .unwrap();
    let waiter = std::thread::spawn(move || bad.wait_with(WaitMode::Spin, LONG));
    std::thread::sleep(Duration::from_millis(20));
    gate.signal(1).unwrap();
    let t = Instant::now();
    let r = waiter.join().unwrap();
    assert!(matches!(r, Err(WaitError::Faulted(_))), "{r:?}");
    assert!(
        t.elapsed() < LONG / 2,
        "the fault was seen only at the timeout"
    );
}

#[test]
fn queue_creation_rejects_bad_ring_sizes() {
    let env = Env::new();
    for n in [0, 1, 3, 100, 1 << 17] {
        assert!(matches!(
            env.dev().queue().ring_entries(n).create(),
            Err(userq::QueueCreateError::BadRingSize(_))
        ));
    }
}

#[test]
fn a_stopped_queue_refuses_the_very_next_submit() {
    let env = Env::new();
    let dev = env.dev();
    let mut q = dev.create_queue().unwrap();
    let mut garbage = Packet::from_words([0; 8]);
    garbage.header = 0xee;
    let p = q.submit_packets(&[garbage], LONG).unwrap();
    assert!(matches!(p.wait(LONG), Err(WaitError::Faulted(_))));
    // Not a ring's worth of Ok first: the first submit after the fault is refused.
    match q.try_submit(Command::nop()) {
        Err(SubmitError::QueueFaulted(f)) => assert_eq!(f.code, Some(ErrorCode::UnknownOpcode)),
        other => panic!("expected QueueFaulted, got {other:?}"),
    }
    assert!(matches!(
        q.enqueue(&[Command::nop()]),
        Err(SubmitError::QueueFaulted(_))
    ));
}

#[test]
fn signalling_a_timeline_from_a_queue_is_refused_at_submit() {
    let env = Env::new();
    let dev = env.dev();
    let mut a = dev.create_queue().unwrap();
    let mut b = dev.create_queue().unwrap();
    let theirs = a.timeline().clone();
    assert_eq!(
        b.submit(Command::signal(&theirs, 7)).err(),
        Some(SubmitError::FenceNotWritable)
    );
    // Nothing reached either ring, and both queues still work.
    assert_eq!(b.timeline().value(), 0);
    a.submit(Command::nop()).unwrap().wait(LONG).unwrap();
    b.submit(Command::nop()).unwrap().wait(LONG).unwrap();
    assert_eq!(theirs.value(), 1);
}

#[test]
fn a_buffer_dropped_under_a_pending_dispatch_lives_until_it_completes() {
    let env = Env::new();
    let dev = env.dev();
    let mut q = dev.create_queue().unwrap();
    let gate = dev.create_fence(0).unwrap();
    let out = dev.alloc::<u32>(4096).unwrap();
    // A second mapping of the same memory, to read the result once `out` is gone.
    let view = dev.import_buffer::<u32>(out.export().unwrap()).unwrap();
    q.submit_batch(&[
        Command::wait(&gate.point(1)),
        userq::kernels::fill_u32(4096, 7, &out).unwrap(),
    ])
    .unwrap();
    drop(out); // the dispatch, still parked behind the gate, holds its memory
    gate.signal(1).unwrap();
    q.finish(LONG).unwrap();
    assert_eq!((view.read(0), view.read(4095)), (7, 7));
}
