//! Resets, as a user sees them: a hung queue beside a busy innocent one, a context banned
//! for hanging again and again, and a firmware killed and restarted.
//!
//! This executable is two programs, as `custom_firmware` is: with `--channel-fd N` it is
//! the firmware (fw-emu's library); without arguments it runs kmd-shim's library in this
//! process with itself as the firmware child process, so that the firmware can be killed.
//!
//! cargo run --release --example reset

use std::time::{Duration, Instant};
use userq::{kernels, Device, ErrorCode, QueueCreateError, WaitError};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

const LONG: Duration = Duration::from_secs(30);

/// Firmware mode.
fn firmware(fd: &str) -> Res<()> {
    let channel = fw_emu::channel::inherited_channel(fd)?;
    fw_emu::Firmware::boot(channel, fw_emu::FirmwareConfig::default())?.run();
    Ok(())
}

/// One dispatch on `q`, checked against the CPU: `n` floats scaled by 2.
fn verified_dispatch(dev: &Device, q: &mut userq::Queue, seed: f32) -> Res<()> {
    let n = 4096;
    let mut buf = dev.alloc::<f32>(n)?;
    let input: Vec<f32> = (0..n).map(|i| seed + i as f32).collect();
    buf.copy_from_slice(&input);
    q.submit(kernels::scale(n as u32, 2.0, &buf)?)?.wait(LONG)?;
    if buf.to_vec() != input.iter().map(|x| 2.0 * x).collect::<Vec<_>>() {
        return Err("an innocent dispatch computed a wrong result".into());
    }
    Ok(())
}

/// Part 1: a queue hangs; the innocent queue beside it keeps completing verified work.
fn hang(guilty: &Device, innocent: &Device) -> Res<()> {
    let timeout = Duration::from_millis(250);
    let mut stuck = guilty.queue().job_timeout(timeout).create()?;
    let mut busy = innocent.create_queue()?;
    let t = Instant::now();
    let hung = stuck.submit(kernels::no_progress())?;
    let waiter = std::thread::spawn(move || (hung.wait(Duration::MAX), Instant::now()));
    // While it hangs: a workgroup without checkpoints holds its engine until the reset, so
    // on a machine with one engine the innocent queue's dispatches wait for the reset, and
    // on more engines they run beside it.
    let mut during = 0u32;
    while !waiter.is_finished() {
        verified_dispatch(innocent, &mut busy, during as f32)?;
        during += 1;
    }
    let (result, at) = waiter.join().map_err(|_| "waiter panicked")?;
    let fault = match result {
        Err(WaitError::Faulted(f)) if f.code == Some(ErrorCode::JobTimeout) => f,
        other => return Err(format!("the hung queue's wait ended with {other:?}").into()),
    };
    println!(
        "hang: a no-progress kernel (job timeout {timeout:?}) was detected and its queue reset after {:?}; its waiter got: {fault}",
        at.duration_since(t)
    );
    for i in 0..10 {
        verified_dispatch(innocent, &mut busy, i as f32)?;
    }
    println!(
        "innocent: the queue beside it completed {during} verified dispatches while it hung and 10 more after the reset, none lost; its context is {:?}, the guilty one {:?}",
        innocent.reset_stats()?.status(),
        guilty.reset_stats()?.status()
    );
    Ok(())
}

/// Part 2: the guilty context keeps hanging until it is banned.
fn ban(guilty: &Device, innocent: &Device) -> Res<()> {
    for attempt in 1..=10 {
        let mut q = match guilty
            .queue()
            .job_timeout(Duration::from_millis(50))
            .create()
        {
            Ok(q) => q,
            Err(QueueCreateError::Banned) => {
                let s = guilty.reset_stats()?;
                println!(
                    "ban: after {} hangs the context was banned (guilty {}, banned {}); a new queue is refused",
                    s.guilty, s.guilty, s.banned
                );
                let mut q = innocent.create_queue()?;
                verified_dispatch(innocent, &mut q, 1.0)?;
                println!("innocent: still runs verified work");
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        let r = q.submit(kernels::no_progress())?.wait(LONG);
        if !matches!(r, Err(WaitError::Faulted(_))) {
            return Err(format!("hang {attempt} ended with {r:?}").into());
        }
    }
    Err("the context was never banned".into())
}

/// Part 3: the firmware process is killed; waiters get DeviceLost; kmd-shim restarts it.
fn restart(kmd: &kmd_shim::Kmd, socket: &std::path::Path, old: &Device) -> Res<()> {
    let pid = kmd.firmware_pid().ok_or("no firmware process")?;
    let fence = old.create_fence(0)?;
    let waiter = std::thread::spawn(move || (fence.wait(1, Duration::MAX), Instant::now()));
    std::thread::sleep(Duration::from_millis(50));
    let killed = Instant::now();
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid as i32).ok_or("pid")?,
        rustix::process::Signal::KILL,
    )?;
    let (result, at) = waiter.join().map_err(|_| "waiter panicked")?;
    if result != Err(WaitError::DeviceLost) {
        return Err(format!("the waiter got {result:?}").into());
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while kmd.generation() < 2 {
        if Instant::now() > deadline {
            return Err("the firmware was not restarted".into());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let restarted = killed.elapsed();
    let dev = Device::connect(socket)?;
    let mut q = dev.create_queue()?;
    verified_dispatch(&dev, &mut q, 3.0)?;
    println!(
        "firmware: killed (pid {pid}); a blocked waiter got DeviceLost after {:?}; restarted as generation {} (pid {}) {:?} after the kill; a new context ran verified work; the old one reports lost: {}",
        at.duration_since(killed),
        dev.generation(),
        kmd.firmware_pid().unwrap_or(0),
        restarted,
        old.is_lost()
    );
    Ok(())
}

fn demo() -> Res<()> {
    let dir = std::env::temp_dir().join(format!("userq-reset-{}", std::process::id()));
    let socket = dir.join("dev.sock");
    let launcher = kmd_shim::FirmwareLauncher::Process {
        program: std::env::current_exe()?,
        args: Vec::new(),
    };
    let kmd = kmd_shim::Kmd::start(kmd_shim::KmdConfig::new(&socket, launcher))?;
    let result = (|| -> Res<()> {
        let guilty = Device::connect(&socket)?;
        let innocent = Device::connect(&socket)?;
        hang(&guilty, &innocent)?;
        ban(&guilty, &innocent)?;
        restart(&kmd, &socket, &innocent)
    })();
    kmd.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [flag, fd] if flag == "--channel-fd" => firmware(fd),
        [] => demo(),
        _ => Err("usage: reset                   (demo)\n       reset --channel-fd N    (as kmd-shim's firmware)".into()),
    }
}
