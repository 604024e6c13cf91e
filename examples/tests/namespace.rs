//! A daemon in its own PID namespace (as in a container) serves clients it cannot see: the
//! kernel reports their pid as 0, which must label the context, not refuse it.

mod common;

use common::Daemon;
use std::process::{Command, Stdio};
use std::time::Duration;
use userq::{Command as Packet, Device, WaitMode};

/// A new PID namespace: as root, or (for anyone else) inside a new user namespace that
/// maps this user to its root, where the peer checks pass both ways all the same.
const UNSHARE: [&[&str]; 2] = [
    &["unshare", "--pid", "--fork", "--kill-child"],
    &[
        "unshare",
        "--user",
        "--map-root-user",
        "--pid",
        "--fork",
        "--kill-child",
    ],
];

/// The first way this machine lets the test make a PID namespace.
fn unshare() -> Option<&'static [&'static str]> {
    UNSHARE.into_iter().find(|u| {
        Command::new(u[0])
            .args(&u[1..])
            .arg("true")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

#[test]
fn a_daemon_in_its_own_pid_namespace_serves_clients_outside_it() {
    let Some(wrapper) = unshare() else {
        eprintln!("skipped: no PID namespace can be made here (not root, no user namespaces)");
        return;
    };
    let daemon = Daemon::start_under(wrapper, &[]);
    // Seen from inside the namespace, kmd-shim is its init: the daemon really is there.
    let status = std::fs::read_to_string(format!("/proc/{}/status", daemon.kmd_pid)).unwrap();
    let ns_pids = status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .expect("NSpid line");
    assert_eq!(
        ns_pids.split_whitespace().last(),
        Some("1"),
        "kmd-shim is pid 1 in its namespace ({ns_pids})"
    );

    let dev = Device::connect(&daemon.socket).expect("a client the daemon cannot see connects");
    let mut q = dev.queue().create().unwrap();
    for _ in 0..3 {
        let v = q.enqueue(&[Packet::nop()]).unwrap();
        q.timeline()
            .wait_with(v, WaitMode::Block, Duration::from_secs(10))
            .unwrap();
    }
    // The status tool lists the client's context with no pid to show (0).
    let out = Command::new(common::workspace_bin("userq"))
        .args(["--socket"])
        .arg(&daemon.socket)
        .args(["status", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let pids: Vec<u64> = json["processes"]
        .as_array()
        .expect("processes")
        .iter()
        .filter_map(|p| p["pid"].as_u64())
        .collect();
    assert!(
        pids.contains(&0),
        "status lists the invisible client: {json}"
    );
    drop(q);
    drop(dev);
    daemon.stop();
}
