//! Connections that misuse the socket itself rather than the messages: descriptors that
//! are not memfds, replies that are never read, more connections with a context than the
//! server takes. None of them may hold a worker or leave a newcomer without an answer.

mod common;

use common::Device;
use rustix::fd::{AsFd, BorrowedFd, OwnedFd};
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};
use userq_uapi::ioctl::{RawReply, Request};
use userq_uapi::{os, KmdStatus, ABI_VERSION};

/// The bound on any one answer: far above a healthy one (microseconds), far below the
/// minute a lingering close would hold a worker.
const ANSWER: Duration = Duration::from_secs(10);

/// A connection whose answers are waited for at most [`ANSWER`].
fn connect(kmd: &kmd_shim::Kmd) -> OwnedFd {
    let s = kmd_shim::socket::connect(kmd.socket_path()).expect("connect");
    for t in [
        rustix::net::sockopt::Timeout::Recv,
        rustix::net::sockopt::Timeout::Send,
    ] {
        rustix::net::sockopt::set_socket_timeout(&s, t, Some(ANSWER)).expect("timeout");
    }
    s
}

fn send(sock: &OwnedFd, req: Request, fds: &[BorrowedFd<'_>]) -> std::io::Result<()> {
    os::send_with_fds(sock.as_fd(), bytemuck::bytes_of(&req.encode()), fds).map_err(Into::into)
}

/// The next answer's status; `None` when the connection was closed.
///
/// A server that turns a connection away answers and closes it. A request of ours still
/// unread at that close makes the next receive report a reset, and the answer comes after
/// it, as the runtime reads it (`exchange` in `runtime/src/device/inner.rs`).
fn answer(sock: &OwnedFd) -> Option<KmdStatus> {
    let mut buf = [0u8; 64];
    let got = match os::recv_with_fds(sock.as_fd(), &mut buf) {
        Err(rustix::io::Errno::CONNRESET) => os::recv_with_fds(sock.as_fd(), &mut buf),
        other => other,
    }
    .expect("an answer within the bound");
    (got.len > 0).then(|| {
        let r = RawReply::decode(&buf[..got.len]).expect("reply");
        KmdStatus::from_u32(r.status)
    })
}

const OPEN: Request = Request::OpenContext {
    abi_version: ABI_VERSION,
};

/// A TCP socket lingering for a minute with unsent data (its peer never reads): the last
/// close of it waits that minute.
fn lingering_socket() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let mut stream = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
    let (peer, _) = listener.accept().expect("accept");
    stream.set_nonblocking(true).expect("nonblocking");
    let chunk = [7u8; 65536];
    let mut sent = 0usize;
    while sent < 64 << 20 {
        match stream.write(&chunk) {
            Ok(n) => sent += n,
            Err(_) => break, // full
        }
    }
    assert!(sent > 0);
    rustix::net::sockopt::set_socket_linger(&stream, Some(Duration::from_secs(60)))
        .expect("linger");
    (stream, peer)
}

#[test]
fn descriptors_that_are_not_memfds_get_bad_fd_and_hold_no_worker() {
    let dev = Device::start("conn-fds", |_| {});
    let kmd = dev.kmd();
    let workers = kmd_shim::ServerLimits::default().workers;
    let started = Instant::now();
    // More lingering sockets than there are workers, each sent as the buffer of an
    // IMPORT_BUFFER and closed on this side at once, so kmd-shim holds the last copy.
    for i in 0..workers + 2 {
        let s = connect(kmd);
        assert_eq!(answer_to(&s, OPEN), Some(KmdStatus::Ok));
        let (stream, _peer) = lingering_socket();
        send(&s, Request::ImportBuffer, &[stream.as_fd()]).expect("send");
        drop(stream);
        assert_eq!(answer(&s), Some(KmdStatus::BadFd), "socket {i}");
        // The connection goes on.
        assert_eq!(answer_to(&s, OPEN), Some(KmdStatus::ContextExists));
    }
    // A pipe, and a memfd beside a pipe: the request is refused whole.
    let s = connect(kmd);
    assert_eq!(answer_to(&s, OPEN), Some(KmdStatus::Ok));
    let (r, _w) = rustix::pipe::pipe().expect("pipe");
    send(&s, Request::ImportBuffer, &[r.as_fd()]).expect("send");
    assert_eq!(answer(&s), Some(KmdStatus::BadFd));
    let memfd = os::create_memfd("t", 4096, userq_uapi::shm::Sealing::Final).expect("memfd");
    send(&s, Request::ImportFence, &[memfd.as_fd(), r.as_fd()]).expect("send");
    assert_eq!(answer(&s), Some(KmdStatus::BadFd));
    // A newcomer is served: no worker is closing a socket.
    let fresh = connect(kmd);
    assert_eq!(answer_to(&fresh, OPEN), Some(KmdStatus::Ok));
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
}

fn answer_to(sock: &OwnedFd, req: Request) -> Option<KmdStatus> {
    send(sock, req, &[]).expect("send");
    answer(sock)
}

#[test]
fn a_client_that_does_not_read_its_answers_loses_its_connection() {
    let dev = Device::start("conn-unread", |_| {});
    let kmd = dev.kmd();
    let s = connect(kmd);
    assert_eq!(answer_to(&s, OPEN), Some(KmdStatus::Ok));
    // Requests, and never an answer read: kmd-shim's answers fill this side's queue.
    let stats = Request::PagingStats { part: 0 };
    let mut sent = 0;
    let closed = loop {
        if sent == 100_000 {
            break false;
        }
        match send(&s, stats, &[]) {
            Ok(()) => sent += 1,
            Err(_) => break true, // reset by kmd-shim
        }
    };
    // Either a send failed, or the answers queued here end with the close.
    let closed = closed || {
        let mut n = 0;
        while answer(&s).is_some() {
            n += 1;
            assert!(n <= sent, "more answers than requests");
        }
        true
    };
    assert!(closed);
    // Others are served meanwhile and after.
    let fresh = connect(kmd);
    assert_eq!(answer_to(&fresh, OPEN), Some(KmdStatus::Ok));
}

#[test]
fn a_full_server_tells_a_newcomer_limit_exceeded() {
    let server = kmd_shim::ServerLimits {
        max_connections: 2,
        ..kmd_shim::ServerLimits::default()
    };
    let dev = Device::start("conn-full", |c| c.server = server);
    let kmd = dev.kmd();
    let a = connect(kmd);
    assert_eq!(answer_to(&a, OPEN), Some(KmdStatus::Ok));
    let b = connect(kmd);
    assert_eq!(answer_to(&b, OPEN), Some(KmdStatus::Ok));
    // Both connections hold a context: none can make room.
    let c = connect(kmd);
    assert_eq!(answer(&c), Some(KmdStatus::LimitExceeded));
    assert_eq!(answer(&c), None, "then closed");
    // Once one goes, a newcomer gets in.
    drop(a);
    let deadline = Instant::now() + ANSWER;
    loop {
        let d = connect(kmd);
        // Until the server has seen `a` go, a newcomer is still turned away (its request
        // may not even go out: the server can close first), and told why.
        let _ = send(&d, OPEN, &[]);
        match answer(&d) {
            Some(KmdStatus::Ok) => break,
            Some(KmdStatus::LimitExceeded) => {}
            other => panic!("a newcomer got {other:?}, not Ok or LimitExceeded"),
        }
        assert!(
            Instant::now() < deadline,
            "no room after a connection closed"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
