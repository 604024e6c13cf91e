//! Resets, measured against a daemon-mode device: hang detection and reset time against
//! the configured job timeout, an innocent context's round trips during a storm of hangs
//! and resets in another context (and without it), the footprint of kmd-shim and fw-emu
//! after many client kills, how long blocked waiters in 4 processes take to see
//! `DeviceLost` after the firmware is killed, and how long until the restarted firmware
//! runs a new context's work.

use crate::device::DeviceProcs;
use crate::proc::Role;
use crate::stats::{Latency, Summary};
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use userq::uapi::observe::Footprint;
use userq::{kernels, Command, Device, WaitError, WaitMode};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// What [`measure`] found.
#[derive(Debug, Clone, Default)]
pub struct ResetFigures {
    /// Per configured job timeout: the times from submitting a `no_progress` dispatch to
    /// its waiter returning the reset.
    pub detection: Vec<(Duration, Vec<Duration>)>,
    /// An innocent context's NOP round trips, quiet and during the storm.
    pub nop_quiet: Summary,
    /// As above, during the storm.
    pub nop_storm: Summary,
    /// An innocent context's 1-workgroup dispatch round trips, quiet.
    pub dispatch_quiet: Summary,
    /// As above, during the storm.
    pub dispatch_storm: Summary,
    /// Resets during the storm.
    pub storm_resets: u32,
    /// The storm's job timeout.
    pub storm_timeout: Duration,
    /// Client processes SIGKILLed while submitting.
    pub kills: usize,
    /// (kmd-shim fds, kmd-shim RSS kB, fw-emu fds, fw-emu RSS kB) after a warm-up, before
    /// the kills.
    pub before: (usize, u64, usize, u64),
    /// The same after the kills (and a moment to reclaim).
    pub after: (usize, u64, usize, u64),
    /// Per waiter process: from the firmware's SIGKILL to its blocked wait returning
    /// `DeviceLost`.
    pub lost_after: Vec<Duration>,
    /// From the firmware's SIGKILL to a new context's NOP completing on the restarted
    /// firmware.
    pub restart: Option<Duration>,
}

fn now_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

fn both(procs: &DeviceProcs) -> (usize, u64, usize, u64) {
    let k = Footprint::of(procs.host_pid());
    let f = Footprint::of(procs.firmware_pid());
    (k.fds, k.rss_kb, f.fds, f.rss_kb)
}

/// Hangs one fresh context (so that no context is banned) with `timeout`; returns the
/// time until its waiter got the reset.
fn one_hang(procs: &DeviceProcs, timeout: Duration) -> Res<Duration> {
    let guilty = procs.connect()?;
    let mut q = guilty.queue().job_timeout(timeout).create()?;
    let t = Instant::now();
    match q
        .submit(kernels::no_progress())?
        .wait(Duration::from_secs(60))
    {
        Err(WaitError::Faulted(_)) => Ok(t.elapsed()),
        other => Err(format!("a hang ended with {other:?}").into()),
    }
}

/// NOP round trips, and every tenth a 1-workgroup dispatch, for `window`.
fn round_trips(dev: &Device, window: Duration) -> Res<(Latency, Latency)> {
    let mut q = dev.create_queue()?;
    let buf = dev.alloc::<f32>(256)?;
    let dispatch = kernels::scale(256, 1.0, &buf)?;
    let (mut nop, mut disp) = (Latency::new(), Latency::new());
    let start = Instant::now();
    for i in 0.. {
        if start.elapsed() >= window {
            break;
        }
        let t = Instant::now();
        q.submit(Command::nop())?
            .wait_with(WaitMode::Spin, Duration::from_secs(60))?;
        nop.record(t.elapsed().as_nanos() as u64);
        if i % 10 == 0 {
            let t = Instant::now();
            q.submit(dispatch.clone())?
                .wait_with(WaitMode::Spin, Duration::from_secs(60))?;
            disp.record(t.elapsed().as_nanos() as u64);
        }
    }
    Ok((nop, disp))
}

/// Runs every measurement on a fresh daemon in `dir`.
pub fn measure(dir: &std::path::Path, quick: bool) -> Res<ResetFigures> {
    let procs = DeviceProcs::start(crate::device::Mode::Daemon, dir)?;
    let mut out = ResetFigures::default();
    let reps = if quick { 2 } else { 5 };
    for ms in [50u64, 100, 250] {
        let t = Duration::from_millis(ms);
        let times = (0..reps)
            .map(|_| one_hang(&procs, t))
            .collect::<Res<Vec<_>>>()?;
        out.detection.push((t, times));
    }

    // An innocent context's round trips, quiet, then during a storm of hangs.
    let innocent = procs.connect()?;
    let window = Duration::from_secs(if quick { 1 } else { 3 });
    let (nop, disp) = round_trips(&innocent, window)?;
    out.nop_quiet = nop.summary();
    out.dispatch_quiet = disp.summary();
    out.storm_timeout = Duration::from_millis(20);
    let stop = Arc::new(AtomicBool::new(false));
    let resets = Arc::new(AtomicU32::new(0));
    let storm = {
        let (stop, resets, socket) = (stop.clone(), resets.clone(), procs.socket.clone());
        let timeout = out.storm_timeout;
        std::thread::spawn(move || -> Result<(), String> {
            while !stop.load(Relaxed) {
                let guilty = Device::connect(&socket).map_err(|e| e.to_string())?;
                let mut q = guilty
                    .queue()
                    .job_timeout(timeout)
                    .create()
                    .map_err(|e| e.to_string())?;
                let p = q
                    .submit(kernels::no_progress())
                    .map_err(|e| e.to_string())?;
                if p.wait(Duration::from_secs(60)).is_ok() {
                    return Err("a hang completed".into());
                }
                resets.fetch_add(1, Relaxed);
            }
            Ok(())
        })
    };
    std::thread::sleep(Duration::from_millis(50));
    let measured = round_trips(&innocent, window);
    stop.store(true, Relaxed);
    storm
        .join()
        .map_err(|_| "storm thread panicked")?
        .map_err(|e| format!("storm: {e}"))?;
    let (nop, disp) = measured?;
    out.nop_storm = nop.summary();
    out.dispatch_storm = disp.summary();
    out.storm_resets = resets.load(Relaxed);
    drop(innocent);

    // Client kills: warm up, take the footprint, kill many, take it again.
    out.kills = if quick { 40 } else { 200 };
    for _ in 0..5 {
        kill_one_victim(&procs)?;
    }
    std::thread::sleep(Duration::from_millis(200));
    out.before = both(&procs);
    for _ in 0..out.kills {
        kill_one_victim(&procs)?;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        out.after = both(&procs);
        if (out.after.0 <= out.before.0 && out.after.2 <= out.before.2) || Instant::now() > deadline
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }

    // Firmware killed: blocked waiters in 4 processes, then the restart.
    let mut waiters = (0..4)
        .map(|_| {
            Role::spawn(
                "__lost-waiter",
                &[procs.socket.display().to_string()],
                None,
                Stdio::piped(),
            )
        })
        .collect::<std::io::Result<Vec<_>>>()?;
    let mut lines = Vec::new();
    for w in &mut waiters {
        let out = w.child().stdout.take().ok_or("waiter stdout")?;
        let mut r = BufReader::new(out);
        let mut line = String::new();
        r.read_line(&mut line)?;
        if line.trim() != "ready" {
            return Err(format!("waiter said {line:?}").into());
        }
        lines.push(r);
    }
    std::thread::sleep(Duration::from_millis(100));
    let fw = procs.firmware_pid();
    let killed_ns = now_ns();
    let killed = Instant::now();
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(fw as i32).ok_or("firmware pid")?,
        rustix::process::Signal::KILL,
    )?;
    for r in &mut lines {
        let mut line = String::new();
        r.read_line(&mut line)?;
        let at: u64 = line
            .trim()
            .strip_prefix("lost ")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("waiter said {line:?}"))?;
        out.lost_after
            .push(Duration::from_nanos(at.saturating_sub(killed_ns)));
    }
    for w in waiters {
        w.stop(Duration::from_secs(5));
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(dev) = procs.connect() {
            let mut q = dev.create_queue()?;
            q.submit(Command::nop())?.wait(Duration::from_secs(10))?;
            out.restart = Some(killed.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(out)
}

/// Spawns a client that submits in a loop, waits until it does, and SIGKILLs it.
fn kill_one_victim(procs: &DeviceProcs) -> Res<()> {
    let mut v = Role::spawn(
        "__victim",
        &[procs.socket.display().to_string()],
        None,
        Stdio::piped(),
    )?;
    let out = v.child().stdout.take().ok_or("victim stdout")?;
    let mut line = String::new();
    BufReader::new(out).read_line(&mut line)?;
    if line.trim() != "ready" {
        return Err(format!("victim said {line:?}").into());
    }
    let _ = v.child().kill();
    let _ = v.child().wait();
    Ok(())
}

/// Role `__victim SOCKET`: a context with a queue, a fence and a buffer, submitting NOPs
/// in a loop until killed.
pub fn victim_role(socket: &str) -> Res<()> {
    use std::io::Write;
    let dev = Device::connect(socket)?;
    let mut q = dev.create_queue()?;
    let _fence = dev.create_fence(0)?;
    let _buf = dev.alloc::<u64>(1 << 16)?;
    q.submit(Command::nop())?.wait(Duration::from_secs(10))?;
    println!("ready");
    std::io::stdout().flush()?;
    let nops = vec![Command::nop(); 16];
    loop {
        q.submit_batch(&nops)?;
    }
}

/// Role `__lost-waiter SOCKET`: blocks on a fence nobody signals; prints the monotonic
/// time at which the wait returned `DeviceLost`.
pub fn lost_waiter_role(socket: &str) -> Res<()> {
    use std::io::Write;
    let dev = Device::connect(socket)?;
    let f = dev.create_fence(0)?;
    println!("ready");
    std::io::stdout().flush()?;
    let r = f.wait_with(1, WaitMode::Block, Duration::MAX);
    let at = now_ns();
    match r {
        Err(WaitError::DeviceLost) => println!("lost {at}"),
        other => println!("unexpected {other:?}"),
    }
    std::io::stdout().flush()?;
    Ok(())
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn us(ns: u64) -> String {
    format!("{:.1} µs", ns as f64 / 1e3)
}

impl ResetFigures {
    /// Human-readable lines.
    pub fn print(&self) {
        println!("\nresets (daemon mode)");
        for (t, times) in &self.detection {
            let mut v = times.clone();
            v.sort();
            let r: Vec<String> = v
                .iter()
                .map(|d| format!("{:.2}", d.as_secs_f64() / t.as_secs_f64()))
                .collect();
            println!(
                "  hang detected and queue reset, job timeout {:>6}: median {} (×timeout {})",
                ms(*t),
                ms(v[v.len() / 2]),
                r.join(" ")
            );
        }
        println!(
            "  innocent NOP round trip p50/p99: quiet {} / {}, during {} resets (timeout {}) {} / {}",
            us(self.nop_quiet.p50),
            us(self.nop_quiet.p99),
            self.storm_resets,
            ms(self.storm_timeout),
            us(self.nop_storm.p50),
            us(self.nop_storm.p99)
        );
        println!(
            "  innocent 1-workgroup DISPATCH round trip p50/p99/p99.9: quiet {} / {} / {}, during the storm {} / {} / {}",
            us(self.dispatch_quiet.p50),
            us(self.dispatch_quiet.p99),
            us(self.dispatch_quiet.p999),
            us(self.dispatch_storm.p50),
            us(self.dispatch_storm.p99),
            us(self.dispatch_storm.p999)
        );
        println!(
            "  {} client kills: kmd-shim {} fds {} kB -> {} fds {} kB; fw-emu {} fds {} kB -> {} fds {} kB",
            self.kills,
            self.before.0,
            self.before.1,
            self.after.0,
            self.after.1,
            self.before.2,
            self.before.3,
            self.after.2,
            self.after.3
        );
        let lost: Vec<String> = self.lost_after.iter().map(|d| ms(*d)).collect();
        println!(
            "  firmware SIGKILLed: blocked waiters in {} processes got DeviceLost after {}",
            self.lost_after.len(),
            lost.join(", ")
        );
        match self.restart {
            Some(d) => println!(
                "  restarted firmware ran a new context's NOP {} after the kill",
                ms(d)
            ),
            None => println!("  the firmware did not come back within 20 s"),
        }
    }

    /// The figures as JSON.
    pub fn json(&self) -> serde_json::Value {
        use serde_json::json;
        let s = |x: &Summary| json!({"p50_ns": x.p50, "p99_ns": x.p99, "p999_ns": x.p999});
        json!({
            "detection": self.detection.iter().map(|(t, v)| json!({
                "timeout_ms": t.as_millis() as u64,
                "measured_ms": v.iter().map(|d| d.as_secs_f64() * 1e3).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "innocent_nop": {"quiet": s(&self.nop_quiet), "storm": s(&self.nop_storm)},
            "innocent_dispatch": {"quiet": s(&self.dispatch_quiet), "storm": s(&self.dispatch_storm)},
            "storm_resets": self.storm_resets,
            "storm_timeout_ms": self.storm_timeout.as_millis() as u64,
            "kills": self.kills,
            "before": {"kmd_fds": self.before.0, "kmd_rss_kb": self.before.1, "fw_fds": self.before.2, "fw_rss_kb": self.before.3},
            "after": {"kmd_fds": self.after.0, "kmd_rss_kb": self.after.1, "fw_fds": self.after.2, "fw_rss_kb": self.after.3},
            "device_lost_ms": self.lost_after.iter().map(|d| d.as_secs_f64() * 1e3).collect::<Vec<_>>(),
            "restart_ms": self.restart.map(|d| d.as_secs_f64() * 1e3),
        })
    }
}
