//! A client process for the system tests. Each scenario connects to `$USERQ_DEVICE`.
//!
//! - `worker QUEUES PACKETS RING`: well-behaved work on several queues at once; checks
//!   in-order completion with device timestamps; prints `ok`.
//! - `compute QUEUES ROUNDS`: dependent kernel dispatches on every queue; checks results.
//! - `victim RENDEZVOUS`: sends a user fence to the rendezvous socket, prints `ready`, and
//!   submits forever (to be SIGKILLed mid-stream).
//! - `hostile CASE`: speaks the raw ABI and breaks one rule; prints what the firmware
//!   reported for its queue.
//! - `host SOCKET`: serves an embedded device on SOCKET, prints `ready`, runs until killed.
//! - `blocked RENDEZVOUS`: receives two fences on the rendezvous socket, imports them, and
//!   blocks a thread on each for a value they never reach; prints `ready` (to be
//!   SIGKILLed while blocked).

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::Duration;
use userq::{Command, Device};

mod hostile;
use hostile::hostile;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn worker(queues: usize, packets: usize, ring: u32) -> Res<()> {
    let dev = Device::open_default()?;
    let mut qs = Vec::new();
    let mut stamps = Vec::new();
    for _ in 0..queues {
        qs.push(dev.queue().ring_entries(ring).create()?);
        stamps.push(dev.alloc::<u64>(packets)?);
    }
    let batch = (ring as usize / 2).max(1);
    let mut next = vec![0usize; queues];
    // Round-robin over the queues so that they run interleaved.
    while next.iter().any(|&n| n < packets) {
        for q in 0..queues {
            let end = (next[q] + batch).min(packets);
            let cmds: Vec<Command> = (next[q]..end)
                .map(|i| Command::timestamp(stamps[q].address_of(i).expect("in bounds")))
                .collect();
            if !cmds.is_empty() {
                qs[q].submit_batch(&cmds)?;
            }
            next[q] = end;
        }
    }
    for (q, queue) in qs.iter().enumerate() {
        queue.finish(Duration::from_secs(30))?;
        let v = queue.timeline().value();
        if v != packets as u64 {
            return Err(format!("queue {q}: timeline {v}, expected {packets}").into());
        }
        let ts = stamps[q].to_vec();
        if let Some(i) = (0..packets).find(|&i| ts[i] == 0 || (i > 0 && ts[i] < ts[i - 1])) {
            return Err(format!(
                "queue {q}: packet {i} out of order or missing: {:?}",
                &ts[i.saturating_sub(1)..=i]
            )
            .into());
        }
    }
    println!("ok");
    Ok(())
}

/// `compute QUEUES ROUNDS`: every queue runs ROUNDS dependent dispatches on its own
/// buffer (x = 2·x, then +1 via axpy with a ones vector), round-robin across queues; checks
/// every element.
fn compute(queues: usize, rounds: u32) -> Res<()> {
    let dev = Device::open_default()?;
    const N: u32 = 5000;
    let mut ones = dev.alloc::<f32>(N as usize)?;
    ones.copy_from_slice(&vec![1.0; N as usize]);
    let mut qs = Vec::new();
    let mut bufs = Vec::new();
    for _ in 0..queues {
        qs.push(dev.queue().ring_entries(16).create()?);
        bufs.push(dev.alloc::<f32>(N as usize)?);
    }
    for _ in 0..rounds {
        for (q, b) in qs.iter_mut().zip(&bufs) {
            q.submit_batch(&[
                userq::kernels::scale(N, 2.0, b)?,
                userq::kernels::axpy(N, 1.0, &ones, b)?,
            ])?;
        }
    }
    // x starts at 0; each round x = 2x + 1, so after r rounds x = 2^r - 1.
    let want = (1u64 << rounds) as f32 - 1.0;
    for (i, (q, b)) in qs.iter().zip(&bufs).enumerate() {
        q.finish(Duration::from_secs(60))?;
        if let Some(j) = b.to_vec().iter().position(|&v| v != want) {
            return Err(format!("queue {i} element {j}: {} != {want}", b.read(j)).into());
        }
    }
    println!("ok");
    Ok(())
}

fn victim(rendezvous: &str) -> Res<()> {
    let dev = Device::open_default()?;
    let fence = dev.create_fence(0)?;
    let sock = UnixStream::connect(rendezvous)?;
    fence.export()?.send(&sock)?;
    let mut q = dev.queue().ring_entries(64).create()?;
    let nops = vec![Command::nop(); 32];
    q.submit_batch(&nops)?.wait(Duration::from_secs(10))?;
    println!("ready");
    std::io::stdout().flush()?;
    loop {
        q.submit_batch(&nops)?;
    }
}

/// Blocks one thread on each of two fences received on the rendezvous socket.
fn blocked(rendezvous: &str) -> Res<()> {
    let dev = Device::open_default()?;
    let sock = UnixStream::connect(rendezvous)?;
    let fences = [
        dev.import_fence(userq::ExportedFence::recv(&sock)?)?,
        dev.import_fence(userq::ExportedFence::recv(&sock)?)?,
    ];
    let waiters: Vec<_> = fences
        .into_iter()
        .map(|f| {
            std::thread::spawn(move || f.wait_with(u64::MAX, userq::WaitMode::Block, Duration::MAX))
        })
        .collect();
    println!("ready");
    std::io::stdout().flush()?;
    for w in waiters {
        let _ = w.join();
    }
    Err("a wait that cannot end ended".into())
}

/// Serves an embedded device on `socket` until killed.
/// Hosts an embedded device on `socket` until killed; `nofile`: first lower this process's
/// descriptor limit to it (soft and hard), as an application with a small table would.
fn host(socket: &str, nofile: Option<u64>) -> Res<()> {
    if let Some(n) = nofile {
        use rustix::process::{setrlimit, Resource, Rlimit};
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(n),
                maximum: Some(n),
            },
        )?;
    }
    let _dev = Device::builder()
        .socket(socket)
        .mode(userq::OpenMode::Embedded)
        .open()?;
    println!("ready");
    std::io::stdout().flush()?;
    loop {
        std::thread::park();
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match argv.as_slice() {
        ["worker", q, p, r] => (|| worker(q.parse()?, p.parse()?, r.parse()?))(),
        ["victim", rendezvous] => victim(rendezvous),
        ["compute", q, r] => (|| compute(q.parse()?, r.parse()?))(),
        ["hostile", case] => hostile(case),
        ["host", socket] => host(socket, None),
        ["host", socket, nofile] => (|| host(socket, Some(nofile.parse()?)))(),
        ["blocked", rendezvous] => blocked(rendezvous),
        _ => Err(
            "usage: userq-testclient worker QUEUES PACKETS RING | victim RENDEZVOUS | \
             compute QUEUES ROUNDS | hostile CASE | host SOCKET [NOFILE] | blocked RENDEZVOUS"
                .into(),
        ),
    };
    if let Err(e) = result {
        eprintln!("userq-testclient: {e}");
        std::process::exit(1);
    }
}
