//! The `hostile` scenarios: a client that speaks the raw ABI (control socket, doorbell
//! page, rings) without the runtime's checks, breaks one rule per case, and prints what
//! the firmware reported for its queue.

use super::Res;
use rustix::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering::*;
use std::time::{Duration, Instant};
use userq::uapi::ioctl::{
    BufferReply, CreateQueueReply, OpenContextReply, Priority, RawReply, Reply, Request,
    MESSAGE_SIZE,
};
use userq::uapi::layout::{DeviceKick, DeviceStatus, DoorbellPage, FenceState, PAGE_SIZE};
use userq::uapi::os;
use userq::uapi::packet::{Command as Cmd, FenceHandle, Packet};
use userq::uapi::shm::{ReadOnly, RingShm, Shm, ShmBytes};
use userq::uapi::{sync, ErrorCode, KmdStatus, ABI_VERSION};

/// A client that speaks the ABI directly, without the runtime's checks.
struct Raw {
    sock: OwnedFd,
    ctx: u32,
    doorbells: Shm<DoorbellPage>,
    status: Shm<DeviceStatus<ReadOnly>>,
    kick: Shm<DeviceKick>,
    status_fd: OwnedFd,
}

impl Raw {
    fn open() -> Res<Raw> {
        let path = std::env::var("USERQ_DEVICE")?;
        let sock = rustix::net::socket_with(
            rustix::net::AddressFamily::UNIX,
            rustix::net::SocketType::SEQPACKET,
            rustix::net::SocketFlags::CLOEXEC,
            None,
        )?;
        rustix::net::connect(&sock, &rustix::net::SocketAddrUnix::new(path.as_str())?)?;
        let (v, mut fds) = call(
            &sock,
            Request::OpenContext {
                abi_version: ABI_VERSION,
            },
            &[],
        )?;
        let ctx = OpenContextReply::decode(&v)?.ctx;
        let doorbells = Shm::map(fds[0].as_fd())?;
        let status = Shm::map(fds[1].as_fd())?;
        let kick = Shm::map(fds[2].as_fd())?;
        let status_fd = fds.swap_remove(1);
        Ok(Raw {
            sock,
            ctx,
            doorbells,
            status,
            kick,
            status_fd,
        })
    }

    fn queue(&self, entries: u32) -> Res<RawQueue> {
        let (v, fds) = call(
            &self.sock,
            Request::CreateQueue {
                ring_entries: entries,
                priority: Priority::Normal,
                time_slice_us: 0,
                watchdog: Default::default(),
                profile: false,
            },
            &[],
        )?;
        let reply = CreateQueueReply::decode(&v)?;
        let ring = RingShm::map(fds[0].as_fd(), entries)?;
        let state = Shm::map(fds[1].as_fd())?;
        let state_fd = fds.into_iter().nth(1).ok_or("no state fd")?;
        Ok(RawQueue {
            state_fd,
            slot: reply.slot as usize,
            handle: reply.timeline,
            entries: entries as u64,
            ring,
            state,
            wptr: 0,
        })
    }

    fn buffer(&self, size: u64) -> Res<u64> {
        let (v, _) = call(&self.sock, Request::AllocBuffer { size, flags: 0 }, &[])?;
        Ok(BufferReply::decode(&v)?.va)
    }

    fn doorbell(&self, slot: usize, write_index: u64) {
        let page = &*self.doorbells;
        page.doorbells[slot].value.store(write_index, Release);
        self.kick_all_pending(slot / 64, 1 << (slot % 64));
    }

    fn kick_all_pending(&self, word: usize, bits: u64) {
        // No memory of earlier wakes: every doorbell that finds the firmware asleep wakes it.
        sync::ring_doorbell(
            (&self.doorbells.pending.words[word], bits),
            sync::context_bit(&self.kick.contexts, self.ctx),
            (&self.status.sleep.sleeping, &self.status.sleep.word_before),
            &self.kick.kick.word,
            &mut 0,
        );
    }
}

struct RawQueue {
    state_fd: OwnedFd,
    slot: usize,
    handle: FenceHandle,
    entries: u64,
    ring: RingShm,
    state: Shm<FenceState<ReadOnly>>,
    wptr: u64,
}

impl RawQueue {
    fn push(&mut self, raw: &Raw, packets: &[Packet]) {
        for p in packets {
            // Raw: the slot of write index `wptr` with no sequence tag; the doorbell alone
            // publishes it.
            let slot = self.ring.slot(self.wptr);
            for (w, v) in slot.iter().zip(p.to_words()) {
                w.store(v, Relaxed);
            }
            self.wptr += 1;
        }
        raw.doorbell(self.slot, self.wptr);
    }

    fn fence(&self) -> &FenceState<ReadOnly> {
        &self.state
    }

    /// Polls for completion or poison.
    /// Writes `packets` as they are (no tags added) and publishes `doorbell` as the write
    /// index, whatever it is.
    fn push_raw(&mut self, raw: &Raw, packets: &[Packet], doorbell: u64) {
        for p in packets {
            let slot = self.ring.slot(self.wptr);
            for (w, v) in slot.iter().zip(p.to_words()) {
                w.store(v, Relaxed);
            }
            self.wptr += 1;
        }
        raw.doorbell(self.slot, doorbell);
    }

    /// Like `settle`, within `limit`: `None` if the queue neither completed `value` nor
    /// faulted by then.
    fn settle_within(&self, value: u64, limit: Duration) -> Option<Option<ErrorCode>> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            let f = self.fence();
            if f.slot.poison.load_acquire() != 0 {
                return Some(ErrorCode::from_u32(f.record.code.load()));
            }
            if f.slot.value.load_acquire() >= value {
                return Some(None);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        None
    }

    fn settle(&self, value: u64) -> Option<ErrorCode> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let f = self.fence();
            if f.slot.poison.load_acquire() != 0 {
                return ErrorCode::from_u32(f.record.code.load());
            }
            if f.slot.value.load_acquire() >= value {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Some(ErrorCode::DeviceLost)
    }
}

fn call(
    sock: &OwnedFd,
    req: Request,
    fds: &[rustix::fd::BorrowedFd<'_>],
) -> Res<([u64; 7], Vec<OwnedFd>)> {
    os::send_with_fds(sock.as_fd(), bytemuck::bytes_of(&req.encode()), fds)?;
    let mut buf = [0u8; MESSAGE_SIZE];
    let got = os::recv_with_fds(sock.as_fd(), &mut buf)?;
    let reply = RawReply::decode(&buf[..got.len]).map_err(|s| format!("{s}"))?;
    match KmdStatus::from_u32(reply.status) {
        KmdStatus::Ok => Ok((reply.values, got.fds)),
        s => Err(format!("kmd-shim refused {req:?}: {s}").into()),
    }
}

/// Rounds of ring garbage: each on a fresh queue, random words in every slot (word 0 often
/// carrying the tag the firmware expects, so garbage is really consumed and decoded), a
/// random or wild doorbell, with a seeded generator so a failure can be replayed. Prints
/// how the rounds ended, then proves a fresh queue still works.
fn random_rings(raw: &Raw, seed: u64, rounds: usize) -> Res<()> {
    let mut s = seed | 1;
    let mut next = move || {
        // xorshift64*
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        s.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let (mut faulted, mut completed, mut idle) = (0, 0, 0);
    for _ in 0..rounds {
        let mut q = raw.queue(8)?;
        let n = 1 + next() % 8;
        let mut packets = Vec::new();
        for i in 0..n {
            let mut words = [0u64; 8];
            for w in words.iter_mut() {
                *w = next();
            }
            if next() % 2 == 0 {
                // The expected sequence tag in the high half of word 0.
                words[0] = (words[0] & 0xffff_ffff) | ((i + 1) << 32);
            }
            packets.push(Packet::from_words(words));
        }
        q.push_raw(
            raw,
            &packets,
            match next() % 4 {
                0 => next(), // wild
                1 => 0,      // nothing published
                _ => n,      // as many as written
            },
        );
        match q.settle_within(n, Duration::from_millis(300)) {
            Some(Some(_)) => faulted += 1,
            Some(None) => completed += 1,
            None => idle += 1,
        }
    }
    let mut fresh = raw.queue(8)?;
    let buf = raw.buffer(4096)?;
    fresh.push(
        raw,
        &[Cmd::WriteValue {
            addr: buf,
            value: 5,
        }
        .encode()],
    );
    match fresh.settle(1) {
        None => println!("survived {rounds} rounds ({faulted} faulted, {completed} completed, {idle} idle); a fresh queue completed"),
        Some(code) => println!("fresh queue failed: {code:?}"),
    }
    Ok(())
}

/// Runs `step` over and over for `ms` milliseconds, yielding every 256 runs (so the
/// firmware and the other client still get the CPU), and returns how many runs it made.
fn repeat_for(ms: u64, mut step: impl FnMut()) -> u64 {
    let end = Instant::now() + Duration::from_millis(ms);
    let mut runs = 0u64;
    while Instant::now() < end {
        for _ in 0..256 {
            step();
        }
        runs += 256;
        std::thread::yield_now();
    }
    runs
}

/// Scribbles on the device's kick word (writable by every client) for `ms` milliseconds,
/// never waking anyone: writes it back to the value the sleeping firmware waits on (which
/// erases another client's bump before the firmware's futex wait) and then a fresh value
/// (which makes a doorbell that already woke this sleep think its wake is still under
/// way), over and over. Prints how many writes it made.
fn kick_scribbler(raw: &Raw, ms: u64) -> Res<()> {
    let word = &raw.kick.kick.word;
    let runs = repeat_for(ms, || {
        let before = raw.status.sleep.word_before.load();
        word.store(before, Relaxed);
        word.store(before.wrapping_add(7), Relaxed);
    });
    println!("scribbled {} times", 2 * runs);
    Ok(())
}

/// Clears every bit of the device's summary of rung contexts (writable by every client,
/// as it shares the kick word's page) for `ms` milliseconds, over and over: another
/// client's doorbell bit there is gone before the firmware takes it. Prints how many
/// sweeps it made.
fn summary_eraser(raw: &Raw, ms: u64) -> Res<()> {
    let words = &raw.kick.contexts.words;
    let runs = repeat_for(ms, || words.iter().for_each(|w| w.store(0, Relaxed)));
    println!("erased {runs} times");
    Ok(())
}

pub(crate) fn hostile(case: &str) -> Res<()> {
    let raw = Raw::open()?;
    if let Some(seed) = case.strip_prefix("random-rings:") {
        return random_rings(&raw, seed.parse()?, 40);
    }
    if let Some(ms) = case.strip_prefix("kick-scribbler:") {
        return kick_scribbler(&raw, ms.parse()?);
    }
    if let Some(ms) = case.strip_prefix("summary-eraser:") {
        return summary_eraser(&raw, ms.parse()?);
    }
    let mut q = raw.queue(8)?;
    let buf = raw.buffer(4096)?;
    let bad = |words: [u64; 8]| Packet::from_words(words);
    let outcome = match case {
        "bad-opcode" => {
            q.push(&raw, &[Cmd::Nop.encode(), bad([0x7f, 0, 0, 0, 0, 0, 0, 0])]);
            q.settle(2)
        }
        "reserved-bits" => {
            q.push(&raw, &[bad([1, 0, 0, 0, 9, 0, 0, 0])]);
            q.settle(1)
        }
        "misaligned" => {
            q.push(
                &raw,
                &[Cmd::WriteValue {
                    addr: buf + 4,
                    value: 1,
                }
                .encode()],
            );
            q.settle(1)
        }
        "foreign-address" => {
            // Past the end of the only buffer: the guard range after it is unmapped.
            q.push(
                &raw,
                &[Cmd::WriteValue {
                    addr: buf + 4096,
                    value: 1,
                }
                .encode()],
            );
            q.settle(1)
        }
        "bad-handle" => {
            q.push(
                &raw,
                &[Cmd::SignalFence {
                    fence: FenceHandle(9999),
                    value: 1,
                }
                .encode()],
            );
            q.settle(1)
        }
        "signal-timeline" => {
            let own = q.handle;
            q.push(
                &raw,
                &[Cmd::SignalFence {
                    fence: own,
                    value: 100,
                }
                .encode()],
            );
            q.settle(1)
        }
        "wptr-backwards" => {
            q.push(&raw, &[Cmd::Nop.encode(), Cmd::Nop.encode()]);
            if let Some(c) = q.settle(2) {
                return Err(format!("setup failed: {c:?}").into());
            }
            raw.doorbell(q.slot, 1);
            q.settle(3)
        }
        "wptr-overrun" => {
            raw.doorbell(q.slot, q.entries + 5);
            q.settle(1)
        }
        "write-readonly" => {
            // The device status and a queue timeline are the firmware's to write. Neither
            // the fd we were given nor a read-write re-open of it may map them writable.
            let mut writable = Vec::new();
            for (name, fd) in [
                ("status", raw.status_fd.as_fd()),
                ("timeline", q.state_fd.as_fd()),
            ] {
                if ShmBytes::map(fd, PAGE_SIZE).is_ok() {
                    writable.push(name);
                }
                let path = format!("/proc/self/fd/{}", rustix::fd::AsRawFd::as_raw_fd(&fd));
                if let Ok(rw) = rustix::fs::open(
                    path.as_str(),
                    rustix::fs::OFlags::RDWR,
                    rustix::fs::Mode::empty(),
                ) {
                    if ShmBytes::map(rw.as_fd(), PAGE_SIZE).is_ok() {
                        writable.push(name);
                    }
                    if rustix::io::write(&rw, &[1]).is_ok() {
                        writable.push(name);
                    }
                }
            }
            if writable.is_empty() {
                println!("refused");
            } else {
                println!("writable {writable:?}");
            }
            return Ok(());
        }
        "garbage-doorbell" => {
            let page = &*raw.doorbells;
            for (i, d) in page.doorbells.iter().enumerate() {
                if i != q.slot {
                    d.value.store(0xdead_beef_0000 + i as u64, Release);
                }
            }
            for w in 0..page.pending.words.len() {
                raw.kick_all_pending(w, u64::MAX);
            }
            // The real queue still works afterwards.
            q.push(
                &raw,
                &[Cmd::WriteValue {
                    addr: buf,
                    value: 5,
                }
                .encode()],
            );
            q.settle(1)
        }
        other => return Err(format!("unknown case {other}").into()),
    };
    let r = &q.fence().record;
    match outcome {
        Some(code) => println!(
            "fault {code:?} packet={} address={:#x} last_completed={}",
            r.packet_index.load(),
            r.address.load(),
            r.last_completed.load()
        ),
        None => println!("completed {}", q.fence().slot.value.load_acquire()),
    }
    Ok(())
}
