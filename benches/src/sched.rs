//! The firmware scheduler's bounds, measured against a daemon-mode device: fairness
//! between equal queues (engine time counted by the built-in `SPIN_COUNTED` kernel), a
//! high-priority round trip through saturating low-priority work, and many queues from
//! several processes.

use crate::device::DeviceProcs;
use crate::proc::Role;
use crate::stats::{time_each, Latency};
use std::process::Stdio;
use std::time::{Duration, Instant};
use userq::{kernels, Device, Priority, WaitMode};

/// Engine time of two equal-priority queues running endless spin kernels, over `window`.
pub fn fairness(dev: &Device, window: Duration) -> Result<(u64, u64), Box<dyn std::error::Error>> {
    let counters = [dev.alloc::<u64>(1)?, dev.alloc::<u64>(1)?];
    // Endless dispatches that finish workgroups all the time: long-running queues.
    let lr = || dev.queue().long_running(Duration::from_secs(1)).create();
    let mut queues = vec![lr()?, lr()?];
    for (q, c) in queues.iter_mut().zip(&counters) {
        q.submit(kernels::spin_counted(1_000_000_000, 100_000, c)?)?;
    }
    std::thread::sleep(Duration::from_millis(100));
    let before = [counters[0].read(0), counters[1].read(0)];
    std::thread::sleep(window);
    let after = [counters[0].read(0), counters[1].read(0)];
    drop(queues); // cancels the endless dispatches
    Ok((after[0] - before[0], after[1] - before[1]))
}

/// Round trips of a small high-priority dispatch while 8 low-priority queues keep every
/// engine busy with 1 ms workgroups. The client blocks while it waits: on a 2-core machine
/// a spinning client would take the core the command processor needs.
pub fn priority(dev: &Device, iters: usize) -> Result<Latency, Box<dyn std::error::Error>> {
    let mut low: Vec<_> = (0..8)
        .map(|_| {
            dev.queue()
                .priority(Priority::Low)
                .job_timeout(userq::uapi::watchdog::MAX_TIMEOUT)
                .create()
        })
        .collect::<Result<_, _>>()?;
    for q in &mut low {
        q.submit(kernels::spin(1_000_000, 1_000_000)?)?;
    }
    std::thread::sleep(Duration::from_millis(50));
    let mut high = dev.queue().priority(Priority::High).create()?;
    let buf = dev.alloc::<f32>(4096)?;
    let cmd = kernels::scale(4096, 1.0, &buf)?;
    let lat = time_each(iters / 10, iters, || {
        high.submit(cmd.clone())
            .expect("submit")
            .wait_with(WaitMode::Block, Duration::from_secs(10))
            .expect("wait");
    });
    drop(low);
    Ok(lat)
}

/// What the oversubscription run saw.
#[derive(Debug, Clone)]
pub struct Oversubscription {
    /// Client processes.
    pub procs: usize,
    /// Queues of each.
    pub queues: usize,
    /// Dependent dispatches per queue.
    pub rounds: usize,
    /// Clients that exited successfully: every queue completed and every result checked.
    pub completed: usize,
    /// What happened to the others, one line each.
    pub failures: Vec<String>,
    /// Wall time until the last client ended, or until the limit.
    pub elapsed: Duration,
}

/// `procs` client processes with `queues` queues each, every queue running `rounds`
/// dependent dispatches. A client that fails, or is not done after `limit` (it is killed
/// then), is counted as a failure rather than ending the run.
pub fn oversubscription(
    dev: &DeviceProcs,
    procs: usize,
    queues: usize,
    rounds: usize,
    limit: Duration,
) -> Result<Oversubscription, Box<dyn std::error::Error>> {
    let t = Instant::now();
    let mut children = Vec::new();
    for _ in 0..procs {
        children.push(Some(Role::spawn(
            "__sched-client",
            &[
                dev.socket.display().to_string(),
                queues.to_string(),
                rounds.to_string(),
            ],
            None,
            Stdio::null(),
        )?));
    }
    let mut out = Oversubscription {
        procs,
        queues,
        rounds,
        completed: 0,
        failures: Vec::new(),
        elapsed: Duration::ZERO,
    };
    let deadline = t + limit;
    while children.iter().any(Option::is_some) {
        for (i, slot) in children.iter_mut().enumerate() {
            let Some(c) = slot else { continue };
            match c.child().try_wait()? {
                Some(s) if s.success() => out.completed += 1,
                Some(s) => out.failures.push(format!("client {i}: {s}")),
                None if Instant::now() >= deadline => {
                    out.failures
                        .push(format!("client {i}: not done after {limit:?}; killed"));
                }
                None => continue,
            }
            // Reaped above, or killed and reaped by the drop.
            *slot = None;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    // Measured to within the millisecond the loop above sleeps.
    out.elapsed = t.elapsed();
    Ok(out)
}

/// Role `__sched-client SOCKET QUEUES ROUNDS`.
pub fn client_role(
    socket: &str,
    queues: usize,
    rounds: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    let dev = Device::connect(socket)?;
    let n = 4096u32;
    let mut work = Vec::new();
    for _ in 0..queues {
        let q = dev.queue().ring_entries(16).create()?;
        let mut b = dev.alloc::<f32>(n as usize)?;
        b.copy_from_slice(&vec![1.0; n as usize]);
        work.push((q, b));
    }
    for _ in 0..rounds {
        for (q, b) in work.iter_mut() {
            q.submit(kernels::scale(n, 2.0, b)?)?;
        }
    }
    let want = (1u64 << rounds.min(60)) as f32;
    // 120 s for all the queues together.
    let deadline = Instant::now() + Duration::from_secs(120);
    for (q, b) in &work {
        q.finish(deadline.saturating_duration_since(Instant::now()))?;
        if b.to_vec().iter().any(|&v| v != want) {
            return Err("wrong result".into());
        }
    }
    Ok(())
}
