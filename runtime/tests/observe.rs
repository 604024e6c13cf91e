//! Observing a device: telemetry and the event log, read through OBSERVE by a
//! connection that opens no context.

mod common;
use common::Env;
use std::time::{Duration, Instant};
use userq::uapi::layout::{EventKind, QueueRunState};
use userq::uapi::observe::Observer;
use userq::{kernels, Device};

#[test]
fn telemetry_shows_contexts_queues_engine_time_and_events() {
    let env = Env::with(Device::builder().vram(8 << 20));
    let dev = env.dev();
    let obs = Observer::connect(dev.socket_path()).expect("observe");
    let mut events = obs.events(true);
    let mut q = dev.create_queue().unwrap();
    let mut idle = dev.create_queue().unwrap();
    let b = dev.alloc::<u32>(1 << 16).unwrap();
    for i in 0..20 {
        q.submit(kernels::fill_u32(1 << 16, i, &b).unwrap())
            .unwrap();
    }
    q.submit(kernels::spin(1, 30_000_000).unwrap())
        .unwrap()
        .wait(Duration::from_secs(30))
        .unwrap();
    let _ = idle.submit(userq::Command::nop()).unwrap();
    // The firmware publishes every 10 ms: wait for the figures to arrive.
    let t = Instant::now();
    let snap = loop {
        let s = obs.snapshot();
        let done = s
            .contexts
            .iter()
            .find(|c| c.ctx == dev.context_id())
            .and_then(|c| c.queues.iter().find(|x| x.slot == q.slot()).copied())
            .is_some_and(|x| x.completed == 21);
        if done || t.elapsed() > Duration::from_secs(10) {
            break s;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    assert!(!snap.lost);
    assert!(!snap.engines.is_empty());
    assert!(snap.engines.iter().map(|e| e.busy_ns).sum::<u64>() >= 20_000_000);
    let me = snap
        .contexts
        .iter()
        .find(|c| c.ctx == dev.context_id())
        .expect("our context is listed");
    assert_eq!(me.pid, std::process::id());
    assert!(!me.comm.is_empty());
    assert!(me.engine_ns >= 20_000_000, "{me:?}");
    let ql = me.queues.iter().find(|x| x.slot == q.slot()).unwrap();
    assert_eq!((ql.submitted, ql.consumed, ql.completed), (21, 21, 21));
    assert_eq!(ql.state, Some(QueueRunState::Idle));
    assert!(me.queues.iter().any(|x| x.slot == idle.slot()));
    // The event log has our process and queues.
    let (evs, dropped) = events.poll();
    assert_eq!(dropped, 0);
    let kinds: Vec<_> = evs
        .iter()
        .filter(|e| e.ctx == dev.context_id())
        .filter_map(|e| e.kind)
        .collect();
    assert!(kinds.contains(&EventKind::ProcessStart), "{kinds:?}");
    assert_eq!(
        kinds
            .iter()
            .filter(|k| **k == EventKind::QueueCreated)
            .count(),
        2
    );
    // A destroyed queue leaves the table and the log says so.
    let slot = idle.slot();
    drop(idle);
    let (evs, _) = events.poll();
    assert!(evs
        .iter()
        .any(|e| e.kind == Some(EventKind::QueueDestroyed) && e.slot == slot));
    let me = obs.snapshot();
    let me = me
        .contexts
        .iter()
        .find(|c| c.ctx == dev.context_id())
        .unwrap();
    assert!(!me.queues.iter().any(|x| x.slot == slot));
}

#[test]
fn a_reader_that_falls_behind_counts_what_it_missed() {
    let env = Env::new();
    let dev = env.dev();
    let obs = Observer::connect(dev.socket_path()).expect("observe");
    let mut reader = obs.events(false);
    // More queue events than the log holds.
    let n = userq::uapi::layout::EVENT_LOG_ENTRIES + 100;
    for _ in 0..n / 2 + 1 {
        drop(dev.create_queue().unwrap());
    }
    let (evs, dropped) = reader.poll();
    assert!(dropped > 0, "{dropped}");
    assert_eq!(evs.len() as u64 + dropped, (n / 2 + 1) as u64 * 2);
}

#[test]
fn observing_something_that_is_not_a_device_is_a_clear_error() {
    let dir = std::env::temp_dir().join(format!("userq-observe-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let e = Observer::connect(&dir.join("nothing.sock")).unwrap_err();
    assert!(e.to_string().contains("cannot connect"), "{e}");
    // A socket that is not a device: it takes the connection and never answers.
    let path = dir.join("mute.sock");
    let l = rustix::net::socket(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::SEQPACKET,
        None,
    )
    .unwrap();
    rustix::net::bind(&l, &rustix::net::SocketAddrUnix::new(&path).unwrap()).unwrap();
    rustix::net::listen(&l, 4).unwrap();
    let t = Instant::now();
    let e = Observer::connect(&path).unwrap_err();
    assert!(e.to_string().contains("not a userq device"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(10));
    drop(l);
    let _ = std::fs::remove_dir_all(&dir);
}
