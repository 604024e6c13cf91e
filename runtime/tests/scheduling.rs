//! The engines' scheduler: equal queues share engine time, a high-priority queue gets
//! through saturating low-priority work, and a long-running queue never times out.
//! Bounds are generous (tens of percent, tens of milliseconds): the precise figures are the
//! benchmark's business.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use userq::firmware::{ArgError, ArgKind, Args, Kernel, Workgroup};
use userq::{kernels, Command, Device, KernelArg, OpenMode, Priority, WaitMode};

fn device(tag: &str) -> (Device, std::path::PathBuf) {
    device_with(tag, Device::builder())
}

fn device_with(tag: &str, builder: userq::DeviceBuilder) -> (Device, std::path::PathBuf) {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "userq-sched-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let dev = builder
        .socket(dir.join("dev.sock"))
        .mode(OpenMode::Embedded)
        .open()
        .expect("embedded device");
    (dev, dir)
}

/// Spins `ns` per workgroup, then counts the workgroup in `counter[0]`: engine time made
/// visible to the host.
struct CountedSpin;
impl Kernel for CountedSpin {
    fn name(&self) -> &str {
        "counted_spin"
    }
    fn signature(&self) -> &[ArgKind] {
        &[ArgKind::U64, ArgKind::Buffer]
    }
    fn validate(&self, a: &Args, _: &userq::uapi::packet::Dispatch) -> Result<(), ArgError> {
        userq::firmware::need(a, 1, 1, 8)
    }
    fn run(&self, a: &Args, _: &Workgroup) {
        let until = Instant::now() + Duration::from_nanos(a.u64(0));
        while Instant::now() < until {
            std::hint::spin_loop();
        }
        a.buffer(1).words64()[0].fetch_add(1, Ordering::Relaxed);
    }
}

#[test]
fn two_equal_queues_running_endless_spin_kernels_share_engine_time() {
    let id = kernels::FIRST_CUSTOM + 7;
    let (dev, dir) = device_with("fair", Device::builder().kernel(id, Arc::new(CountedSpin)));
    let counters = [dev.alloc::<u64>(1).unwrap(), dev.alloc::<u64>(1).unwrap()];
    let mut queues: Vec<_> = (0..2).map(|_| dev.create_queue().unwrap()).collect();
    for (q, c) in queues.iter_mut().zip(&counters) {
        // A billion 100 µs workgroups: endless for this test.
        q.submit(Command::dispatch(
            id,
            [1_000_000_000, 1, 1],
            [1, 1, 1],
            &[
                KernelArg::U64(100_000),
                KernelArg::Address(c.device_address()),
            ],
        ))
        .unwrap();
    }
    std::thread::sleep(Duration::from_millis(100));
    let before = [counters[0].read(0), counters[1].read(0)];
    std::thread::sleep(Duration::from_secs(2));
    let after = [counters[0].read(0), counters[1].read(0)];
    // Destroying the queues cancels their endless dispatches.
    drop(queues);
    let (x, y) = ((after[0] - before[0]) as f64, (after[1] - before[1]) as f64);
    drop((counters, dev));
    let _ = std::fs::remove_dir_all(dir);
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
    let (dev, dir) = device("prio");
    let mut low: Vec<_> = (0..8)
        .map(|_| dev.queue().priority(Priority::Low).create().unwrap())
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
    let _ = std::fs::remove_dir_all(dir);
    // A time slice is 1 ms; the bound is generous for a shared 2-core machine.
    assert!(
        worst < Duration::from_millis(200),
        "high-priority round trip took {worst:?}"
    );
}
