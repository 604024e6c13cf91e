//! A persistent kernel: one workgroup that lives on the device and serves requests from the
//! host through a mailbox in device memory, until told to stop. Meanwhile another queue
//! keeps dispatching small kernels, and their latency stays low: the persistent kernel
//! yields its engine at checkpoints.
//!
//! cargo run --release --example persistent

use std::time::{Duration, Instant};
use userq::kernels::{self, Mailbox};
use userq::Device;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dev = Device::open_default()?;
    // A persistent kernel runs as long as it is needed: a long-running queue, watched for
    // progress (a second without a checkpoint is a hang) instead of a job timeout.
    let mut server_queue = dev
        .queue()
        .priority(userq::Priority::Low)
        .long_running(Duration::from_secs(1))
        .create()?;
    let mut other = dev.create_queue()?;
    let mut mbox = Mailbox::new(&dev)?;
    let server = server_queue.submit(mbox.launch())?;

    let requests = 2000u64;
    let mut served = Vec::with_capacity(requests as usize);
    let data = dev.alloc::<f32>(4096)?;
    let mut other_latency = Vec::new();
    for i in 1..=requests {
        let t = Instant::now();
        let answer = mbox
            .ask(i, Duration::from_secs(10))
            .ok_or_else(|| format!("request {i} was not answered"))?;
        served.push(t.elapsed());
        if answer != 3 * i + 1 {
            return Err(format!("request {i}: answer {answer}, want {}", 3 * i + 1).into());
        }
        if i % 20 == 0 {
            let t = Instant::now();
            other
                .submit(kernels::scale(4096, 1.0, &data)?)?
                .wait(Duration::from_secs(10))?;
            other_latency.push(t.elapsed());
        }
    }
    if server.poll()? {
        return Err("the persistent kernel ended on its own".into());
    }
    mbox.stop();
    server.wait(Duration::from_secs(10))?;

    let pct = |v: &mut Vec<Duration>, q: f64| {
        v.sort();
        v[((v.len() - 1) as f64 * q) as usize]
    };
    println!(
        "persistent: {requests} requests answered by one long-running workgroup; round trip p50 {:?}, p99 {:?}",
        pct(&mut served, 0.5),
        pct(&mut served, 0.99)
    );
    println!(
        "meanwhile {} dispatches on another queue: p50 {:?}, p99 {:?}; the kernel stopped when asked",
        other_latency.len(),
        pct(&mut other_latency, 0.5),
        pct(&mut other_latency, 0.99)
    );
    Ok(())
}
