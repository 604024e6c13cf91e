//! Two processes exchange work through each other's fences, in a loop, and verify the
//! order with device timestamps.
//!
//! The parent's queue runs, for each round i: wait for the child's fence to reach i-1,
//! timestamp, signal its own fence to i. The child's queue runs: wait for the parent's
//! fence to reach i, timestamp, signal its fence to i. So every round is a cross-process
//! dependency in each direction, resolved by the firmware with no host involvement, and
//! the timestamps must interleave: parent[i] <= child[i] <= parent[i+1].
//!
//! cargo run --release --example ping_pong            (embedded device, or the default one)
//! USERQ_DEVICE=/path/to/sock cargo run --release --example ping_pong   (a running kmd-shim)

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::Command as Process;
use std::time::{Duration, Instant};
use userq::{Command, Device, ExportedFence, Fence, Queue};

const ROUNDS: usize = 2000;
const CHUNK: usize = 32;

/// Submits the rounds for one side. `lead` is true for the side that goes first.
fn play(
    queue: &mut Queue,
    mine: &Fence,
    theirs: &Fence,
    stamps: &userq::Buffer<u64>,
    lead: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut batch = Vec::with_capacity(3 * CHUNK);
    for start in (0..ROUNDS).step_by(CHUNK) {
        batch.clear();
        for i in start..(start + CHUNK).min(ROUNDS) {
            let round = i as u64 + 1;
            let wait_for = if lead { round - 1 } else { round };
            batch.push(Command::wait(&theirs.point(wait_for)));
            batch.push(Command::timestamp(stamps.address_of(i).expect("in bounds")));
            batch.push(Command::signal(mine, round));
        }
        // Blocks while the ring is full: back-pressure, not overwrite.
        queue.submit_batch(&batch)?;
    }
    queue.finish(Duration::from_secs(60))?;
    Ok(())
}

fn child(rendezvous: &str) -> Result<(), Box<dyn std::error::Error>> {
    let dev = Device::open_default()?;
    let mut sock = UnixStream::connect(rendezvous)?;
    let mine = dev.create_fence(0)?;
    mine.export()?.send(&sock)?;
    let theirs = dev.import_fence(ExportedFence::recv(&sock)?)?;
    let mut queue = dev.queue().ring_entries(128).create()?;
    let stamps = dev.alloc::<u64>(ROUNDS)?;
    play(&mut queue, &mine, &theirs, &stamps, false)?;
    for v in stamps.to_vec() {
        sock.write_all(&v.to_le_bytes())?;
    }
    Ok(())
}

fn parent() -> Result<(), Box<dyn std::error::Error>> {
    let dev = Device::open_default()?;
    println!(
        "ping_pong: device {} ({} mode), pid {}",
        dev.socket_path().display(),
        if dev.is_embedded() {
            "embedded"
        } else {
            "daemon"
        },
        std::process::id()
    );
    let dir = std::env::temp_dir();
    let rendezvous = dir.join(format!("userq-ping-pong-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&rendezvous);
    let listener = UnixListener::bind(&rendezvous)?;
    let mut kid = Process::new(std::env::current_exe()?)
        .arg("--child")
        .arg(&rendezvous)
        // The child must reach the same device: name it explicitly.
        .env("USERQ_DEVICE", dev.socket_path())
        .spawn()?;
    let result = (|| -> Result<(), Box<dyn std::error::Error>> {
        let (mut sock, _) = listener.accept()?;
        let _ = std::fs::remove_file(&rendezvous);
        let theirs = dev.import_fence(ExportedFence::recv(&sock)?)?;
        let mine = dev.create_fence(0)?;
        mine.export()?.send(&sock)?;
        let mut queue = dev.queue().ring_entries(128).create()?;
        let stamps = dev.alloc::<u64>(ROUNDS)?;
        let t = Instant::now();
        play(&mut queue, &mine, &theirs, &stamps, true)?;
        theirs.wait(ROUNDS as u64, Duration::from_secs(60))?;
        let elapsed = t.elapsed();
        let mut bytes = vec![0u8; ROUNDS * 8];
        sock.read_exact(&mut bytes)?;
        let child_stamps: Vec<u64> = bytes
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        let ours = stamps.to_vec();
        for i in 0..ROUNDS {
            let ok = ours[i] != 0
                && ours[i] <= child_stamps[i]
                && (i + 1 == ROUNDS || child_stamps[i] <= ours[i + 1]);
            if !ok {
                return Err(format!(
                    "order violated in round {i}: parent {} child {} next parent {:?}",
                    ours[i],
                    child_stamps[i],
                    ours.get(i + 1)
                )
                .into());
            }
        }
        println!(
            "ping_pong: {ROUNDS} rounds with pid {} in {:?} ({:.2} µs per round trip); order verified by device timestamps",
            kid.id(),
            elapsed,
            elapsed.as_secs_f64() * 1e6 / ROUNDS as f64
        );
        Ok(())
    })();
    let _ = std::fs::remove_file(&rendezvous);
    if result.is_err() {
        let _ = kid.kill();
    }
    let status = kid.wait()?;
    result?;
    if !status.success() {
        return Err(format!("child exited with {status}").into());
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("--child") => child(args.get(2).ok_or("--child needs the rendezvous socket")?),
        _ => parent(),
    }
}
