//! A producer process and a consumer process share a buffer and two fences by fd. Each
//! round, the producer's queue waits until the consumer has taken the previous round, fills
//! the shared buffer with the round number (a kernel), and signals `produced`; the
//! consumer's queue waits for `produced`, copies the shared buffer into its own row for that
//! round (a kernel), and signals `consumed`. Neither host thread takes part in the
//! hand-offs. At the end the consumer checks every element of every row.
//!
//! cargo run --release --example pipeline

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::Command as Process;
use std::time::{Duration, Instant};
use userq::{kernels, Command, Device, ExportedBuffer, ExportedFence, KernelArg};

const N: u32 = 100_000;
const ROUNDS: u32 = 50;

fn consumer(rendezvous: &str) -> Result<(), Box<dyn std::error::Error>> {
    let dev = Device::open_default()?;
    let mut sock = UnixStream::connect(rendezvous)?;
    let data = dev.import_buffer::<u32>(ExportedBuffer::recv(&sock)?)?;
    let produced = dev.import_fence(ExportedFence::recv(&sock)?)?;
    let consumed = dev.create_fence(0)?;
    consumed.export()?.send(&sock)?;
    let rows = dev.alloc::<u32>((N * ROUNDS) as usize)?;
    let mut q = dev.queue().ring_entries(64).create()?;
    for r in 1..=ROUNDS {
        let row = rows
            .address_of(((r - 1) * N) as usize)
            .expect("row inside the buffer");
        q.submit_batch(&[
            Command::wait(&produced.point(r as u64)),
            Command::dispatch(
                kernels::COPY_U32,
                [N, 1, 1],
                [kernels::WORKGROUP, 1, 1],
                &[
                    KernelArg::U64(N as u64),
                    KernelArg::Address(data.device_address()),
                    KernelArg::Address(row),
                ],
            ),
            Command::signal(&consumed, r as u64),
        ])?;
    }
    q.finish(Duration::from_secs(60))?;
    let all = rows.to_vec();
    for (i, v) in all.iter().enumerate() {
        let want = i as u32 / N + 1;
        if *v != want {
            return Err(format!(
                "row {} element {}: {v}, want {want}",
                i as u32 / N,
                i as u32 % N
            )
            .into());
        }
    }
    sock.write_all(&(all.len() as u64).to_le_bytes())?;
    Ok(())
}

fn producer() -> Result<(), Box<dyn std::error::Error>> {
    let dev = Device::open_default()?;
    let rendezvous =
        std::env::temp_dir().join(format!("userq-pipeline-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&rendezvous);
    let listener = UnixListener::bind(&rendezvous)?;
    let mut kid = Process::new(std::env::current_exe()?)
        .arg("--consumer")
        .arg(&rendezvous)
        .env("USERQ_DEVICE", dev.socket_path())
        .spawn()?;
    let result = (|| -> Result<u64, Box<dyn std::error::Error>> {
        let (mut sock, _) = listener.accept()?;
        let _ = std::fs::remove_file(&rendezvous);
        let data = dev.alloc::<u32>(N as usize)?;
        let produced = dev.create_fence(0)?;
        data.export()?.send(&sock)?;
        produced.export()?.send(&sock)?;
        let consumed = dev.import_fence(ExportedFence::recv(&sock)?)?;
        let mut q = dev.queue().ring_entries(64).create()?;
        let t = Instant::now();
        for r in 1..=ROUNDS {
            q.submit_batch(&[
                Command::wait(&consumed.point(r as u64 - 1)),
                kernels::fill_u32(N, r, &data)?,
                Command::signal(&produced, r as u64),
            ])?;
        }
        consumed.wait(ROUNDS as u64, Duration::from_secs(60))?;
        let took = t.elapsed();
        let mut n = [0u8; 8];
        sock.read_exact(&mut n)?;
        println!(
            "pipeline: {ROUNDS} rounds of {N} elements through a shared buffer between pid {} and pid {} in {:?}; consumer verified {} elements",
            std::process::id(),
            kid.id(),
            took,
            u64::from_le_bytes(n)
        );
        Ok(u64::from_le_bytes(n))
    })();
    let _ = std::fs::remove_file(&rendezvous);
    if result.is_err() {
        let _ = kid.kill();
    }
    let status = kid.wait()?;
    let verified = result?;
    if !status.success() || verified != (N * ROUNDS) as u64 {
        return Err(format!("consumer failed: {status}, {verified} elements verified").into());
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("--consumer") => consumer(
            args.get(2)
                .ok_or("--consumer needs the rendezvous socket")?,
        ),
        _ => producer(),
    }
}
