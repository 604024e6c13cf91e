//! The `userq` tool against a daemon: `status --json`, `events --json`, `trace` (checked
//! for its tracks, slices, instants, counters and flows), `top` in a pseudo-terminal
//! (quit with `q`, terminal restored), and its bad inputs: not a device, a stale socket,
//! a closed pipe, a device that dies under it.

mod common;
use common::*;
use serde_json::Value;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use userq::{kernels, Device};

fn userq(socket: &std::path::Path, args: &[&str]) -> Command {
    let mut c = Command::new(workspace_bin("userq"));
    c.arg("--socket").arg(socket).args(args);
    c
}

/// Some work on the daemon from this process: two profiled queues, one signalling a fence
/// the other waits on, and dispatches.
fn work(dev: &Device, rounds: u64) {
    let mut a = dev.queue().profiling(true).create().unwrap();
    let mut b = dev.queue().profiling(true).create().unwrap();
    let f = dev.create_fence(0).unwrap();
    let buf = dev.alloc::<u32>(1 << 14).unwrap();
    let small = dev.alloc::<u32>(64).unwrap();
    for i in 1..=rounds {
        b.submit(userq::Command::wait(&f.point(i))).unwrap();
        a.submit(kernels::fill_u32(1 << 14, i as u32, &buf).unwrap())
            .unwrap();
        // One workgroup: the command processor runs it itself.
        a.submit(kernels::fill_u32(64, i as u32, &small).unwrap())
            .unwrap();
        a.submit(userq::Command::signal(&f, i)).unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    b.finish(Duration::from_secs(30)).unwrap();
}

#[test]
fn status_events_and_trace_describe_the_device() {
    let daemon = Daemon::start();
    let dev = Device::connect(&daemon.socket).unwrap();
    let dir = TempDir::new("trace");
    let out = dir.path().join("trace.json");
    // The trace runs while the work does.
    let tracer = Proc::spawn(
        "userq trace",
        userq(&daemon.socket, &["trace", "--seconds", "2", "--out"])
            .arg(&out)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    std::thread::sleep(Duration::from_millis(300));
    work(&dev, 100);
    let said = tracer.succeeded(Duration::from_secs(30));
    assert!(said.contains("profiled queue"), "{said}");

    let trace: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let evs = trace["traceEvents"].as_array().unwrap();
    let ph = |p: &str| evs.iter().filter(|e| e["ph"] == p).count();
    let me = std::process::id();
    // Our process and its two queue tracks.
    assert!(evs.iter().any(|e| e["ph"] == "M"
        && e["name"] == "process_name"
        && e["pid"] == me
        && e["args"]["name"]
            .as_str()
            .unwrap()
            .contains(&format!("pid {me}"))));
    assert!(
        evs.iter()
            .filter(|e| e["ph"] == "M" && e["name"] == "thread_name" && e["pid"] == me)
            .count()
            >= 2
    );
    // Slices: dispatches, signals, waits; each with its packet index.
    let names: Vec<&str> = evs
        .iter()
        .filter(|e| e["ph"] == "X")
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert!(
        names.iter().any(|n| n.starts_with("dispatch kernel")),
        "{names:?}"
    );
    assert!(names.iter().any(|n| n.starts_with("signal fence")));
    assert!(names.iter().any(|n| n.starts_with("wait fence")));
    assert!(evs
        .iter()
        .filter(|e| e["ph"] == "X")
        .all(|e| e["args"]["packet"].is_u64()));
    // Flows from signals to the waits they released, in pairs.
    assert!(ph("s") >= 50, "{} flows", ph("s"));
    assert_eq!(ph("s"), ph("f"));
    // Engine counters (one track per engine and one for the command processor's inline
    // dispatches, every 10 ms) and the queue-created instants of our queues.
    assert!(ph("C") > 10);
    let inline_samples = evs
        .iter()
        .filter(|e| e["ph"] == "C" && e["name"] == "command processor inline busy %")
        .count();
    assert!(inline_samples > 10, "{inline_samples} inline samples");
    assert!(evs
        .iter()
        .any(|e| e["ph"] == "i" && e["name"] == "queue-created" && e["pid"] == me));

    // status --json lists this process and its queues.
    let _q = dev.create_queue().unwrap();
    let out = userq(&daemon.socket, &["status", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["state"], "running");
    assert!(s["memory"]["vram_bytes"].as_u64().unwrap() > 0);
    assert!(!s["engines"].as_array().unwrap().is_empty());
    let mine = s["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pid"] == me)
        .expect("this process is listed");
    assert!(mine["engine_ns"].as_u64().unwrap() > 0);
    // The 100 one-workgroup fills ran on the command processor.
    let inline = &s["command_processor_inline"];
    assert!(inline["workgroups"].as_u64().unwrap() >= 100, "{inline}");
    assert!(inline["busy_ns"].as_u64().unwrap() > 0, "{inline}");
    assert!(inline["utilisation"].is_f64(), "{inline}");
    assert!(!mine["queues"].as_array().unwrap().is_empty());

    // events --json from the start: this process's context, as JSON lines.
    let out = userq(
        &daemon.socket,
        &["events", "--json", "--from-start", "--seconds", "0.2"],
    )
    .output()
    .unwrap();
    assert!(out.status.success());
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines
        .iter()
        .any(|e| e["kind"] == "process-start" && e["pid"] == me));
    drop(dev);
    daemon.stop();
}

#[test]
fn top_runs_in_a_terminal_and_quits_on_q() {
    let daemon = Daemon::start();
    let _dev = Device::connect(&daemon.socket).unwrap();
    // A pseudo-terminal from `script`: top draws, then reads `q` from it.
    // A pty from `script` has no size until told one.
    let cmd = format!(
        "stty cols 120 rows 30; {} --socket {} top --interval-ms 100",
        workspace_bin("userq").display(),
        daemon.socket.display()
    );
    let mut p = Proc::spawn(
        "script userq top",
        Command::new("script")
            .args(["-qfec", &cmd, "/dev/null"])
            .env("TERM", "xterm")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    std::thread::sleep(Duration::from_millis(1500));
    p.child().stdin.take().unwrap().write_all(b"q").unwrap();
    let out = p.output_within(Duration::from_secs(20));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    // Drawn (words come with cursor moves between them): the header and the table.
    assert!(
        text.contains("userq")
            && text.contains("queues")
            && text.contains("STATE")
            && text.contains("processor"),
        "{text}"
    );
    // Left the alternate screen: the terminal is back.
    assert!(
        text.contains("\u{1b}[?1049l"),
        "terminal not restored: {text:?}"
    );
    daemon.stop();
}

#[test]
fn bad_devices_and_pipes_are_clear_errors() {
    let dir = TempDir::new("userq-bad");
    // Not a socket at all.
    let file = dir.path().join("plain");
    std::fs::write(&file, b"x").unwrap();
    let out = userq(&file, &["status"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot connect"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    // A stale socket file nobody serves.
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let out = userq(&stale, &["events"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot connect"));

    // Output to a closed pipe: quiet, non-zero, no panic.
    let daemon = Daemon::start();
    for _ in 0..20 {
        drop(Device::connect(&daemon.socket).unwrap());
    }
    let mut p = userq(&daemon.socket, &["events", "--from-start"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(p.stdout.take());
    let t = Instant::now();
    let status = loop {
        if let Some(s) = p.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "events kept writing to a closed pipe"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut p.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success());
    assert!(!err.contains("panicked"), "{err}");

    // The device dies under a follower: it says so and exits non-zero.
    let follower = Proc::spawn(
        "userq events",
        userq(&daemon.socket, &["events"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    std::thread::sleep(Duration::from_millis(300));
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(daemon.fw_pid as i32).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    let out = follower.output_within(Duration::from_secs(20));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("lost"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(daemon);
}
