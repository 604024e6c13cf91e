//! Round trips on a device: NOPs (spinning or blocking), cold ones that must wake a
//! sleeping firmware, and one-workgroup DISPATCHes.

use crate::stats::{time_each, Latency};
use std::time::{Duration, Instant};
use userq::{Command, Device, WaitMode};

/// NOP round trips: enqueue one NOP, wait for its timeline value (the reference-count-free
/// path).
pub fn nop_round_trip(
    dev: &Device,
    mode: WaitMode,
    warmup: usize,
    iters: usize,
) -> Result<Latency, Box<dyn std::error::Error>> {
    let mut q = dev.queue().ring_entries(1024).create()?;
    Ok(round_trips(&mut q, &[Command::nop()], mode, warmup, iters))
}

/// Times `iters` round trips of `cmds` on `q` (enqueue, then wait for their timeline value
/// with `mode`), after `warmup` untimed ones.
fn round_trips(
    q: &mut userq::Queue,
    cmds: &[Command],
    mode: WaitMode,
    warmup: usize,
    iters: usize,
) -> Latency {
    let timeline = q.timeline().clone();
    time_each(warmup, iters, || {
        let v = q.enqueue(cmds).expect("submit");
        timeline
            .wait_with(v, mode, Duration::from_secs(10))
            .expect("wait");
    })
}

/// How long a cold round trip leaves the device idle first: longer than the firmware's
/// spin-and-yield before it sleeps (2 ms).
pub const COLD_IDLE: Duration = Duration::from_millis(4);

/// Cold NOP round trips: before each one the device is left idle long enough for the
/// firmware to go to sleep, so the doorbell must wake it (a futex wake) and, with
/// [`WaitMode::Block`], the completion must wake the blocked client (another): the same two
/// wake-ups as the shared-futex ping-pong. [`WaitMode::Adaptive`] (the default wait) is
/// the same round trip as a user who did not choose a mode takes it. The idle time is not
/// timed.
pub fn cold_round_trip(
    dev: &Device,
    mode: WaitMode,
    iters: usize,
) -> Result<Latency, Box<dyn std::error::Error>> {
    let mut q = dev.queue().create()?;
    let timeline = q.timeline().clone();
    let nop = [Command::nop()];
    let mut lat = Latency::new();
    for _ in 0..iters {
        std::thread::sleep(COLD_IDLE);
        let t = Instant::now();
        let v = q.enqueue(&nop)?;
        timeline.wait_with(v, mode, Duration::from_secs(10))?;
        lat.record(t.elapsed().as_nanos() as u64);
    }
    Ok(lat)
}

/// Cold round trips through a host signal: a NOP waits on a user fence (the queue parks
/// on it), the device is left idle long enough for the firmware to go to sleep, then the
/// host signals the fence, which has to wake the firmware for the parked queue, and waits
/// for the NOP with `mode`. Timed from the signal to the wait's return; the idle time is
/// not timed.
pub fn cold_signal_round_trip(
    dev: &Device,
    mode: WaitMode,
    iters: usize,
) -> Result<Latency, Box<dyn std::error::Error>> {
    let mut q = dev.queue().create()?;
    let gate = dev.create_fence(0)?;
    let mut lat = Latency::new();
    for i in 1..=iters as u64 {
        let done = q.submit_batch(&[Command::wait(&gate.point(i)), Command::nop()])?;
        std::thread::sleep(COLD_IDLE);
        let t = Instant::now();
        gate.signal(i)?;
        done.wait_with(mode, Duration::from_secs(10))?;
        lat.record(t.elapsed().as_nanos() as u64);
    }
    Ok(lat)
}

/// Round trips of a DISPATCH filling `items` u32 on an otherwise idle device: the packet,
/// the command processor running it itself or handing the job to an engine, the
/// workgroups, the completion back through the command processor, the fence. 64 items is
/// one workgroup; 4096 are 16, more than the command processor runs on its own. `mode` is
/// how the host waits.
pub fn kernel_launch(
    dev: &Device,
    items: u32,
    mode: WaitMode,
    warmup: usize,
    iters: usize,
) -> Result<Latency, Box<dyn std::error::Error>> {
    let mut q = dev.queue().ring_entries(1024).create()?;
    let out = dev.alloc::<u32>(items as usize)?;
    let cmd = [userq::kernels::fill_u32(items, 7, &out)?];
    // The first dispatch allocates the queue's argument area: outside the timing.
    q.submit_batch(&cmd)?.wait(Duration::from_secs(10))?;
    let lat = round_trips(&mut q, &cmd, mode, warmup, iters);
    if out.read(items as usize - 1) != 7 {
        return Err("the fill kernel did not run".into());
    }
    Ok(lat)
}
