//! One process, the device embedded in it (or a running kmd-shim if one serves the default
//! socket): create a queue, a buffer and a fence, submit work, wait, and show what happened.
//!
//! cargo run --release --example quickstart

use std::time::{Duration, Instant};
use userq::{Command, Device, WaitMode};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dev = Device::open_default()?;
    println!(
        "device: {} (context {}, {} mode)",
        dev.socket_path().display(),
        dev.context_id(),
        if dev.is_embedded() {
            "embedded"
        } else {
            "daemon"
        }
    );

    let mut queue = dev.queue().ring_entries(64).create()?;
    let out = dev.alloc::<u64>(8)?;
    let gate = dev.create_fence(0)?;
    let addr = |i| out.address_of(i).expect("index in bounds");

    // 1. Plain work: two stores and a device timestamp, one doorbell.
    let t0 = Instant::now();
    let done = queue.submit_batch(&[
        Command::write_value(addr(0), 0xC0FFEE),
        Command::write_value(addr(1), 42),
        Command::timestamp(addr(2)),
    ])?;
    done.wait(Duration::from_secs(5))?;
    println!(
        "batch of 3 completed at timeline value {} in {:?}: out[0]={:#x} out[1]={} device clock={} ns",
        done.value(),
        t0.elapsed(),
        out.read(0),
        out.read(1),
        out.read(2)
    );
    assert_eq!((out.read(0), out.read(1)), (0xC0FFEE, 42));

    // 2. A dependency: the queue parks on a fence until the host signals it.
    let parked = queue.submit_batch(&[
        Command::wait(&gate.point(1)),
        Command::write_value(addr(3), 7),
        Command::signal(&gate, 2),
    ])?;
    std::thread::sleep(Duration::from_millis(20));
    println!(
        "queue parked on the gate: timeline {} (waiting for {}), out[3]={}",
        queue.timeline().value(),
        parked.value(),
        out.read(3)
    );
    assert_eq!(
        out.read(3),
        0,
        "nothing may run past an unsignalled WAIT_FENCE"
    );
    gate.signal(1)?;
    gate.wait(2, Duration::from_secs(5))?;
    parked.wait(Duration::from_secs(5))?;
    println!(
        "host signalled the gate: queue ran on, out[3]={}, gate={}",
        out.read(3),
        gate.value()
    );

    // 3. Round trips: one NOP submitted and waited for, spinning.
    let n = 10_000;
    let t = Instant::now();
    for _ in 0..n {
        queue
            .submit(Command::nop())?
            .wait_with(WaitMode::Spin, Duration::from_secs(5))?;
    }
    println!(
        "{n} NOP round trips: {:.2} µs each (spin wait)",
        t.elapsed().as_secs_f64() * 1e6 / n as f64
    );
    println!("final timeline value: {}", queue.timeline().value());
    Ok(())
}
