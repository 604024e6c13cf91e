//! The kmd-shim daemon against clients that break the control protocol.

use rustix::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use userq_uapi::ioctl::{
    op, BufferReply, CreateQueueReply, Priority, RawReply, RawRequest, Reply, Request,
};
use userq_uapi::shm::Sealing;
use userq_uapi::{os, KmdStatus, ABI_VERSION};

/// A daemon on a private socket, killed and reaped on drop even if the test fails.
struct Daemon {
    child: Child,
    dir: PathBuf,
    socket: PathBuf,
}

impl Daemon {
    fn start(tag: &str) -> Daemon {
        let dir = std::env::temp_dir().join(format!("userq-kmd-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let socket = dir.join("dev.sock");
        let child = spawn(&socket).spawn().expect("spawn kmd-shim");
        let d = Daemon { child, dir, socket };
        let deadline = Instant::now() + Duration::from_secs(10);
        while kmd_shim::socket::connect(&d.socket).is_err() {
            assert!(Instant::now() < deadline, "kmd-shim did not come up");
            std::thread::sleep(Duration::from_millis(10));
        }
        d
    }
}

fn spawn(socket: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kmd-shim"));
    c.arg("--socket").arg(socket).arg("--quiet");
    c.stdout(Stdio::null()).stderr(Stdio::piped());
    c
}

impl Drop for Daemon {
    /// SIGTERM first, so kmd-shim stops and reaps its firmware; SIGKILL if it hangs.
    fn drop(&mut self) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).expect("pid");
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn send_raw(
    sock: &OwnedFd,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
) -> (KmdStatus, [u64; 7], Vec<OwnedFd>) {
    os::send_with_fds(sock.as_fd(), bytes, fds).expect("send");
    let mut buf = [0u8; 64];
    let got = os::recv_with_fds(sock.as_fd(), &mut buf).expect("recv");
    assert_eq!(got.len, 64, "every reply is one 64-byte message");
    let r = RawReply::decode(&buf).expect("reply");
    (KmdStatus::from_u32(r.status), r.values, got.fds)
}

fn send(
    sock: &OwnedFd,
    req: Request,
    fds: &[BorrowedFd<'_>],
) -> (KmdStatus, [u64; 7], Vec<OwnedFd>) {
    send_raw(sock, bytemuck::bytes_of(&req.encode()), fds)
}

fn status(sock: &OwnedFd, req: Request) -> KmdStatus {
    send(sock, req, &[]).0
}

#[test]
fn malformed_messages_get_typed_errors_and_the_connection_goes_on() {
    let d = Daemon::start("malformed");
    let s = kmd_shim::socket::connect(&d.socket).expect("connect");
    let queue = Request::CreateQueue {
        ring_entries: 8,
        priority: Priority::Normal,
        time_slice_us: 0,
        watchdog: Default::default(),
        profile: false,
    };

    // An empty message (SEQPACKET carries those) is malformed, not a hang-up.
    assert_eq!(send_raw(&s, &[], &[]).0, KmdStatus::Malformed);
    assert_eq!(send_raw(&s, &[1, 2, 3], &[]).0, KmdStatus::Malformed);
    assert_eq!(send_raw(&s, &[0u8; 200], &[]).0, KmdStatus::Malformed);
    let mut unknown = RawRequest {
        op: 77,
        reserved: 0,
        args: [0; 7],
    };
    assert_eq!(
        send_raw(&s, bytemuck::bytes_of(&unknown), &[]).0,
        KmdStatus::UnknownOp
    );
    unknown.op = op::DESTROY_QUEUE;
    unknown.args[6] = 1;
    assert_eq!(
        send_raw(&s, bytemuck::bytes_of(&unknown), &[]).0,
        KmdStatus::Malformed
    );

    assert_eq!(status(&s, queue), KmdStatus::NoContext);
    assert_eq!(
        status(&s, Request::OpenContext { abi_version: 999 }),
        KmdStatus::AbiMismatch
    );
    let (st, _, fds) = send(
        &s,
        Request::OpenContext {
            abi_version: ABI_VERSION,
        },
        &[],
    );
    // Doorbell page, device status, device kick, the context's waiter counts.
    assert_eq!((st, fds.len()), (KmdStatus::Ok, 4));
    assert_eq!(
        status(
            &s,
            Request::OpenContext {
                abi_version: ABI_VERSION
            }
        ),
        KmdStatus::ContextExists
    );

    for entries in [0, 1, 3, 1 << 17] {
        let r = Request::CreateQueue {
            ring_entries: entries,
            priority: Priority::Low,
            time_slice_us: 0,
            watchdog: Default::default(),
            profile: false,
        };
        assert_eq!(
            status(&s, r),
            KmdStatus::InvalidArgument,
            "{entries} entries"
        );
    }
    let (pr, pw) = rustix::pipe::pipe().expect("pipe");
    assert_eq!(
        send(&s, queue, &[pr.as_fd()]).0,
        KmdStatus::BadFd,
        "fds where none belong"
    );
    assert_eq!(
        send(&s, Request::ImportFence, &[pr.as_fd(), pw.as_fd()]).0,
        KmdStatus::BadFd
    );
    assert_eq!(
        send(&s, Request::ImportFence, &[pr.as_fd()]).0,
        KmdStatus::BadFd
    );
    let m1 = os::create_memfd("not-a-fence", 4096, Sealing::Final).expect("memfd");
    let m2 = os::create_memfd("not-a-fence", 4096, Sealing::Final).expect("memfd");
    assert_eq!(
        send(&s, Request::ImportFence, &[m1.as_fd(), m2.as_fd()]).0,
        KmdStatus::BadFd
    );

    // A real fence's two objects swapped, or mixed with another fence's, are refused too.
    let (st, _, f1) = send(&s, Request::CreateFence { initial: 0 }, &[]);
    assert_eq!(st, KmdStatus::Ok);
    let (_, _, f2) = send(&s, Request::CreateFence { initial: 0 }, &[]);
    assert_eq!(
        send(&s, Request::ImportFence, &[f1[1].as_fd(), f1[0].as_fd()]).0,
        KmdStatus::BadFd
    );
    assert_eq!(
        send(&s, Request::ImportFence, &[f1[0].as_fd(), f2[1].as_fd()]).0,
        KmdStatus::BadFd
    );
    assert_eq!(
        send(&s, Request::ImportFence, &[f1[0].as_fd(), f1[1].as_fd()]).0,
        KmdStatus::Ok
    );

    assert_eq!(
        send(&s, Request::ImportBuffer, &[pr.as_fd()]).0,
        KmdStatus::BadFd
    );
    assert_eq!(
        send(&s, Request::ImportBuffer, &[m1.as_fd()]).0,
        KmdStatus::BadFd
    );
    assert_eq!(send(&s, Request::ImportBuffer, &[]).0, KmdStatus::BadFd);

    use userq_uapi::packet::FenceHandle;
    assert_eq!(
        status(
            &s,
            Request::ReleaseFence {
                handle: FenceHandle(4242)
            }
        ),
        KmdStatus::NotFound
    );
    assert_eq!(
        status(&s, Request::DestroyQueue { slot: 9999 }),
        KmdStatus::NotFound
    );
    assert_eq!(
        status(&s, Request::FreeBuffer { va: 0x1234 }),
        KmdStatus::NotFound
    );
    assert_eq!(
        status(&s, Request::AllocBuffer { size: 0, flags: 0 }),
        KmdStatus::InvalidArgument
    );
    assert_eq!(
        status(
            &s,
            Request::AllocBuffer {
                size: u64::MAX,
                flags: 0
            }
        ),
        KmdStatus::InvalidArgument
    );

    // After all that, the connection still works.
    let (st, v, fds) = send(&s, queue, &[]);
    assert_eq!((st, fds.len()), (KmdStatus::Ok, 3));
    let created = CreateQueueReply::decode(&v).expect("CREATE_QUEUE reply");
    assert_eq!(
        status(&s, Request::DestroyQueue { slot: created.slot }),
        KmdStatus::Ok
    );
    let (st, v, fds) = send(
        &s,
        Request::AllocBuffer {
            size: 100,
            flags: 0,
        },
        &[],
    );
    let buffer = BufferReply::decode(&v).expect("ALLOC_BUFFER reply");
    assert_eq!((st, fds.len(), buffer.size), (KmdStatus::Ok, 1, 100));
    assert_eq!(
        status(&s, Request::FreeBuffer { va: buffer.va }),
        KmdStatus::Ok
    );
}

#[test]
fn a_client_that_vanishes_mid_request_does_not_disturb_another() {
    let d = Daemon::start("vanish");
    for _ in 0..20 {
        let bad = kmd_shim::socket::connect(&d.socket).expect("connect");
        let open = Request::OpenContext {
            abi_version: ABI_VERSION,
        }
        .encode();
        os::send_with_fds(bad.as_fd(), bytemuck::bytes_of(&open), &[]).expect("send");
        let q = Request::CreateQueue {
            ring_entries: 64,
            priority: Priority::High,
            time_slice_us: 0,
            watchdog: Default::default(),
            profile: false,
        }
        .encode();
        os::send_with_fds(bad.as_fd(), bytemuck::bytes_of(&q), &[]).expect("send");
        drop(bad); // gone before reading either reply
    }
    let good = kmd_shim::socket::connect(&d.socket).expect("connect");
    assert_eq!(
        status(
            &good,
            Request::OpenContext {
                abi_version: ABI_VERSION
            }
        ),
        KmdStatus::Ok
    );
    let (st, _, fds) = send(
        &good,
        Request::CreateQueue {
            ring_entries: 8,
            priority: Priority::Normal,
            time_slice_us: 0,
            watchdog: Default::default(),
            profile: false,
        },
        &[],
    );
    assert_eq!((st, fds.len()), (KmdStatus::Ok, 3));
}

#[test]
fn a_second_daemon_on_a_live_socket_is_refused_and_a_stale_socket_is_replaced() {
    let d = Daemon::start("dup");
    let out = spawn(&d.socket).output().expect("run second kmd-shim");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already serving"));
    // The first one is unharmed.
    assert!(kmd_shim::socket::connect(&d.socket).is_ok());
    drop(d);

    let dir = std::env::temp_dir().join(format!("userq-kmd-stale-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let stale = dir.join("dev.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).expect("bind"));
    assert!(stale.exists(), "a dead server's socket file");
    let mut child = spawn(&stale).spawn().expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(10);
    while kmd_shim::socket::connect(&stale).is_err() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let served = kmd_shim::socket::connect(&stale).is_ok();
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(child.id() as i32).expect("pid"),
        rustix::process::Signal::TERM,
    )
    .expect("SIGTERM");
    let status = child.wait().expect("wait");
    let left = stale.exists();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(served, "kmd-shim must replace a stale socket file");
    assert!(status.success(), "SIGTERM is a clean shutdown: {status}");
    assert!(!left, "socket removed on shutdown");
}

#[test]
fn bad_flags_exit_with_code_2() {
    for args in [
        &["--bogus"][..],
        &["--socket"][..],
        &["--fw", "/nonexistent/fw-emu"][..],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_kmd-shim"))
            .args(args)
            .output()
            .expect("run");
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(!out.stderr.is_empty());
    }
}

#[test]
fn repeat_imports_of_a_fence_share_one_handle_and_count_their_releases() {
    use userq_uapi::ioctl::{CreateFenceReply, ImportFenceReply};
    let d = Daemon::start("reimport");
    let open = Request::OpenContext {
        abi_version: ABI_VERSION,
    };
    let a = kmd_shim::socket::connect(&d.socket).expect("connect");
    assert_eq!(status(&a, open), KmdStatus::Ok);
    let b = kmd_shim::socket::connect(&d.socket).expect("connect");
    assert_eq!(status(&b, open), KmdStatus::Ok);
    let (st, v, fds) = send(&a, Request::CreateFence { initial: 0 }, &[]);
    assert_eq!(st, KmdStatus::Ok);
    let created = CreateFenceReply::decode(&v).expect("reply");
    let import = |sock: &OwnedFd| {
        let (st, v, _) = send(
            sock,
            Request::ImportFence,
            &[fds[0].as_fd(), fds[1].as_fd()],
        );
        assert_eq!(st, KmdStatus::Ok);
        ImportFenceReply::decode(&v).expect("reply")
    };
    // The creator importing its own fence gets its handle back.
    assert_eq!(import(&a).handle, created.handle);
    // More imports than the 4080 handles a context may hold: one handle, one waiter slot.
    let first = import(&b);
    const IMPORTS: usize = 5000;
    for _ in 1..IMPORTS {
        let again = import(&b);
        assert_eq!(
            (again.handle, again.waiter, again.fence),
            (first.handle, first.waiter, first.fence)
        );
    }
    // Each import is released once; the handle goes with the last.
    let release = Request::ReleaseFence {
        handle: first.handle,
    };
    for _ in 0..IMPORTS {
        assert_eq!(status(&b, release), KmdStatus::Ok);
    }
    assert_eq!(status(&b, release), KmdStatus::NotFound);
    // A fresh import after that is a new handle.
    assert_ne!(import(&b).handle, first.handle);
    // The creator's handle has two references (creation and its own import).
    let release_a = Request::ReleaseFence {
        handle: created.handle,
    };
    assert_eq!(status(&a, release_a), KmdStatus::Ok);
    assert_eq!(status(&a, release_a), KmdStatus::Ok);
    assert_eq!(status(&a, release_a), KmdStatus::NotFound);
}
