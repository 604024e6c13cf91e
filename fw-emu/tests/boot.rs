//! The fw-emu executable refuses to run without a valid object channel, and exits instead of
//! crashing or spinning when what it is sent is wrong.

use rustix::fd::{AsFd, AsRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use userq_uapi::fwmsg::boot;
use userq_uapi::os;
use userq_uapi::shm::Sealing;

fn fw_emu_with_channel(channel: &OwnedFd) -> std::process::Child {
    use std::os::unix::process::CommandExt;
    let raw = channel.as_raw_fd();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fw-emu"));
    cmd.arg("--channel-fd").arg(raw.to_string());
    cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    // SAFETY: runs in the forked child before exec; fcntl is async-signal-safe and `raw` is
    // a descriptor the child inherited.
    unsafe {
        cmd.pre_exec(move || {
            let fd = rustix::fd::BorrowedFd::borrow_raw(raw);
            rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::empty())?;
            Ok(())
        });
    }
    cmd.spawn().expect("spawn fw-emu")
}

fn exit_within(child: &mut std::process::Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            return s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("fw-emu did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn pair() -> (OwnedFd, OwnedFd) {
    rustix::net::socketpair(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::SEQPACKET,
        rustix::net::SocketFlags::CLOEXEC,
        None,
    )
    .expect("socketpair")
}

#[test]
fn without_a_channel_it_exits_with_a_usage_error() {
    for args in [
        &[][..],
        &["--channel-fd", "x"][..],
        &["--channel-fd", "1"][..],
        &["--channel-fd", "999"][..],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_fw-emu"))
            .args(args)
            .output()
            .expect("run");
        assert_eq!(out.status.code(), Some(2), "{args:?}");
    }
}

#[test]
fn a_closed_channel_makes_it_exit_not_hang() {
    let (ours, theirs) = pair();
    let mut child = fw_emu_with_channel(&theirs);
    drop(theirs);
    drop(ours);
    let status = exit_within(&mut child, Duration::from_secs(10));
    assert!(!status.success());
}

#[test]
fn boot_objects_of_the_wrong_kind_are_refused() {
    let (ours, theirs) = pair();
    let mut child = fw_emu_with_channel(&theirs);
    drop(theirs);
    // A zeroed object where the control region belongs: no magic, so boot must fail.
    let fd = os::create_memfd("garbage", 64 << 10, Sealing::Final).expect("memfd");
    os::send_with_fds(ours.as_fd(), &boot::CONTROL.to_le_bytes(), &[fd.as_fd()]).expect("send");
    let status = exit_within(&mut child, Duration::from_secs(10));
    let mut err = String::new();
    use std::io::Read;
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err)
        .expect("read");
    assert!(!status.success());
    assert!(err.contains("boot failed"), "{err}");
}
