//! The engines' scheduler: equal queues share engine time, a high-priority queue gets
//! through saturating low-priority work, and a long-running queue never times out. A
//! dispatch of at most [`INLINE_ITEMS`] work-items may run on the command processor
//! instead of an engine; the tests that mean the engines use larger ones. The command
//! processor may still run a larger bounded dispatch's workgroups while every engine is
//! parked, but never while one is busy or held: a test that means an engine is freed
//! still fails if it is not.
//! Bounds are generous (tens of percent, tens of milliseconds): the precise figures are the
//! benchmark's business.

mod common;
use common::Env;
use std::time::{Duration, Instant};
use userq::uapi::observe::Observer;
use userq::{kernels, Device, Priority, WaitMode};

/// The most work-items the command processor runs itself (one full workgroup's worth).
const INLINE_ITEMS: u32 = userq::uapi::packet::MAX_WORKGROUP_ITEMS as u32;

/// Items of a dispatch that must go to an engine: more than the command processor runs.
const ENGINE_ITEMS: u32 = 4 * INLINE_ITEMS;

/// Workgroups of the counting spin kernel (`ns` each) that two queues run over `window`,
/// both with an endless dispatch; the queues are destroyed (cancelling them) afterwards.
fn engine_shares(
    dev: &Device,
    mut queues: Vec<userq::Queue>,
    ns: u64,
    window: Duration,
) -> (f64, f64) {
    let counters = [dev.alloc::<u64>(1).unwrap(), dev.alloc::<u64>(1).unwrap()];
    for (q, c) in queues.iter_mut().zip(&counters) {
        // A billion workgroups: endless for these tests.
        q.submit(kernels::spin_counted(1_000_000_000, ns, c).unwrap())
            .unwrap();
    }
    std::thread::sleep(Duration::from_millis(100));
    let before = [counters[0].read(0), counters[1].read(0)];
    std::thread::sleep(window);
    let after = [counters[0].read(0), counters[1].read(0)];
    drop(queues);
    ((after[0] - before[0]) as f64, (after[1] - before[1]) as f64)
}

#[test]
fn two_equal_queues_running_endless_spin_kernels_share_engine_time() {
    let env = Env::new();
    let dev = env.dev();
    // Endless dispatches that finish workgroups all the time: long-running queues.
    let queues = (0..2)
        .map(|_| {
            dev.queue()
                .long_running(Duration::from_secs(1))
                .create()
                .unwrap()
        })
        .collect();
    let (x, y) = engine_shares(dev, queues, 100_000, Duration::from_secs(2));
    assert!(
        x + y >= 1000.0,
        "too little progress to judge: {x} and {y} workgroups"
    );
    let skew = (x - y).abs() / ((x + y) / 2.0);
    assert!(
        skew <= 0.10,
        "unequal engine time: {x} vs {y} workgroups ({:.1}% apart)",
        skew * 100.0
    );
}

#[test]
fn a_high_priority_queue_gets_through_saturating_low_priority_work() {
    let env = Env::new();
    let dev = env.dev();
    let mut low: Vec<_> = (0..8)
        .map(|_| {
            dev.queue()
                .priority(Priority::Low)
                .job_timeout(Duration::from_secs(60))
                .create()
                .unwrap()
        })
        .collect();
    for q in &mut low {
        // 2000 workgroups of 1 ms each: seconds of work per queue, saturating every engine.
        q.submit(kernels::spin(2000, 1_000_000).unwrap()).unwrap();
    }
    std::thread::sleep(Duration::from_millis(50));
    let mut high = dev.queue().priority(Priority::High).create().unwrap();
    let buf = dev.alloc::<f32>(4096).unwrap();
    let mut worst = Duration::ZERO;
    for _ in 0..50 {
        let t = Instant::now();
        high.submit(kernels::scale(4096, 1.0, &buf).unwrap())
            .unwrap()
            .wait_with(WaitMode::Adaptive, Duration::from_secs(10))
            .unwrap();
        worst = worst.max(t.elapsed());
    }
    // The low queues are still busy: they were preempted, not finished.
    assert!(low.iter().all(|q| q.timeline().value() == 0));
    drop(low);
    drop((high, buf, dev));
    // A time slice is 1 ms; the bound is generous for a shared 2-core machine.
    assert!(
        worst < Duration::from_millis(200),
        "high-priority round trip took {worst:?}"
    );
}

#[test]
fn one_long_workgroup_is_preempted_at_its_checkpoints() {
    let env = Env::new();
    let dev = env.dev();
    let mut long = dev
        .queue()
        .job_timeout(Duration::from_secs(60))
        .create()
        .unwrap();
    let mut short = dev.create_queue().unwrap();
    // A single workgroup spinning for 2 s: only checkpoints can share its engine.
    let busy = long
        .submit(kernels::spin(1, 2_000_000_000).unwrap())
        .unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let buf = dev.alloc::<f32>(ENGINE_ITEMS as usize).unwrap();
    let t = Instant::now();
    short
        .submit(kernels::scale(ENGINE_ITEMS, 1.0, &buf).unwrap())
        .unwrap()
        .wait(Duration::from_secs(10))
        .unwrap();
    let waited = t.elapsed();
    assert_eq!(
        busy.poll(),
        Ok(false),
        "the long workgroup is still running"
    );
    assert!(
        waited < Duration::from_millis(500),
        "waited {waited:?} behind one long workgroup"
    );
    busy.wait(Duration::from_secs(20)).unwrap();
    drop((long, short, buf, dev));
}

#[test]
fn the_persistent_kernel_serves_its_mailbox_until_told_to_stop() {
    let env = Env::new();
    let dev = env.dev();
    let mut server = dev
        .queue()
        .long_running(Duration::from_secs(1))
        .create()
        .unwrap();
    let mut other = dev.create_queue().unwrap();
    let mut mbox = kernels::Mailbox::new(dev).unwrap();
    let running = server.submit(mbox.launch()).unwrap();
    let buf = dev.alloc::<f32>(ENGINE_ITEMS as usize).unwrap();
    for i in 1..=200u64 {
        let answer = mbox.ask(i * 10, Duration::from_secs(10));
        assert_eq!(answer, Some(i * 30 + 1), "request {i}");
        if i % 50 == 0 {
            // Other queues keep running while the kernel persists.
            other
                .submit(kernels::scale(ENGINE_ITEMS, 1.0, &buf).unwrap())
                .unwrap()
                .wait(Duration::from_secs(10))
                .unwrap();
        }
    }
    assert_eq!(running.poll(), Ok(false));
    mbox.stop();
    running.wait(Duration::from_secs(10)).unwrap();
    drop((server, other, mbox, buf, dev));
}

#[test]
fn destroying_the_queue_of_a_no_progress_kernel_frees_its_engine() {
    let env = Env::new();
    let dev = env.dev();
    let mut stuck = dev.create_queue().unwrap();
    let never = stuck.submit(kernels::no_progress()).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(never.poll(), Ok(false));
    drop(stuck);
    assert!(
        never.wait(Duration::from_secs(10)).is_err(),
        "the destroyed queue's point fails"
    );
    let mut q = dev.create_queue().unwrap();
    let buf = dev.alloc::<f32>(ENGINE_ITEMS as usize).unwrap();
    q.submit(kernels::scale(ENGINE_ITEMS, 1.0, &buf).unwrap())
        .unwrap()
        .wait(Duration::from_secs(10))
        .unwrap();
    drop((q, buf, dev));
}

#[test]
fn a_longer_time_slice_buys_a_proportionally_larger_share() {
    let env = Env::new();
    let dev = env.dev();
    assert!(matches!(
        dev.queue().time_slice(Duration::ZERO).create(),
        Err(userq::QueueCreateError::BadTimeSlice(_))
    ));
    let queues = vec![
        dev.queue()
            .time_slice(Duration::from_millis(3))
            .long_running(Duration::from_secs(1))
            .create()
            .unwrap(),
        dev.queue()
            .time_slice(Duration::from_millis(1))
            .long_running(Duration::from_secs(1))
            .create()
            .unwrap(),
    ];
    let (x, y) = engine_shares(dev, queues, 50_000, Duration::from_secs(1));
    let ratio = x / y.max(1.0);
    assert!(
        (2.0..=4.0).contains(&ratio),
        "3 ms vs 1 ms slices gave {x} vs {y} workgroups"
    );
}

#[test]
fn with_two_engines_a_yielding_workgroup_is_always_resumed() {
    let env = Env::with(Device::builder().engines(2));
    let dev = env.dev();
    let mut server = dev
        .queue()
        .long_running(Duration::from_secs(1))
        .create()
        .unwrap();
    let mut churn = dev.create_queue().unwrap();
    let mut mbox = kernels::Mailbox::new(dev).unwrap();
    let running = server.submit(mbox.launch()).unwrap();
    let buf = dev.alloc::<f32>(ENGINE_ITEMS as usize).unwrap();
    // Other jobs come and go (each makes an engine look at the lists) while the persistent
    // workgroup yields slice after slice; every request must still be answered.
    for i in 1..=300u64 {
        churn.submit(kernels::spin(3, 300_000).unwrap()).unwrap();
        churn
            .submit(kernels::scale(ENGINE_ITEMS, 1.0, &buf).unwrap())
            .unwrap();
        assert!(
            mbox.ask(i, Duration::from_secs(10)).is_some(),
            "request {i} never answered: the job was lost"
        );
    }
    mbox.stop();
    running.wait(Duration::from_secs(10)).unwrap();
    churn.finish(Duration::from_secs(10)).unwrap();
    drop((server, churn, mbox, buf, dev));
}

#[test]
fn the_command_processor_runs_a_small_dispatch_itself_and_a_large_one_goes_to_an_engine() {
    let env = Env::with(Device::builder().engines(2));
    let dev = env.dev();
    let obs = Observer::connect(dev.socket_path()).expect("observe");
    let mut hog = dev
        .queue()
        .job_timeout(Duration::from_secs(60))
        .create()
        .unwrap();
    let (mut q, mut big) = (dev.create_queue().unwrap(), dev.create_queue().unwrap());
    // One engine is held by a workgroup that never yields (so no job ever waits for an
    // engine); the other one is idle.
    let busy = hog.submit(kernels::no_progress()).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let small = dev.alloc::<u32>(INLINE_ITEMS as usize).unwrap();
    for i in 0..10 {
        q.submit(kernels::fill_u32(INLINE_ITEMS, i, &small).unwrap())
            .unwrap()
            .wait(Duration::from_secs(10))
            .unwrap();
        assert_eq!(small.read(0), i);
        assert_eq!(small.read(INLINE_ITEMS as usize - 1), i);
    }
    assert_eq!(
        busy.poll(),
        Ok(false),
        "the held engine's workgroup still runs"
    );
    let large = dev.alloc::<u32>(ENGINE_ITEMS as usize).unwrap();
    big.submit(kernels::fill_u32(ENGINE_ITEMS, 7, &large).unwrap())
        .unwrap()
        .wait(Duration::from_secs(10))
        .unwrap();
    assert_eq!(large.read(ENGINE_ITEMS as usize - 1), 7);
    drop(hog);
    assert!(busy.wait(Duration::from_secs(10)).is_err(), "cancelled");
    // The figures arrive with the firmware's 10 ms tick.
    let t = Instant::now();
    let snap = loop {
        let s = obs.snapshot();
        let engine_wgs: u64 = s.engines.iter().map(|e| e.workgroups).sum();
        if (s.inline.workgroups >= 40 && engine_wgs >= 17) || t.elapsed() > Duration::from_secs(10)
        {
            break s;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    // 10 dispatches of 4 workgroups each on the command processor, none on the idle
    // engine; on the engines, the large one's 16 and the held one, which returned once
    // its queue was gone.
    assert_eq!(snap.inline.workgroups, 40, "{snap:?}");
    assert!(snap.inline.busy_ns > 0);
    let engine_wgs: u64 = snap.engines.iter().map(|e| e.workgroups).sum();
    assert_eq!(engine_wgs, 17, "{snap:?}");
    let me = snap
        .contexts
        .iter()
        .find(|c| c.ctx == dev.context_id())
        .expect("our context");
    let ql = me.queues.iter().find(|x| x.slot == q.slot()).unwrap();
    assert!(ql.engine_ns > 0, "inline time counts for its queue: {ql:?}");
    drop((q, big, small, large, dev));
}

#[test]
fn large_dispatches_on_an_idle_device_run_every_workgroup_once_whoever_runs_them() {
    let env = Env::with(Device::builder().engines(1));
    let dev = env.dev();
    let obs = Observer::connect(dev.socket_path()).expect("observe");
    let mut q = dev.create_queue().unwrap();
    let buf = dev.alloc::<u32>(ENGINE_ITEMS as usize).unwrap();
    const WORKGROUPS: u64 = (ENGINE_ITEMS / kernels::WORKGROUP) as u64;
    const DISPATCHES: u32 = 20;
    // Each dispatch finds the one engine parked (it parks as soon as it has no work), so
    // the command processor may run workgroups until the engine is back at the lists
    // (which of the two gets how many is a race: the engines' unit tests check the rule).
    for i in 1..=DISPATCHES {
        q.submit(kernels::fill_u32(ENGINE_ITEMS, i, &buf).unwrap())
            .unwrap()
            .wait(Duration::from_secs(10))
            .unwrap();
        assert!(
            buf.to_vec().iter().all(|&x| x == i),
            "every workgroup ran, dispatch {i}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    // None ran twice: each counted once, on the command processor or on the engine (the
    // figures arrive with the firmware's 10 ms tick).
    let want = DISPATCHES as u64 * WORKGROUPS;
    let t = Instant::now();
    let (inline, total) = loop {
        let s = obs.snapshot();
        let all = s.inline.workgroups + s.engines.iter().map(|e| e.workgroups).sum::<u64>();
        if all >= want || t.elapsed() > Duration::from_secs(10) {
            break (s.inline.workgroups, all);
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(total, want, "{inline} of them on the command processor");
    drop((q, buf, dev));
}
