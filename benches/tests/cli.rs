//! The userq-bench command line: bad input is refused with exit code 2, an interrupted run
//! leaves no process behind, and a short run prints well-formed results.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn bench() -> Command {
    Command::new(env!("CARGO_BIN_EXE_userq-bench"))
}

fn descendants(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut stack = vec![pid];
    while let Some(p) = stack.pop() {
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) {
            for t in tasks.flatten() {
                if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
                    for c in s.split_whitespace().filter_map(|x| x.parse::<u32>().ok()) {
                        out.push(c);
                        stack.push(c);
                    }
                }
            }
        }
    }
    out
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(") ")
                .is_some_and(|(_, r)| !r.starts_with('Z'))
        })
        .unwrap_or(false)
}

#[test]
fn bad_flags_and_impossible_sizes_exit_with_code_2() {
    for args in [
        &["--bogus"][..],
        &["--iters"][..],
        &["--iters", "many"][..],
        &["--iters", "5"][..],
        &["--iters", "999999999999"][..],
        &["--plot"][..],
        &["latency", "extra"][..],
    ] {
        let out = bench().args(args).output().expect("run");
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("usage"),
            "{args:?}"
        );
    }
}

/// Kills and reaps the bench (and, through its death signal, its children) even when an
/// assertion fails.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let pid = self.0.id();
        let kids = descendants(pid);
        let _ = self.0.kill();
        let _ = self.0.wait();
        for k in kids {
            if let Some(p) = rustix::process::Pid::from_raw(k as i32) {
                let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
            }
        }
    }
}

/// Starts the bench with `args` (its output discarded, its standard error as given), to be
/// killed and reaped however the test ends.
fn spawn_reaped(args: &[&str], stderr: Stdio) -> Reaped {
    Reaped(
        bench()
            .args(args)
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn"),
    )
}

/// Sends `sig` to process `pid`.
fn signal(pid: u32, sig: rustix::process::Signal) {
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid as i32).expect("pid"),
        sig,
    )
    .expect("kill");
}

/// Waits at most `bound` for `child` to exit; `what` says what it means if it does not.
fn exit_within(
    child: &mut std::process::Child,
    bound: Duration,
    what: &str,
) -> std::process::ExitStatus {
    let deadline = Instant::now() + bound;
    loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            return s;
        }
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn an_interrupted_run_reaps_every_process_it_started() {
    let mut guard = spawn_reaped(&["latency", "--iters", "10000000"], Stdio::null());
    let child = &mut guard.0;
    // Wait until a measurement is running in a child process, then interrupt.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        seen = descendants(child.id());
        if !seen.is_empty() {
            std::thread::sleep(Duration::from_millis(200));
            seen = descendants(child.id());
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!seen.is_empty(), "the run started its processes");
    signal(child.id(), rustix::process::Signal::INT);
    let status = exit_within(
        child,
        Duration::from_secs(10),
        "userq-bench did not stop on SIGINT",
    );
    assert_eq!(status.code(), Some(130));
    let deadline = Instant::now() + Duration::from_secs(5);
    while seen.iter().any(|&p| alive(p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let left: Vec<u32> = seen.into_iter().filter(|&p| alive(p)).collect();
    assert!(left.is_empty(), "left running: {left:?}");
}

/// Runs the bench with `args`, checks that it succeeded, and returns its standard output.
fn run_ok(args: &[&str]) -> Vec<u8> {
    let out = bench().args(args).output().expect("run");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[test]
fn a_short_floor_run_prints_json_with_the_floors() {
    let out = run_ok(&["floors", "--iters", "2000", "--json"]);
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.trim_start().starts_with('{') && text.trim_end().ends_with('}'),
        "{text}"
    );
    assert!(text.contains("\"floor: cache-line ping-pong\""), "{text}");
    assert!(text.contains("\"floor: shared-futex ping-pong\""), "{text}");
    assert!(text.contains("\"p50_ns\":"), "{text}");
}

#[test]
fn a_short_throughput_run_pairs_userq_with_io_uring_and_the_streaming_floor() {
    let out = run_ok(&["throughput", "--quick", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out).expect("JSON");
    if v["throughput_paired"].is_null() {
        // No io_uring on this machine: the run says why.
        let skipped = v["skipped"].to_string();
        assert!(skipped.contains("io_uring"), "{v}");
        return;
    }
    let rounds = v["throughput_paired"]["rounds"].as_array().expect("rounds");
    assert_eq!(rounds.len(), 3, "{v}");
    for r in rounds {
        for key in [
            "userq_ops_per_sec",
            "floor_ops_per_sec",
            "io_uring_ops_per_sec",
        ] {
            assert!(r[key].as_f64().is_some_and(|x| x > 0.0), "{key}: {r}");
        }
    }
    let target = v["targets"]
        .as_array()
        .expect("targets")
        .iter()
        .find(|t| {
            t["target"]
                .as_str()
                .unwrap_or("")
                .contains("batched throughput")
        })
        .expect("the throughput target");
    assert!(target["pass"].is_boolean(), "{target}");
}

#[test]
fn a_floor_whose_partner_dies_ends_the_run_instead_of_waiting_for_good() {
    let mut guard = spawn_reaped(&["floors", "--iters", "10000000"], Stdio::piped());
    let child = &mut guard.0;
    // The cache-line ping-pong's partner, once it runs.
    let deadline = Instant::now() + Duration::from_secs(20);
    let partner = loop {
        let found = descendants(child.id()).into_iter().find(|&p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains("__floor-poll"))
        });
        if let Some(p) = found {
            break p;
        }
        assert!(
            Instant::now() < deadline,
            "the floor's partner never started"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    signal(partner, rustix::process::Signal::KILL);
    // The parent gives up 10 s after the last answer.
    let status = exit_within(
        child,
        Duration::from_secs(40),
        "userq-bench still waits for a dead partner",
    );
    assert!(!status.success());
    let run_dir = std::env::temp_dir().join(format!("userq-bench-{}", child.id()));
    assert!(!run_dir.exists(), "{} left behind", run_dir.display());
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut err)
        .expect("stderr");
    assert!(err.contains("gave no answer"), "{err}");
}
