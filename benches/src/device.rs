//! userq under measurement: a device in other processes (daemon mode: kmd-shim and the
//! firmware each in their own process; embedded mode: both as threads of one other
//! process), and the client-side measurements against it.

use crate::proc::Role;
use crate::stats::Latency;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use userq::{Command, Device, OpenMode, WaitMode};

/// How the device under test runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// kmd-shim process with a firmware child process.
    Daemon,
    /// One process running kmd-shim and the firmware as threads.
    Embedded,
}

impl Mode {
    /// A short name for tables.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Daemon => "daemon",
            Mode::Embedded => "embedded",
        }
    }
}

/// A device served by child processes; stopped on drop.
pub struct DeviceProcs {
    host: Option<Role>,
    /// The socket clients connect to.
    pub socket: PathBuf,
}

impl DeviceProcs {
    /// Starts a device in `mode` with its socket in `dir`.
    pub fn start(mode: Mode, dir: &Path) -> Result<DeviceProcs, Box<dyn std::error::Error>> {
        Self::start_with_vram(mode, dir, userq::uapi::paging::DEFAULT_VRAM)
    }

    /// Starts a device in `mode` with `vram` bytes of device memory.
    pub fn start_with_vram(
        mode: Mode,
        dir: &Path,
        vram: u64,
    ) -> Result<DeviceProcs, Box<dyn std::error::Error>> {
        let socket = dir.join(format!("{}.sock", mode.name()));
        let role = match mode {
            Mode::Daemon => "__kmd",
            Mode::Embedded => "__embedded",
        };
        let host = Role::spawn(
            role,
            &[socket.display().to_string(), vram.to_string()],
            None,
            Stdio::null(),
        )?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while kmd_shim::socket::connect(&socket).is_err() {
            if Instant::now() > deadline {
                return Err(format!("{} device did not come up", mode.name()).into());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(DeviceProcs {
            host: Some(host),
            socket,
        })
    }

    /// The process that runs the firmware: the kmd-shim's child in daemon mode, the host
    /// itself in embedded mode.
    pub fn firmware_pid(&self) -> u32 {
        let host = self.host.as_ref().map_or(0, Role::pid);
        children_of(host).first().copied().unwrap_or(host)
    }

    /// The process that serves the socket (kmd-shim in daemon mode).
    pub fn host_pid(&self) -> u32 {
        self.host.as_ref().map_or(0, Role::pid)
    }

    /// Connects a client context.
    pub fn connect(&self) -> Result<Device, userq::OpenError> {
        Device::connect(&self.socket)
    }
}

impl Drop for DeviceProcs {
    fn drop(&mut self) {
        if let Some(h) = self.host.take() {
            h.stop(Duration::from_secs(5));
        }
    }
}

fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
                out.extend(s.split_whitespace().filter_map(|x| x.parse::<u32>().ok()));
            }
        }
    }
    out
}

fn stop_flag() -> std::sync::Arc<std::sync::atomic::AtomicBool> {
    let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let _ = signal_hook::flag::register(sig, flag.clone());
    }
    flag
}

fn wait_for(flag: &std::sync::atomic::AtomicBool) {
    while !flag.load(std::sync::atomic::Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Role `__kmd SOCKET VRAM`: kmd-shim with VRAM bytes of device memory, with the firmware as a child process (this executable in
/// role `__fw`).
pub fn kmd_role(socket: &str, vram: u64) -> Result<(), Box<dyn std::error::Error>> {
    let flag = stop_flag();
    let launcher = kmd_shim::FirmwareLauncher::Process {
        program: std::env::current_exe()?,
        args: vec!["__fw".into()],
    };
    let mut config = kmd_shim::KmdConfig::new(socket, launcher);
    config.vram = vram;
    let kmd = kmd_shim::Kmd::start(config)?;
    wait_for(&flag);
    kmd.shutdown();
    Ok(())
}

/// Role `__fw --channel-fd N`: the firmware process.
pub fn fw_role(args: &[String]) -> Result<(), Box<dyn std::error::Error>> {
    let channel = match args {
        [flag, n] if flag == "--channel-fd" => fw_emu::channel::inherited_channel(n)?,
        _ => return Err("usage: __fw --channel-fd N".into()),
    };
    fw_emu::Firmware::boot(channel, fw_emu::FirmwareConfig::default())?.run();
    Ok(())
}

/// Role `__embedded SOCKET VRAM`: an embedded device serving the socket.
pub fn embedded_role(socket: &str, vram: u64) -> Result<(), Box<dyn std::error::Error>> {
    let flag = stop_flag();
    let dev = Device::builder()
        .vram(vram)
        .socket(socket)
        .mode(OpenMode::Embedded)
        .open()?;
    wait_for(&flag);
    drop(dev);
    Ok(())
}

/// NOP packets per second on one queue, `batch` packets per doorbell.
pub fn nop_throughput(
    dev: &Device,
    batch: usize,
    total: usize,
) -> Result<f64, Box<dyn std::error::Error>> {
    let mut q = dev.queue().ring_entries(4096).create()?;
    let cmds = vec![Command::nop(); batch];
    // Warm up the path and the firmware.
    q.submit_batch(&cmds)?.wait(Duration::from_secs(10))?;
    let rounds = total.div_ceil(batch);
    let t = Instant::now();
    let mut last = None;
    for _ in 0..rounds {
        last = Some(q.submit_batch(&cmds)?);
    }
    if let Some(p) = last {
        p.wait_with(WaitMode::Spin, Duration::from_secs(30))?;
    }
    Ok((rounds * batch) as f64 / t.elapsed().as_secs_f64())
}

/// Role `__scale SOCKET QUEUES ROUNDS`: round trips over several queues of one context;
/// writes `elapsed_ns` and then every latency sample (u64 little-endian) to stdout.
pub fn scale_role(
    socket: &str,
    queues: usize,
    rounds: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    use std::io::Write;
    let dev = Device::connect(socket)?;
    let mut qs = Vec::with_capacity(queues);
    for _ in 0..queues {
        qs.push(dev.queue().ring_entries(64).create()?);
    }
    let mut samples = Vec::with_capacity(queues * rounds);
    let mut points = Vec::with_capacity(queues);
    let t = Instant::now();
    for _ in 0..rounds {
        points.clear();
        let start = Instant::now();
        for q in qs.iter_mut() {
            points.push(q.submit(Command::nop())?);
        }
        for p in &points {
            p.wait_with(WaitMode::Adaptive, Duration::from_secs(30))?;
            samples.push(start.elapsed().as_nanos() as u64);
        }
    }
    let elapsed = t.elapsed().as_nanos() as u64;
    let mut out = std::io::stdout().lock();
    out.write_all(&elapsed.to_le_bytes())?;
    for s in samples {
        out.write_all(&s.to_le_bytes())?;
    }
    out.flush()?;
    Ok(())
}

/// One scaling point: `queues` queues spread over `procs` client processes.
pub struct ScalePoint {
    /// Total queues.
    pub queues: usize,
    /// Client processes.
    pub procs: usize,
    /// Aggregate NOP packets per second.
    pub packets_per_sec: f64,
    /// Round-trip latency over all queues.
    pub latency: Latency,
}

/// Role `__idle-queues SOCKET N`: a client process that opens `N` queues, says `ready` on
/// stdout, and then leaves them idle until it is stopped (bounded: it exits by itself
/// after ten minutes).
pub fn idle_queues_role(socket: &str, queues: usize) -> Result<(), Box<dyn std::error::Error>> {
    use std::io::Write;
    let dev = Device::connect(socket)?;
    let mut qs = Vec::with_capacity(queues);
    for _ in 0..queues {
        qs.push(dev.queue().ring_entries(2).create()?);
    }
    let mut out = std::io::stdout().lock();
    out.write_all(b"ready\n")?;
    out.flush()?;
    std::thread::sleep(Duration::from_secs(600));
    Ok(())
}

/// Attaches `procs` client processes with `per_proc` idle queues each to the device, runs
/// `measure` while they are attached, and stops them.
pub fn with_idle_queues<T>(
    dev: &DeviceProcs,
    procs: usize,
    per_proc: usize,
    measure: impl FnOnce() -> Result<T, Box<dyn std::error::Error>>,
) -> Result<T, Box<dyn std::error::Error>> {
    use std::io::Read;
    let mut children = Vec::with_capacity(procs);
    for _ in 0..procs {
        children.push(Role::spawn(
            "__idle-queues",
            &[dev.socket.display().to_string(), per_proc.to_string()],
            None,
            Stdio::piped(),
        )?);
    }
    for c in &mut children {
        let mut ready = [0u8; 6];
        c.child()
            .stdout
            .as_mut()
            .expect("piped")
            .read_exact(&mut ready)?;
        if &ready != b"ready\n" {
            return Err("an idle-queue client did not come up".into());
        }
    }
    let result = measure();
    for c in children {
        c.stop(Duration::from_secs(2));
    }
    result
}

/// Runs one scaling point against a device.
pub fn scaling_point(
    dev: &DeviceProcs,
    queues: usize,
    procs: usize,
    rounds: usize,
) -> Result<ScalePoint, Box<dyn std::error::Error>> {
    use std::io::Read;
    let per = queues / procs;
    let mut children = Vec::new();
    for _ in 0..procs {
        children.push(Role::spawn(
            "__scale",
            &[
                dev.socket.display().to_string(),
                per.to_string(),
                rounds.to_string(),
            ],
            None,
            Stdio::piped(),
        )?);
    }
    let mut latency = Latency::new();
    let mut slowest = 0u64;
    let mut packets = 0usize;
    for mut c in children {
        let mut bytes = Vec::new();
        c.child()
            .stdout
            .take()
            .expect("piped")
            .read_to_end(&mut bytes)?;
        let status = c.child().wait()?;
        if !status.success() || bytes.len() < 8 {
            return Err(format!("scaling client failed: {status}").into());
        }
        let mut words = bytes
            .chunks_exact(8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
        slowest = slowest.max(words.next().unwrap_or(0));
        for s in words {
            latency.record(s);
            packets += 1;
        }
    }
    Ok(ScalePoint {
        queues,
        procs,
        packets_per_sec: packets as f64 / (slowest.max(1) as f64 / 1e9),
        latency,
    })
}

/// CPU share of a process over `window`, starting `idle_for` after the last work.
pub fn idle_cpu(pid: u32, idle_for: Duration, window: Duration) -> std::io::Result<f64> {
    std::thread::sleep(idle_for);
    let ticks = || -> std::io::Result<u64> {
        let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        let rest = s.rsplit_once(") ").map(|x| x.1).unwrap_or("");
        let f: Vec<&str> = rest.split_whitespace().collect();
        let p = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        Ok(p(11) + p(12))
    };
    let t0 = Instant::now();
    let c0 = ticks()?;
    std::thread::sleep(window);
    let c1 = ticks()?;
    let hz = rustix::param::clock_ticks_per_second() as f64;
    Ok((c1 - c0) as f64 / hz / t0.elapsed().as_secs_f64())
}
