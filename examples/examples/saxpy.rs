//! y = a·x + y on the device, checked against the CPU.
//!
//! cargo run --release --example saxpy

use std::time::{Duration, Instant};
use userq::{kernels, Device};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dev = Device::open_default()?;
    let n: u32 = 1 << 20;
    let a = 2.5f32;
    let x: Vec<f32> = (0..n).map(|i| (i % 1000) as f32 * 0.001).collect();
    let y: Vec<f32> = (0..n).map(|i| 1.0 - (i % 777) as f32 * 0.002).collect();

    let mut bx = dev.alloc::<f32>(n as usize)?;
    let mut by = dev.alloc::<f32>(n as usize)?;
    bx.copy_from_slice(&x);
    by.copy_from_slice(&y);

    let mut queue = dev.create_queue()?;
    let t = Instant::now();
    queue
        .submit(kernels::axpy(n, a, &bx, &by)?)?
        .wait(Duration::from_secs(30))?;
    let took = t.elapsed();

    let got = by.to_vec();
    let max_error = got
        .iter()
        .zip(x.iter().zip(&y))
        .map(|(g, (x, y))| (g - (a * x + y)).abs())
        .fold(0f32, f32::max);
    println!(
        "saxpy: {n} elements in {:?} ({} workgroups of {}): max |error| vs CPU = {max_error}",
        took,
        kernels::workgroups(n),
        kernels::WORKGROUP
    );
    if max_error != 0.0 {
        return Err(format!("device result differs from the CPU by up to {max_error}").into());
    }
    Ok(())
}
