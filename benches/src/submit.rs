//! What a submit costs on the host while the firmware is awake: time per
//! [`userq::Queue::enqueue`] over blocks of submits, and the syscalls the submitting
//! thread makes (counted by `strace`, attached to that thread alone).

use crate::device::DeviceProcs;
use crate::proc::Role;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use userq::{Command, Device, WaitMode};

/// Median cost of one [`userq::Queue::enqueue`] of a NOP while the firmware is awake, measured over
/// blocks of 256 submits (so the clock is read once per block), and how many of those
/// submits made the one syscall the submit path has (a futex wake of a sleeping firmware).
pub fn submit_cost(dev: &Device, blocks: usize) -> Result<SubmitCost, Box<dyn std::error::Error>> {
    const BLOCK: usize = 256;
    let mut q = dev.queue().ring_entries(65536).create()?;
    let mut per_submit = Vec::with_capacity(blocks);
    // Wake the firmware and let it poll the new queue first: this measures submits while
    // it is awake (a doorbell that finds it asleep makes a futex wake, counted below).
    q.submit(Command::nop())?
        .wait_with(WaitMode::Spin, Duration::from_secs(10))?;
    let (wakes_before, sleeps_before) = (q.firmware_wakes(), dev.firmware_sleeps());
    for _ in 0..blocks {
        if q.ring_entries() - (q.last_submitted().value() - q.timeline().value()) < BLOCK as u64 * 2
        {
            q.finish(Duration::from_secs(10))?;
        }
        let t = Instant::now();
        for _ in 0..BLOCK {
            q.enqueue(&[Command::nop()])?;
        }
        per_submit.push(t.elapsed().as_nanos() as f64 / BLOCK as f64);
    }
    let wakes = q.firmware_wakes() - wakes_before;
    let sleeps = dev.firmware_sleeps() - sleeps_before;
    q.finish(Duration::from_secs(10))?;
    per_submit.sort_by(f64::total_cmp);
    let at = |q: f64| per_submit[((per_submit.len() - 1) as f64 * q).round() as usize];
    Ok(SubmitCost {
        median_ns: at(0.5),
        p99_ns: at(0.99),
        futex_wakes: wakes,
        firmware_sleeps: sleeps,
    })
}

/// What one round of [`submit_cost`] measured: ns per submit over blocks of 256.
#[derive(Debug, Clone, Copy)]
pub struct SubmitCost {
    /// Median over the blocks.
    pub median_ns: f64,
    /// 99th percentile over the blocks.
    pub p99_ns: f64,
    /// Futex wakes the submits made (doorbells that found the firmware asleep).
    pub futex_wakes: u64,
    /// Sleeps the firmware announced meanwhile (each costs the queue at most one wake).
    pub firmware_sleeps: u64,
}

/// Layout of the probe's shared words: the probe's thread id, the parent's "go", the
/// probe's "done".
const PROBE_TID: usize = 0;
const PROBE_GO: usize = 64;
const PROBE_DONE: usize = 128;

/// Counts, with `strace -c` attached to the submitting thread alone, the syscalls made
/// while that thread submits `n` NOPs to a device whose firmware is awake. An independent
/// check of the submit path's "no syscall" claim. `Ok(None)` when strace is not installed
/// or may not attach here.
pub fn submit_syscalls(
    dev: &DeviceProcs,
    n: usize,
) -> Result<Option<u64>, Box<dyn std::error::Error>> {
    use std::sync::atomic::Ordering::*;
    let Some(strace) = which("strace") else {
        return Ok(None);
    };
    let (fd, map) = crate::proc::shared_memory(4096)?;
    let raw = rustix::fd::AsRawFd::as_raw_fd(&fd).to_string();
    let _probe = Role::spawn(
        "__submit-probe",
        &[dev.socket.display().to_string(), raw, n.to_string()],
        Some(&fd),
        Stdio::null(),
    )?;
    let word = |off| map.word64(off).expect("probe word");
    let deadline = Instant::now() + Duration::from_secs(20);
    while word(PROBE_TID).load(Acquire) == 0 {
        if Instant::now() > deadline {
            return Err("submit probe did not start".into());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let tid = word(PROBE_TID).load(Acquire);
    let out = std::env::temp_dir().join(format!("userq-bench-strace-{}", std::process::id()));
    let mut tracer = std::process::Command::new(strace)
        .args(["-c", "-q", "-o"])
        .arg(&out)
        .args(["-p", &tid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    // Wait until the tracer is attached to that thread.
    let attached = loop {
        let status = std::fs::read_to_string(format!("/proc/{tid}/status")).unwrap_or_default();
        let tracer_pid = status
            .lines()
            .find_map(|l| l.strip_prefix("TracerPid:"))
            .and_then(|v| v.trim().parse::<u32>().ok())
            .unwrap_or(0);
        if tracer_pid != 0 {
            break true;
        }
        if Instant::now() > deadline || matches!(tracer.try_wait(), Ok(Some(_))) {
            break false;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    if !attached {
        let _ = tracer.kill();
        let _ = tracer.wait();
        let _ = std::fs::remove_file(&out);
        return Ok(None);
    }
    word(PROBE_GO).store(1, Release);
    while word(PROBE_DONE).load(Acquire) == 0 {
        if Instant::now() > deadline {
            let _ = tracer.kill();
            return Err("submit probe did not finish".into());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    if let Some(p) = rustix::process::Pid::from_raw(tracer.id() as i32) {
        let _ = rustix::process::kill_process(p, rustix::process::Signal::INT);
    }
    let _ = tracer.wait();
    let text = std::fs::read_to_string(&out).unwrap_or_default();
    let _ = std::fs::remove_file(&out);
    // The summary's last row: "100.00 0.000010 10 1 total" (calls in the fourth column);
    // no row at all when nothing was traced.
    let calls = text
        .lines()
        .find(|l| l.trim_end().ends_with("total"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|c| c.parse::<u64>().ok())
        .unwrap_or(0);
    Ok(Some(calls))
}

/// Role `__submit-probe SOCKET FD N`: warms up a queue, keeps the firmware busy from a
/// second thread, publishes its thread id, spins (without a syscall) until told to go,
/// submits N NOPs, says done, and spins until killed.
pub fn submit_probe_role(
    socket: &str,
    fd: &str,
    n: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    use std::sync::atomic::Ordering::*;
    let map = crate::proc::inherited_memory(fd)?;
    let word = |off| map.word64(off).expect("probe word");
    let dev = Device::connect(socket)?;
    let mut q = dev.queue().ring_entries(65536).create()?;
    for _ in 0..1000 {
        q.enqueue(&[Command::nop()])?;
    }
    q.finish(Duration::from_secs(10))?;
    let cmd = [Command::nop()];
    // "While the firmware is awake": another thread (not traced) keeps it busy on a
    // queue of its own for the whole window.
    let keeper_dev = dev.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    std::thread::spawn(move || -> Result<(), userq::SubmitError> {
        let Ok(mut k) = keeper_dev.queue().ring_entries(1024).create() else {
            return Ok(());
        };
        while !stop2.load(Relaxed) {
            k.submit(Command::nop())?;
        }
        Ok(())
    });
    std::thread::sleep(Duration::from_millis(20));
    word(PROBE_TID).store(
        rustix::thread::gettid().as_raw_nonzero().get() as u64,
        Release,
    );
    while word(PROBE_GO).load(Acquire) == 0 {
        core::hint::spin_loop();
    }
    for _ in 0..n {
        q.enqueue(&cmd)?;
    }
    word(PROBE_DONE).store(1, Release);
    stop.store(true, Relaxed);
    loop {
        core::hint::spin_loop();
    }
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}
