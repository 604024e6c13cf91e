//! Suspend and resume by kmd-shim (the control path that eviction builds on): a suspended
//! context's queues take no packet and its dispatches leave the engines; resuming
//! continues where it stopped.

mod common;

use common::{cpu_ticks, TempDir};
use std::time::{Duration, Instant};
use userq::{kernels, Command, Device};

fn device(dir: &TempDir) -> kmd_shim::Kmd {
    device_named(dir, "fw-emu")
}

/// A device whose firmware thread is named `name` (so a test can find it in
/// `/proc/self/task`).
fn device_named(dir: &TempDir, name: &'static str) -> kmd_shim::Kmd {
    let launcher = kmd_shim::FirmwareLauncher::Thread(Box::new(move |channel| {
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                if let Ok(fw) = fw_emu::Firmware::boot(channel, fw_emu::FirmwareConfig::default()) {
                    fw.run();
                }
            })
    }));
    kmd_shim::Kmd::start(kmd_shim::KmdConfig::new(
        dir.path().join("dev.sock"),
        launcher,
    ))
    .expect("device")
}

#[test]
fn a_suspended_context_runs_nothing_until_resumed() {
    let dir = TempDir::new("suspend");
    let kmd = device(&dir);
    let dev = Device::connect(kmd.socket_path()).expect("connect");
    let mut q = dev.create_queue().expect("queue");
    let out = dev.alloc::<u64>(1).expect("buffer");
    // 200 workgroups of 5 ms: a second of work.
    let busy = q
        .submit(kernels::spin(200, 5_000_000).unwrap())
        .expect("submit");
    std::thread::sleep(Duration::from_millis(30));

    let t = Instant::now();
    kmd.suspend(dev.context_id(), None).expect("suspend");
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "suspend waited {:?}",
        t.elapsed()
    );
    q.submit(Command::write_value(out.address_of(0).unwrap(), 7))
        .expect("submit");

    // Another context gets the engine at once (4096 items: more than the command
    // processor runs itself, so this goes to the engine; the command processor helps
    // with it only while every engine is parked, so only once the suspended job let go).
    let other = Device::connect(kmd.socket_path()).expect("connect");
    let mut q2 = other.create_queue().expect("queue");
    let buf = other.alloc::<f32>(4096).expect("buffer");
    let t = Instant::now();
    q2.submit(kernels::scale(4096, 1.0, &buf).unwrap())
        .expect("submit")
        .wait(Duration::from_secs(10))
        .expect("other context runs");
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "other context waited {:?}",
        t.elapsed()
    );

    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        busy.poll(),
        Ok(false),
        "the suspended dispatch did not finish"
    );
    assert_eq!(out.read(0), 0, "no packet of a suspended queue runs");

    kmd.resume(dev.context_id(), None).expect("resume");
    busy.wait(Duration::from_secs(20))
        .expect("resumed dispatch completes");
    q.finish(Duration::from_secs(10)).expect("the rest runs");
    assert_eq!(out.read(0), 7);

    // One queue alone, too.
    let mut q3 = dev.create_queue().expect("queue");
    kmd.suspend(dev.context_id(), Some(q3.slot()))
        .expect("suspend one queue");
    let p = q3.submit(Command::nop()).expect("submit");
    q.submit(Command::nop())
        .expect("submit")
        .wait(Duration::from_secs(10))
        .expect("its sibling runs");
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(p.poll(), Ok(false));
    kmd.resume(dev.context_id(), Some(q3.slot()))
        .expect("resume");
    p.wait(Duration::from_secs(10)).expect("runs after resume");
    assert!(kmd.suspend(999, None).is_err(), "unknown context");
    drop((q, q2, q3, out, buf, other, dev));
    kmd.shutdown();
}

#[test]
fn a_kernel_that_never_yields_fails_the_suspend_and_only_its_queue() {
    let dir = TempDir::new("suspend-stuck");
    let kmd = device(&dir);
    let dev = Device::connect(kmd.socket_path()).expect("connect");
    let mut stuck = dev.create_queue().expect("queue");
    let never = stuck.submit(kernels::no_progress()).expect("submit");
    std::thread::sleep(Duration::from_millis(30));
    let t = Instant::now();
    let r = kmd.suspend(dev.context_id(), None);
    let took = t.elapsed();
    assert_eq!(
        r,
        Err(userq::KmdStatus::Preempted),
        "the suspend could not complete without resetting the queue"
    );
    assert!(
        took < Duration::from_secs(4),
        "bounded by the firmware's preemption timeout: {took:?}"
    );
    match never.wait(Duration::from_secs(10)) {
        Err(userq::WaitError::Faulted(f)) => {
            assert_eq!(f.code, Some(userq::ErrorCode::PreemptTimeout))
        }
        other => panic!("expected the stuck queue to be reset, got {other:?}"),
    }
    assert!(
        !kmd.is_lost(),
        "one queue's kernel must not cost the device"
    );
    kmd.resume(dev.context_id(), None).expect("resume");
    let other = Device::connect(kmd.socket_path()).expect("connect");
    let mut q = other.create_queue().expect("queue");
    q.submit(Command::nop())
        .expect("submit")
        .wait(Duration::from_secs(10))
        .expect("the device still works");
    drop((stuck, q, other, dev));
    kmd.shutdown();
}

#[test]
fn a_queue_in_a_reused_slot_starts_with_a_clean_doorbell() {
    let dir = TempDir::new("slot-reuse");
    let kmd = device(&dir);
    let dev = Device::connect(kmd.socket_path()).expect("connect");
    let mut first = dev.create_queue().expect("queue");
    let slot = first.slot();
    for _ in 0..10 {
        first.submit(Command::nop()).expect("submit");
    }
    first.finish(Duration::from_secs(10)).expect("finish");
    drop(first);
    let mut second = dev.create_queue().expect("queue");
    assert_eq!(second.slot(), slot, "the lowest free slot is reused");
    // A resume services every queue of the context, the new one before its first submit.
    kmd.suspend(dev.context_id(), None).expect("suspend");
    kmd.resume(dev.context_id(), None).expect("resume");
    second
        .submit(Command::nop())
        .expect("submit")
        .wait(Duration::from_secs(10))
        .expect("a fresh queue in a reused slot runs");
    assert_eq!(second.timeline().value(), 1);
    drop((second, dev));
    kmd.shutdown();
}

/// CPU time (user + system) of this process's thread named `name`, in clock ticks.
fn thread_cpu_ticks(name: &str) -> u64 {
    let task = std::fs::read_dir("/proc/self/task")
        .expect("tasks")
        .flatten()
        .find(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim_end() == name)
        })
        .unwrap_or_else(|| panic!("no thread named {name}"));
    cpu_ticks(&task.path().join("stat").to_string_lossy())
}

#[test]
fn a_suspended_queue_whose_wait_is_met_lets_the_firmware_sleep() {
    let dir = TempDir::new("suspend-park");
    let kmd = device_named(&dir, "fw-park");
    let dev = Device::connect(kmd.socket_path()).expect("connect");
    let mut q = dev.create_queue().expect("queue");
    let gate = dev.create_fence(0).expect("fence");
    let done = q
        .submit_batch(&[Command::wait(&gate.point(1)), Command::nop()])
        .expect("submit");
    std::thread::sleep(Duration::from_millis(50)); // parked on the gate
    kmd.suspend(dev.context_id(), None).expect("suspend");
    // The wait is met while the queue is suspended: nothing can run until the resume.
    gate.signal(1).expect("signal");
    std::thread::sleep(Duration::from_millis(200)); // past the firmware's back-off
    let ticks = rustix::param::clock_ticks_per_second();
    let before = thread_cpu_ticks("fw-park");
    std::thread::sleep(Duration::from_secs(1));
    let used = thread_cpu_ticks("fw-park") - before;
    // Asleep, the firmware uses next to nothing; spinning on the met wait, a whole core.
    assert!(
        used * 2 < ticks,
        "the firmware used {used} of {ticks} ticks in a second"
    );
    assert_eq!(done.poll(), Ok(false), "nothing runs while suspended");
    kmd.resume(dev.context_id(), None).expect("resume");
    done.wait(Duration::from_secs(10))
        .expect("runs after the resume");
    drop((q, gate, done, dev));
    kmd.shutdown();
}
