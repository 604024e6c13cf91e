//! An ioctl that fails halfway gives back everything it had reserved, and a closed context
//! gives back everything it held: the limits prove it, as a device with room for exactly
//! one more of something accepts it again afterwards.

mod common;

use common::Device;
use rustix::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};
use userq_uapi::ioctl::{CreateFenceReply, Priority, RawReply, Reply, Request};
use userq_uapi::layout::{ring_object_size, PAGE_SIZE};
use userq_uapi::{os, KmdStatus, ABI_VERSION};

fn send(sock: &OwnedFd, req: Request, fds: &[BorrowedFd<'_>]) -> (KmdStatus, [u64; 7]) {
    os::send_with_fds(sock.as_fd(), bytemuck::bytes_of(&req.encode()), fds).expect("send");
    let mut buf = [0u8; 64];
    let got = os::recv_with_fds(sock.as_fd(), &mut buf).expect("recv");
    let r = RawReply::decode(&buf[..got.len]).expect("reply");
    (KmdStatus::from_u32(r.status), r.values)
}

fn status(sock: &OwnedFd, req: Request) -> KmdStatus {
    send(sock, req, &[]).0
}

fn open(kmd: &kmd_shim::Kmd) -> OwnedFd {
    let s = kmd_shim::socket::connect(kmd.socket_path()).expect("connect");
    let open = Request::OpenContext {
        abi_version: ABI_VERSION,
    };
    assert_eq!(status(&s, open), KmdStatus::Ok);
    s
}

fn fence(sock: &OwnedFd) -> Result<CreateFenceReply, KmdStatus> {
    match send(sock, Request::CreateFence { initial: 0 }, &[]) {
        (KmdStatus::Ok, v) => Ok(CreateFenceReply::decode(&v).expect("CREATE_FENCE reply")),
        (s, _) => Err(s),
    }
}

const QUEUE: Request = Request::CreateQueue {
    ring_entries: 8,
    priority: Priority::Normal,
    time_slice_us: 0,
    watchdog: userq_uapi::watchdog::Watchdog::JobTimeout(userq_uapi::watchdog::DEFAULT_JOB_TIMEOUT),
    profile: false,
};

fn one_ring() -> u64 {
    ring_object_size(8) as u64
}

#[test]
fn a_queue_without_room_for_its_timeline_gives_back_its_slot_and_bytes() {
    let dev = Device::start("rollback-timeline", |c| {
        c.limits = kmd_shim::Limits {
            max_fences: 1,
            memory_budget: one_ring(),
            ..kmd_shim::Limits::default()
        }
    });
    let kmd = dev.kmd();
    let s = open(kmd);
    let user = fence(&s).expect("the device's one fence");
    assert_eq!(status(&s, QUEUE), KmdStatus::LimitExceeded);
    let release = Request::ReleaseFence {
        handle: user.handle,
    };
    assert_eq!(status(&s, release), KmdStatus::Ok);
    // The budget holds exactly one ring: the failed queue returned its bytes.
    assert_eq!(status(&s, QUEUE), KmdStatus::Ok);
}

#[test]
fn a_queue_its_context_cannot_hold_drops_its_timeline_and_gives_back_its_slot() {
    let dev = Device::start("rollback-hold", |c| {
        c.limits = kmd_shim::Limits {
            max_fences_per_context: 1,
            max_fences: 2,
            memory_budget: one_ring(),
            ..kmd_shim::Limits::default()
        }
    });
    let kmd = dev.kmd();
    let a = open(kmd);
    let held = fence(&a).expect("a's one handle");
    // The timeline is registered, then the context cannot hold it.
    assert_eq!(status(&a, QUEUE), KmdStatus::LimitExceeded);
    // The timeline was forgotten: another context gets the device's second fence.
    let b = open(kmd);
    assert!(
        fence(&b).is_ok(),
        "the failed queue's timeline still counts"
    );
    let release = Request::ReleaseFence {
        handle: held.handle,
    };
    assert_eq!(status(&a, release), KmdStatus::Ok);
    assert_eq!(status(&a, QUEUE), KmdStatus::Ok);
}

#[test]
fn a_closed_context_gives_back_its_rings_buffers_and_fences() {
    let dev = Device::start("rollback-close", |c| {
        c.limits = kmd_shim::Limits {
            max_fences: 2,
            memory_budget: one_ring() + PAGE_SIZE as u64,
            ..kmd_shim::Limits::default()
        }
    });
    let kmd = dev.kmd();
    let a = open(kmd);
    assert_eq!(status(&a, QUEUE), KmdStatus::Ok);
    assert_eq!(
        status(&a, Request::AllocBuffer { size: 1, flags: 0 }),
        KmdStatus::Ok
    );
    assert!(fence(&a).is_ok());
    let b = open(kmd);
    assert_eq!(status(&b, QUEUE), KmdStatus::OutOfMemory);
    assert_eq!(fence(&b).err(), Some(KmdStatus::LimitExceeded));
    drop(a);
    // Reclaim runs on a's connection thread once it sees the close.
    let deadline = Instant::now() + Duration::from_secs(10);
    while status(&b, QUEUE) != KmdStatus::Ok {
        assert!(Instant::now() < deadline, "a's ring bytes never came back");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        status(&b, Request::AllocBuffer { size: 1, flags: 0 }),
        KmdStatus::Ok
    );
    assert!(fence(&b).is_ok());
}

#[test]
fn fences_created_on_many_connections_at_once_never_pass_the_device_limit() {
    const LIMIT: usize = 24;
    let dev = Device::start("rollback-fence-race", |c| {
        c.limits = kmd_shim::Limits {
            max_fences: LIMIT,
            ..kmd_shim::Limits::default()
        }
    });
    let kmd = dev.kmd();
    // Eight connections race to create fences until the device says no.
    let socks: Vec<OwnedFd> = (0..8).map(|_| open(kmd)).collect();
    let made: usize = std::thread::scope(|s| {
        let runs: Vec<_> = socks
            .iter()
            .map(|sock| {
                s.spawn(move || {
                    let mut n = 0;
                    while n < LIMIT {
                        match fence(sock) {
                            Ok(_) => n += 1,
                            Err(KmdStatus::LimitExceeded) => break,
                            Err(e) => panic!("unexpected {e:?}"),
                        }
                    }
                    n
                })
            })
            .collect();
        runs.into_iter().map(|r| r.join().expect("thread")).sum()
    });
    assert_eq!(made, LIMIT, "exactly the limit was created");
    drop(socks);
}

#[test]
fn one_context_cannot_take_more_than_its_share_and_freeing_gives_it_back() {
    let page = PAGE_SIZE as u64;
    let dev = Device::start("rollback-share", |c| {
        c.limits = kmd_shim::Limits {
            max_bytes_per_context: 4 * page,
            max_buffers_per_context: 3,
            max_queues_per_context: 1,
            ..kmd_shim::Limits::default()
        }
    });
    let kmd = dev.kmd();
    let a = open(kmd);
    let alloc = |s: &OwnedFd, size: u64| send(s, Request::AllocBuffer { size, flags: 0 }, &[]);
    let (st, big) = alloc(&a, 3 * page);
    assert_eq!(st, KmdStatus::Ok);
    // Two more pages would pass the context's 4 pages, though the device has room.
    assert_eq!(alloc(&a, 2 * page).0, KmdStatus::OutOfMemory);
    assert_eq!(alloc(&a, page).0, KmdStatus::Ok);
    // Another context has its own share.
    let b = open(kmd);
    assert_eq!(alloc(&b, 4 * page).0, KmdStatus::Ok);
    // Freeing gives the bytes back to the context that allocated them.
    assert_eq!(
        status(&a, Request::FreeBuffer { va: big[0] }),
        KmdStatus::Ok
    );
    assert_eq!(alloc(&a, 3 * page).0, KmdStatus::Ok);
    // Mappings per context are bounded too (small buffers, within the byte share).
    let c = open(kmd);
    for _ in 0..3 {
        assert_eq!(alloc(&c, 8).0, KmdStatus::Ok);
    }
    assert_eq!(alloc(&c, 8).0, KmdStatus::LimitExceeded);
    // And queues.
    assert_eq!(status(&c, QUEUE), KmdStatus::Ok);
    assert_eq!(status(&c, QUEUE), KmdStatus::LimitExceeded);
}
