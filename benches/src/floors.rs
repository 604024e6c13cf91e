//! The machine's floors, measured across two processes in the same run:
//! a cache-line ping-pong (what any polling protocol costs at least), a shared-futex
//! ping-pong (what any blocking protocol costs at least), the minimal packet + doorbell +
//! fence exchange (what any user queue moves per round trip), and a stream of 64-byte
//! packets through a ring (what any user queue's batched throughput is bounded by).

use crate::patience::Patience;
use crate::proc::{inherited_memory, shared_memory, Role};
use crate::stats::{time_each, Latency};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering::*};
use std::time::{Duration, Instant};
use userq::uapi::shm::ShmBytes;
use userq::uapi::sync::{futex_wait, futex_wake_all};

/// Offsets of the two lines (two lines apart, so the adjacent-line prefetcher does not
/// couple them).
const A: usize = 0;
const B: usize = 128;
const STOP64: u64 = u64::MAX;
const STOP32: u32 = u32::MAX;

/// A fresh shared page and a child running floor role `role` over it.
fn floor_child(role: &str) -> std::io::Result<(ShmBytes, Role)> {
    floor_child_sized(role, 4096)
}

/// [`floor_child`] over `len` bytes of fresh shared memory.
fn floor_child_sized(role: &str, len: usize) -> std::io::Result<(ShmBytes, Role)> {
    let (fd, map) = shared_memory(len)?;
    let child = Role::spawn(
        role,
        &[rustix::fd::AsRawFd::as_raw_fd(&fd).to_string()],
        Some(&fd),
        Stdio::null(),
    )?;
    Ok((map, child))
}

/// Parent side of the cache-line ping-pong.
pub fn poll_floor(warmup: usize, iters: usize) -> std::io::Result<Latency> {
    let (map, child) = floor_child("__floor-poll")?;
    let a = map.word64(A).expect("line a");
    let b = map.word64(B).expect("line b");
    let mut i = 0u64;
    let mut patience = Patience::new();
    let lat = time_each(warmup, iters, || {
        i += 1;
        a.store(i, Release);
        while b.load(Acquire) != i {
            core::hint::spin_loop();
            patience.spun(i);
        }
    });
    a.store(STOP64, Release);
    drop(child);
    Ok(lat)
}

/// Child side of the cache-line ping-pong.
pub fn poll_floor_child(fd: &str) -> std::io::Result<()> {
    let map = inherited_memory(fd)?;
    let a = map.word64(A).expect("line a");
    let b = map.word64(B).expect("line b");
    let mut seen = 0;
    loop {
        let v = a.load(Acquire);
        if v == STOP64 {
            return Ok(());
        }
        if v != seen {
            seen = v;
            b.store(v, Release);
        } else {
            core::hint::spin_loop();
        }
    }
}

/// Parent side of the shared-futex ping-pong, run back to back: each side sleeps when
/// the answer is not there yet. Run long, it settles into sleeping most rounds; a round
/// that finds its partner still awake costs two syscalls and no wake.
pub fn futex_floor(warmup: usize, iters: usize) -> std::io::Result<Latency> {
    let (map, child) = floor_child("__floor-futex")?;
    let a = map.word32(A).expect("word a");
    let b = map.word32(B).expect("word b");
    let mut i = 0u32;
    let mut patience = Patience::new();
    let lat = time_each(warmup, iters, || {
        i += 1;
        a.store(i, Release);
        futex_wake_all(a);
        loop {
            let v = b.load(Acquire);
            if v == i {
                break;
            }
            patience.wait(b, v, i.into());
        }
    });
    a.store(STOP32, Release);
    futex_wake_all(a);
    drop(child);
    Ok(lat)
}

/// The shared-futex ping-pong from cold: before each round the pair is left idle for
/// `idle` (untimed), as [`crate::round_trip::cold_round_trip`] leaves the device, so the
/// child is asleep in `futex_wait` when the round starts and its wake is always a real
/// one. The parent's is real when it is asleep before the answer comes; when the child is
/// woken onto the parent's vCPU and runs first, the parent finds the answer without
/// sleeping. One untimed round first (the child's start-up). Returns the latencies and in
/// how many rounds the parent found no answer at its first look and went to wait (an
/// upper bound on the rounds with two real wakes: its wait can also return at once).
pub fn futex_floor_cold(iters: usize, idle: Duration) -> std::io::Result<(Latency, usize)> {
    let (map, child) = floor_child("__floor-futex")?;
    let a = map.word32(A).expect("word a");
    let b = map.word32(B).expect("word b");
    let mut lat = Latency::new();
    let mut slept = 0;
    let mut patience = Patience::new();
    // Round 1 is the untimed one; values start at 1 (the child starts having seen 0).
    for i in 1..=iters as u32 + 1 {
        std::thread::sleep(idle);
        let t = Instant::now();
        a.store(i, Release);
        futex_wake_all(a);
        let mut waited = false;
        loop {
            let v = b.load(Acquire);
            if v == i {
                break;
            }
            waited = true;
            patience.wait(b, v, i.into());
        }
        if i > 1 {
            lat.record(t.elapsed().as_nanos() as u64);
            slept += usize::from(waited);
        }
    }
    a.store(STOP32, Release);
    futex_wake_all(a);
    drop(child);
    Ok((lat, slept))
}

/// Child side of the shared-futex ping-pong.
pub fn futex_floor_child(fd: &str) -> std::io::Result<()> {
    let map = inherited_memory(fd)?;
    let a = map.word32(A).expect("word a");
    let b = map.word32(B).expect("word b");
    let mut seen = 0;
    loop {
        let v = a.load(Acquire);
        if v == STOP32 {
            return Ok(());
        }
        if v == seen {
            futex_wait(a, v, None);
            continue;
        }
        seen = v;
        b.store(v, Release);
        futex_wake_all(b);
    }
}

/// Offsets of the minimal exchange's three lines: a 64-byte packet, a doorbell, a fence
/// (two lines apart, like the ping-pong's).
const PACKET: usize = 0;
const DOORBELL: usize = 128;
const FENCE: usize = 256;

/// Parent side of the minimal packet + doorbell + fence exchange: the least any user
/// queue can do per round trip. The parent writes a 64-byte packet (words 1..7, then word 0
/// with release), stores the doorbell (release) and spins on the fence; the child spins on
/// the doorbell (acquire), copies the packet's eight words once, and stores the fence
/// (release). Three cache lines, each written by one side: what userq's NOP round trip
/// carries, with nothing else.
pub fn exchange_floor(warmup: usize, iters: usize) -> std::io::Result<Latency> {
    let (map, child) = floor_child("__floor-exchange")?;
    let packet = map.atomics::<AtomicU64>(PACKET, 8).expect("packet line");
    let doorbell = map.word64(DOORBELL).expect("doorbell line");
    let fence = map.word64(FENCE).expect("fence line");
    let mut i = 0u64;
    let mut patience = Patience::new();
    let lat = time_each(warmup, iters, || {
        i += 1;
        for (k, w) in packet[1..].iter().enumerate() {
            w.store(i ^ k as u64, Relaxed);
        }
        packet[0].store(i, Release);
        doorbell.store(i, Release);
        while fence.load(Acquire) != i {
            core::hint::spin_loop();
            patience.spun(i);
        }
    });
    doorbell.store(STOP64, Release);
    drop(child);
    Ok(lat)
}

/// Child side of the minimal exchange.
pub fn exchange_floor_child(fd: &str) -> std::io::Result<()> {
    let map = inherited_memory(fd)?;
    let packet = map.atomics::<AtomicU64>(PACKET, 8).expect("packet line");
    let doorbell = map.word64(DOORBELL).expect("doorbell line");
    let fence = map.word64(FENCE).expect("fence line");
    let mut seen = 0;
    loop {
        let d = doorbell.load(Acquire);
        if d == STOP64 {
            return Ok(());
        }
        if d == seen {
            core::hint::spin_loop();
            continue;
        }
        seen = d;
        // Copy the packet once, as a firmware does, and complete it.
        let mut words = [0u64; 8];
        for (o, w) in words.iter_mut().zip(packet) {
            *o = w.load(Relaxed);
        }
        std::hint::black_box(&words);
        fence.store(d, Release);
    }
}

/// The streaming floor's ring: as many slots as the ring of `userq-bench throughput`'s
/// queue, after a page holding the consumer's read index and the stop word (each on a line
/// of its own, two lines apart).
const STREAM_SLOTS: u64 = 4096;
const STREAM_READ: usize = 0;
const STREAM_STOP: usize = 128;
const STREAM_RING: usize = 4096;
/// How often the consumer publishes its read index (and whenever it catches up).
const STREAM_PUBLISH: u64 = 64;

/// The ring's slot `i`: eight words.
fn stream_slot(slots: &[AtomicU64], i: u64) -> &[AtomicU64] {
    let at = (i % STREAM_SLOTS) as usize * 8;
    &slots[at..at + 8]
}

/// Parent side of the streaming floor: 64-byte packets per second through a shared ring,
/// the least any user queue's batched throughput moves. The parent writes each slot's
/// words 1..7 and then word 0 (its sequence number, release), as userq's client does, and
/// waits for room by the consumer's read index; the child polls the next slot's word 0
/// (acquire), copies the packet's eight words once and publishes its read index (release)
/// every 64 packets and when it catches up. Nothing else: no decoding, no fence, no
/// doorbell. Two laps of the ring run untimed first.
pub fn stream_floor(packets: u64) -> std::io::Result<f64> {
    let len = STREAM_RING + STREAM_SLOTS as usize * 64;
    let (map, child) = floor_child_sized("__floor-stream", len)?;
    let read = map.word64(STREAM_READ).expect("read line");
    let slots = map
        .atomics::<AtomicU64>(STREAM_RING, STREAM_SLOTS as usize * 8)
        .expect("ring");
    let mut patience = Patience::new();
    let mut cached = 0;
    let mut stream = |from: u64, to: u64| {
        for w in from..to {
            while w + 1 > cached + STREAM_SLOTS {
                core::hint::spin_loop();
                patience.spun(w);
                cached = read.load(Acquire);
            }
            let slot = stream_slot(slots, w);
            for (k, word) in slot[1..].iter().enumerate() {
                word.store(w ^ k as u64, Relaxed);
            }
            slot[0].store(w + 1, Release);
        }
        while read.load(Acquire) < to {
            core::hint::spin_loop();
            patience.spun(to);
        }
    };
    let warm = 2 * STREAM_SLOTS;
    stream(0, warm);
    let t = Instant::now();
    stream(warm, warm + packets);
    let rate = packets as f64 / t.elapsed().as_secs_f64();
    map.word64(STREAM_STOP)
        .expect("stop line")
        .store(STOP64, Release);
    drop(child);
    Ok(rate)
}

/// Child side of the streaming floor.
pub fn stream_floor_child(fd: &str) -> std::io::Result<()> {
    let map = inherited_memory(fd)?;
    let read = map.word64(STREAM_READ).expect("read line");
    let stop = map.word64(STREAM_STOP).expect("stop line");
    let slots = map
        .atomics::<AtomicU64>(STREAM_RING, STREAM_SLOTS as usize * 8)
        .expect("ring");
    let (mut r, mut published) = (0u64, 0u64);
    loop {
        let slot = stream_slot(slots, r);
        if slot[0].load(Acquire) != r + 1 {
            if published != r {
                read.store(r, Release);
                published = r;
            }
            if stop.load(Acquire) == STOP64 {
                return Ok(());
            }
            core::hint::spin_loop();
            continue;
        }
        let mut words = [0u64; 8];
        for (o, w) in words.iter_mut().zip(slot) {
            *o = w.load(Relaxed);
        }
        std::hint::black_box(&words);
        r += 1;
        if r % STREAM_PUBLISH == 0 {
            read.store(r, Release);
            published = r;
        }
    }
}
