//! On-demand paging across processes, against a kmd-shim daemon: the `on_demand` example
//! in both modes, the deadlock-freedom stress over several seeds with the pool's resident
//! memory sampled from outside, and the counterfactual policy shown to deadlock on the
//! same scenario.

mod common;
use common::*;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The budget the daemons here get: 64 device pages.
const VRAM: u64 = 4 << 20;
const PAGE: u64 = 64 << 10;

fn on_demand(socket: Option<&std::path::Path>, seed: u64) -> String {
    let example = bin_dir().join("examples").join("on_demand");
    assert!(
        example.exists(),
        "examples are built by `cargo test --workspace`"
    );
    let runtime_dir = TempDir::new("on-demand");
    let mut cmd = Command::new(&example);
    cmd.args(["--seed", &seed.to_string()]);
    match socket {
        Some(s) => cmd.env("USERQ_DEVICE", s),
        None => cmd
            .env_remove("USERQ_DEVICE")
            .env("XDG_RUNTIME_DIR", runtime_dir.path()),
    };
    Proc::spawn(
        "on_demand",
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped()),
    )
    .succeeded(Duration::from_secs(120))
}

/// The pool memfd's allocated bytes in process `pid`, read from /proc as any observer can.
fn pool_resident(pid: u32) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    for e in std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.flatten() {
        let target = std::fs::read_link(e.path()).ok()?;
        if target.to_string_lossy().starts_with("/memfd:userq-pool (") {
            return std::fs::metadata(e.path()).ok().map(|m| m.blocks() * 512);
        }
    }
    None
}

#[test]
fn on_demand_example_verifies_in_embedded_mode() {
    let text = on_demand(None, 1);
    for want in [
        "embedded mode",
        "child 0",
        "child 1",
        "parent: persistent kernel",
        "refaults",
        "every result verified",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
}

#[test]
fn on_demand_example_with_the_wait_for_jobs_policy_deadlocks_and_ends() {
    let example = bin_dir().join("examples").join("on_demand");
    let out = Proc::spawn(
        "on_demand --wait-for-jobs",
        Command::new(&example)
            .arg("--wait-for-jobs")
            .env_remove("USERQ_DEVICE")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )
    .output_within(Duration::from_secs(120));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(!out.status.success(), "{stdout}{stderr}");
    assert!(
        stderr.contains("DEADLOCK caught") && stderr.contains("a cycle"),
        "{stderr}"
    );
    assert!(stdout.contains("the run deadlocked"), "{stdout}");
}

#[test]
fn deadlock_freedom_stress_three_processes_several_seeds() {
    let vram = VRAM.to_string();
    let daemon = Daemon::start_with(&["--vram", &vram]);
    let kmd = daemon.proc.pid();
    // Sample the pool's residency from outside the whole time.
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(0));
    let samples = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (stop, peak, samples) = (stop.clone(), peak.clone(), samples.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Some(b) = pool_resident(kmd) {
                    peak.fetch_max(b, Ordering::Relaxed);
                    samples.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    for seed in [1, 7, 42] {
        let text = on_demand(Some(&daemon.socket), seed);
        assert!(
            text.contains("every result verified") && text.contains("daemon mode"),
            "seed {seed}:\n{text}"
        );
    }
    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    let peak = peak.load(Ordering::Relaxed);
    assert!(
        samples.load(Ordering::Relaxed) > 10,
        "the pool was never seen"
    );
    assert!(peak > 0, "the pool never held a page");
    // At most the budget (plus a page per engine, the tolerance; the pool memfd
    // is the budget's size, so it cannot hold more).
    assert!(
        peak <= VRAM + 2 * PAGE,
        "pool resident {peak} bytes over a {VRAM}-byte budget"
    );
    daemon.stop();
}

#[test]
fn the_wait_for_jobs_policy_deadlocks_on_the_same_scenario_and_ends_cleanly() {
    let vram = VRAM.to_string();
    let daemon = Daemon::start_with(&["--vram", &vram, "--eviction-waits-for-jobs-ms", "500"]);
    let example = bin_dir().join("examples").join("on_demand");
    let out = Proc::spawn(
        "on_demand (wait-for-jobs)",
        Command::new(&example)
            .env("USERQ_DEVICE", &daemon.socket)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )
    .output_within(Duration::from_secs(120));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success(),
        "the waiting policy should not finish:\n{text}"
    );
    assert!(
        text.contains("EvictionDeadlock") || text.contains("eviction waited for a job"),
        "the deadlock should be named:\n{text}"
    );
    // The daemon is still serving: a fresh context works.
    let dev = userq::Device::connect(&daemon.socket).expect("connect after the deadlock");
    let mut q = dev.create_queue().unwrap();
    let b = dev.alloc_on_demand::<u32>(1024).unwrap();
    q.submit(userq::kernels::fill_u32(1024, 5, &b).unwrap())
        .unwrap()
        .wait(Duration::from_secs(30))
        .unwrap();
    assert!(b.to_vec().iter().all(|&v| v == 5));
    drop((q, b, dev));
    daemon.stop();
}

/// While kmd-shim has a fault to service, the device status says so
/// (`Device::faults_in_service`, and `Device::context_fault_in_service` for the faulting
/// context, whose spinning waits give way on it), and it says so no longer once the reply
/// came. kmd-shim is frozen with SIGSTOP to hold the fault there.
#[test]
fn a_fault_is_counted_in_service_until_kmd_shim_replies() {
    use rustix::process::Signal;
    let daemon = Daemon::start();
    let dev = userq::Device::connect(&daemon.socket).expect("connect");
    // Another context, connected now (kmd-shim will be frozen): its bit stays clear.
    let other = userq::Device::connect(&daemon.socket).expect("connect another context");
    assert_ne!(dev.context_id() % 64, other.context_id() % 64);
    let mut q = dev.create_queue().expect("queue");
    let words = 1024;
    let b = dev.alloc_on_demand::<u32>(words).expect("on-demand buffer");
    let fill = |v| userq::kernels::fill_u32(words as u32, v, &b).expect("fill");
    // The first dispatch allocates the queue's argument area (a control call) and faults
    // the page in; then the page goes back to the host, so the next dispatch faults.
    q.submit(fill(7))
        .unwrap()
        .wait(Duration::from_secs(30))
        .unwrap();
    b.migrate_to_host(0..words).expect("migrate to host");
    let settled = |want: u32| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while dev.faults_in_service() != want {
            if std::time::Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    };
    assert!(
        settled(0),
        "no fault should be in service after the first dispatch"
    );

    // Declared after the queue and the buffer, so dropped before them if an assertion
    // fails while kmd-shim is frozen: their drops are calls kmd-shim must answer.
    struct Thaw<'a>(&'a Proc);
    impl Drop for Thaw<'_> {
        fn drop(&mut self) {
            self.0.signal(Signal::CONT);
        }
    }
    let thaw = Thaw(&daemon.proc);
    daemon.proc.signal(Signal::STOP);
    // SIGSTOP takes effect asynchronously: wait until every kmd-shim thread has stopped,
    // so that none services the fault before it is seen counted.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !all_threads_stopped(daemon.proc.pid()) {
        assert!(
            std::time::Instant::now() < deadline,
            "kmd-shim did not stop"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let point = q.submit(fill(9)).unwrap();
    let counted = settled(1);
    let (own_bit, other_bit) = (
        dev.context_fault_in_service(),
        other.context_fault_in_service(),
    );
    let done_while_frozen = point.poll();
    drop(thaw);
    assert!(counted, "the fault was never counted in service");
    assert!(own_bit, "the faulting context's bit was not set");
    assert!(!other_bit, "another context's bit was set");
    assert_eq!(
        done_while_frozen,
        Ok(false),
        "the faulting dispatch completed with kmd-shim frozen"
    );
    point
        .wait_with(userq::WaitMode::Spin, Duration::from_secs(30))
        .expect("the dispatch completes once kmd-shim runs");
    assert!(settled(0), "the fault stayed counted after its reply");
    assert!(
        !dev.context_fault_in_service(),
        "the context's bit stayed set after the reply"
    );
    assert!(b.to_vec().iter().all(|&v| v == 9));
    drop((point, q, b, dev, other));
    daemon.stop();
}
