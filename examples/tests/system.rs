//! Multi-process system tests: real kmd-shim and fw-emu processes (daemon mode) or a device
//! embedded in this test process, with real client processes.

mod common;

use common::*;
use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use userq::uapi::observe::Footprint;
use userq::{Device, ErrorCode, ExportedFence, OpenMode, WaitError};

/// Runs `n` clients with `args` at once; each must print `ok`.
fn all_ok(socket: &std::path::Path, n: usize, args: &[&str]) {
    let clients: Vec<_> = (0..n).map(|_| client(socket, args)).collect();
    for c in clients {
        assert_eq!(c.succeeded(Duration::from_secs(120)).trim(), "ok");
    }
}

#[test]
fn several_clients_with_several_queues_complete_in_order_in_daemon_mode() {
    let daemon = Daemon::start();
    // 400 packets through 16-entry rings: 25 wrap-arounds per queue, with back-pressure.
    all_ok(&daemon.socket, 3, &["worker", "4", "400", "16"]);
    daemon.stop();
}

#[test]
fn clients_join_a_device_embedded_in_another_process() {
    let dir = TempDir::new("embedded");
    let sock = dir.path().join("dev.sock");
    let dev = Device::builder()
        .socket(&sock)
        .mode(OpenMode::Embedded)
        .open()
        .expect("embedded device");
    assert!(dev.is_embedded());
    let clients: Vec<_> = (0..2)
        .map(|_| client(&sock, &["worker", "3", "200", "8"]))
        .collect();
    for c in clients {
        c.succeeded(Duration::from_secs(60));
    }
    drop(dev);
    assert!(!sock.exists(), "the embedded device left its socket behind");
}

#[test]
fn ping_pong_example_runs_across_processes_in_daemon_and_embedded_mode() {
    let daemon = Daemon::start();
    let text = run_example("ping_pong", Some(&daemon.socket));
    assert!(
        text.contains("daemon mode") && text.contains("order verified"),
        "{text}"
    );
    daemon.stop();
    // Embedded: the parent starts the device in its runtime directory, the child joins it.
    let text = run_example("ping_pong", None);
    assert!(
        text.contains("embedded mode") && text.contains("order verified"),
        "{text}"
    );
}

#[test]
fn client_killed_mid_stream_is_reclaimed_and_others_finish() {
    let daemon = Daemon::start();
    let observer = Device::connect(&daemon.socket).expect("connect");
    let rv_dir = TempDir::new("rendezvous");
    for round in 0..3 {
        let rv = rv_dir.path().join(format!("rv{round}.sock"));
        let listener = UnixListener::bind(&rv).expect("bind rendezvous");
        let mut victim = client(&daemon.socket, &["victim", rv.to_str().expect("utf-8")]);
        let (sock, _) = listener.accept().expect("victim connects");
        let fence = observer
            .import_fence(ExportedFence::recv(&sock).expect("victim's fence"))
            .expect("import");
        let stdout = victim
            .child
            .as_mut()
            .and_then(|c| c.stdout.take())
            .expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).expect("read");
        assert_eq!(line.trim(), "ready");

        let bystander = client(&daemon.socket, &["worker", "2", "300", "16"]);
        // Kill while the victim is submitting in a loop.
        victim.signal(rustix::process::Signal::KILL);
        victim.wait_for(Duration::from_secs(10));

        // The victim's fence can never be signalled now: waiters get an error, not a hang.
        match fence.wait(1, Duration::from_secs(10)) {
            Err(WaitError::Faulted(f)) => assert_eq!(f.code, Some(ErrorCode::OwnerDied)),
            other => panic!("expected OwnerDied, got {other:?}"),
        }
        bystander.succeeded(Duration::from_secs(60));
    }
    // The device still serves new clients.
    assert_eq!(
        run_client(&daemon.socket, &["worker", "1", "50", "8"]).trim(),
        "ok"
    );
    drop(observer);
    daemon.stop();
}

#[test]
fn each_bad_input_stops_only_the_offending_queue() {
    let daemon = Daemon::start();
    let bystander = client(&daemon.socket, &["worker", "2", "2000", "32"]);
    let cases = [
        ("bad-opcode", "fault UnknownOpcode packet=1"),
        ("reserved-bits", "fault ReservedField packet=0"),
        ("misaligned", "fault MisalignedAddress packet=0"),
        ("foreign-address", "fault MemoryViolation packet=0"),
        ("bad-handle", "fault BadFenceHandle packet=0"),
        ("signal-timeline", "fault FenceNotWritable packet=0"),
        ("wptr-backwards", "fault BadWriteIndex packet=2 address=0x1"),
        ("wptr-overrun", "fault BadWriteIndex packet=0 address=0xd"),
        ("garbage-doorbell", "completed 1"),
        ("write-readonly", "refused"),
    ];
    for (case, expected) in cases {
        let out = run_client(&daemon.socket, &["hostile", case]);
        assert!(
            out.starts_with(expected),
            "{case}: expected {expected:?}, got {out:?}"
        );
    }
    assert!(alive(daemon.fw_pid), "fw-emu must survive bad input");
    bystander.succeeded(Duration::from_secs(60));
    assert_eq!(
        run_client(&daemon.socket, &["worker", "1", "20", "4"]).trim(),
        "ok"
    );
    daemon.stop();
}

#[test]
fn rings_full_of_random_bytes_and_wild_indices_stop_only_their_queues() {
    let daemon = Daemon::start();
    let bystander = client(&daemon.socket, &["worker", "2", "2000", "32"]);
    for seed in [1u64, 0x5eed, 0xdead_beef] {
        let out = run_client(
            &daemon.socket,
            &["hostile", &format!("random-rings:{seed}")],
        );
        assert!(
            out.starts_with("survived 40 rounds")
                && out.trim_end().ends_with("a fresh queue completed"),
            "seed {seed}: {out:?}"
        );
    }
    assert!(alive(daemon.fw_pid), "fw-emu must survive ring garbage");
    bystander.succeeded(Duration::from_secs(60));
    assert_eq!(
        run_client(&daemon.socket, &["worker", "1", "20", "4"]).trim(),
        "ok"
    );
    daemon.stop();
}

#[test]
fn idle_firmware_process_uses_under_two_percent_of_a_core() {
    let daemon = Daemon::start();
    run_client(&daemon.socket, &["worker", "2", "500", "64"]);
    // 10 ms without work is the budget; give it 200 ms, then measure 2 s.
    std::thread::sleep(Duration::from_millis(200));
    let stat = format!("/proc/{}/stat", daemon.fw_pid);
    let hz = rustix::param::clock_ticks_per_second() as f64;
    let (t0, c0) = (Instant::now(), cpu_ticks(&stat));
    std::thread::sleep(Duration::from_secs(2));
    let (secs, ticks) = (t0.elapsed().as_secs_f64(), cpu_ticks(&stat) - c0);
    let share = ticks as f64 / hz / secs;
    assert!(
        share < 0.02,
        "idle fw-emu used {:.1}% of a core",
        share * 100.0
    );
    daemon.stop();
}

#[test]
fn waiters_get_device_lost_when_the_process_serving_the_device_is_killed() {
    let dir = TempDir::new("host");
    let sock = dir.path().join("dev.sock");
    let mut host = host_embedded(&sock, None);

    let dev = Device::connect(&sock).expect("connect");
    let fence = dev.create_fence(0).expect("fence");
    let waiter = std::thread::spawn(move || {
        let t = Instant::now();
        (fence.wait(1, Duration::MAX), t.elapsed())
    });
    std::thread::sleep(Duration::from_millis(100));
    host.signal(rustix::process::Signal::KILL);
    host.wait_for(Duration::from_secs(10));
    let (result, took) = waiter.join().expect("waiter");
    assert_eq!(result, Err(WaitError::DeviceLost));
    assert!(took < Duration::from_secs(10), "noticed after {took:?}");
    assert!(dev.is_lost());
}

/// Runs an example against a daemon (`Some(socket)`) or with a device embedded in it
/// (`None`, in a private runtime directory that must be left clean), and returns its
/// stdout; fails on error.
fn run_example(name: &str, daemon: Option<&std::path::Path>) -> String {
    let example = bin_dir().join("examples").join(name);
    assert!(
        example.exists(),
        "examples are built by `cargo test --workspace`"
    );
    let runtime_dir = TempDir::new(name);
    let mut cmd = Command::new(&example);
    match daemon {
        Some(socket) => cmd.env("USERQ_DEVICE", socket),
        None => cmd
            .env_remove("USERQ_DEVICE")
            .env("XDG_RUNTIME_DIR", runtime_dir.path()),
    };
    let text = Proc::spawn(name, cmd.stdout(Stdio::piped()).stderr(Stdio::piped()))
        .succeeded(Duration::from_secs(60));
    assert!(
        !runtime_dir.path().join("userq/dev0.sock").exists(),
        "{name} left its socket behind"
    );
    text
}

#[test]
fn persistent_example_serves_its_mailbox_and_stops() {
    let text = run_example("persistent", None);
    assert!(
        text.contains("2000 requests answered") && text.contains("stopped when asked"),
        "{text}"
    );
}

#[test]
fn reset_example_resets_the_hung_queue_bans_and_restarts_the_firmware() {
    let text = run_example("reset", None);
    for want in [
        "detected and its queue reset after",
        "none lost",
        "the guilty one Guilty",
        "banned true",
        "still runs verified work",
        "restarted as generation 2",
        "the old one reports lost: true",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
}

#[test]
fn saxpy_example_verifies_against_the_cpu() {
    let text = run_example("saxpy", None);
    assert!(text.contains("max |error| vs CPU = 0"), "{text}");
}

#[test]
fn pipeline_example_shares_buffers_and_fences_between_processes_in_both_modes() {
    let daemon = Daemon::start();
    for socket in [Some(daemon.socket.as_path()), None] {
        let text = run_example("pipeline", socket);
        assert!(
            text.contains("consumer verified 5000000 elements"),
            "{text}"
        );
    }
    daemon.stop();
}

#[test]
fn a_no_progress_kernel_on_every_engine_does_not_stop_another_process() {
    let daemon = Daemon::start();
    let dev = Device::connect(&daemon.socket).expect("connect");
    let mut stuck = dev
        .queue()
        .job_timeout(Duration::from_millis(300))
        .create()
        .expect("queue");
    // More workgroups than any machine here has engines: every engine is held.
    let hung = stuck
        .submit(userq::kernels::no_progress_wide(64))
        .expect("submit");
    std::thread::sleep(Duration::from_millis(20));
    // Another process's dependent dispatches complete (after the reset frees the engines)
    // with correct results, within the client's own 30 s bounds.
    assert_eq!(
        run_client(&daemon.socket, &["compute", "2", "3"]).trim(),
        "ok"
    );
    match hung.wait(Duration::from_secs(30)) {
        Err(WaitError::Faulted(f)) => assert_eq!(f.code, Some(ErrorCode::JobTimeout)),
        other => panic!("expected the hung queue reset, got {other:?}"),
    }
    drop((stuck, dev));
    daemon.stop();
}

#[test]
fn sixty_four_queues_from_four_processes_all_complete() {
    let daemon = Daemon::start();
    all_ok(&daemon.socket, 4, &["compute", "16", "10"]);
    daemon.stop();
}

#[test]
fn a_custom_firmware_program_serves_its_own_kernel_in_daemon_layout() {
    // The example's own demo: kmd-shim's library with the example as firmware process.
    let text = run_example("custom_firmware", None);
    assert!(text.contains("10000 results match the CPU"), "{text}");
    // And with the kmd-shim daemon, as the example's documentation says.
    let fw = bin_dir().join("examples").join("custom_firmware");
    let dir = TempDir::new("custom-fw");
    let socket = dir.path().join("dev.sock");
    let mut kmd = Proc::spawn(
        "kmd-shim --fw custom_firmware",
        Command::new(workspace_bin("kmd-shim"))
            .arg("--socket")
            .arg(&socket)
            .arg("--fw")
            .arg(&fw)
            .arg("--quiet")
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while Device::connect(&socket).is_err() {
        assert!(Instant::now() < deadline, "kmd-shim did not come up");
        std::thread::sleep(Duration::from_millis(10));
    }
    let dev = Device::connect(&socket).expect("connect");
    let out = dev.alloc::<u32>(27).expect("buffer");
    let mut q = dev.create_queue().expect("queue");
    let collatz = userq::kernels::FIRST_CUSTOM + 42;
    q.submit(userq::Command::dispatch(
        collatz,
        [27, 1, 1],
        [8, 1, 1],
        &[
            userq::KernelArg::U64(27),
            userq::KernelArg::Address(out.device_address()),
        ],
    ))
    .expect("submit")
    .wait(Duration::from_secs(10))
    .expect("the custom kernel runs");
    assert_eq!(out.read(26), 111, "27 takes 111 Collatz steps");
    drop((q, out, dev));
    kmd.signal(rustix::process::Signal::TERM);
    assert!(kmd.wait_for(Duration::from_secs(10)).success());
}

/// Open descriptors and resident kilobytes of a process.
fn footprint(pid: u32) -> (usize, u64) {
    let f = Footprint::of(pid);
    (f.fds, f.rss_kb)
}

#[test]
fn clients_killed_at_random_points_leave_the_daemon_at_baseline() {
    let daemon = Daemon::start();
    let observer = Device::connect(&daemon.socket).expect("connect");
    let rv_dir = TempDir::new("kills");
    let kmd = daemon.proc.pid();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let mut baseline = None;
    for round in 0..24 {
        let rv = rv_dir.path().join(format!("rv{round}.sock"));
        let listener = UnixListener::bind(&rv).expect("bind rendezvous");
        // A client submitting in a loop and holding an exported fence, or one blocked in
        // waits on fences it imported.
        let blocked = next(2) == 0;
        let mode = if blocked { "blocked" } else { "victim" };
        let mut c = client(&daemon.socket, &[mode, rv.to_str().expect("utf-8")]);
        let (sock, _) = listener.accept().expect("client connects");
        let mine = observer.create_fence(0).expect("fence");
        let theirs = if blocked {
            mine.export().unwrap().send(&sock).unwrap();
            mine.export().unwrap().send(&sock).unwrap();
            None
        } else {
            Some(
                observer
                    .import_fence(ExportedFence::recv(&sock).expect("victim's fence"))
                    .expect("import"),
            )
        };
        let out = c.child.as_mut().and_then(|c| c.stdout.take()).unwrap();
        let mut line = String::new();
        BufReader::new(out).read_line(&mut line).expect("read");
        assert_eq!(line.trim(), "ready");
        std::thread::sleep(Duration::from_millis(next(30)));
        c.signal(rustix::process::Signal::KILL);
        c.wait_for(Duration::from_secs(10));
        if let Some(f) = theirs {
            // No waiter stuck: the dead owner's fence fails.
            match f.wait(1, Duration::from_secs(10)) {
                Err(WaitError::Faulted(e)) => assert_eq!(e.code, Some(ErrorCode::OwnerDied)),
                other => panic!("round {round}: expected OwnerDied, got {other:?}"),
            }
        }
        // Our own fence is still ours: a signal works and wakes.
        mine.signal(1).unwrap();
        assert_eq!(mine.wait(1, Duration::from_secs(10)), Ok(()));
        if round == 3 {
            // After a few rounds every table and pool has its working size.
            std::thread::sleep(Duration::from_millis(200));
            baseline = Some((footprint(kmd), footprint(daemon.fw_pid)));
        }
    }
    let ((kfd, krss), (ffd, frss)) = baseline.expect("baseline");
    // The last connections close asynchronously: give kmd-shim a moment to reclaim.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ((k, kr), (f, fr)) = (footprint(kmd), footprint(daemon.fw_pid));
        let back = k <= kfd && f <= ffd && kr <= krss + 8192 && fr <= frss + 8192;
        if back {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not back at baseline: kmd-shim {k} fds {kr} kB (was {kfd}, {krss}), fw-emu {f} fds {fr} kB (was {ffd}, {frss})"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(observer);
    daemon.stop();
}
