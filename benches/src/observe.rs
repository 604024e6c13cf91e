//! What observability costs the data path, in paired interleaved rounds on daemon-mode
//! devices: NOP and 1-workgroup DISPATCH round trips with the firmware publishing its
//! telemetry (the default) against a firmware that does not (`$USERQ_FW_TELEMETRY=0`),
//! and NOP round trips on a queue with per-packet profiling against one without.

use crate::device::{DeviceProcs, Mode};
use crate::rounds::{interleave, Paired};
use crate::stats::time_each;
use std::time::Duration;
use userq::{kernels, Command, Device, WaitMode};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// What [`measure`] found.
#[derive(Debug, Clone)]
pub struct ObserveFigures {
    /// NOP round trip: telemetry on (subject) vs off (floor).
    pub telemetry_nop: Paired,
    /// 1-workgroup DISPATCH round trip: telemetry on vs off.
    pub telemetry_dispatch: Paired,
    /// NOP round trip: profiled queue (subject) vs unprofiled (floor), same device.
    pub profiling_nop: Paired,
}

fn nops(q: &mut userq::Queue, warm: usize, n: usize) -> Res<crate::stats::Latency> {
    let t = q.timeline().clone();
    Ok(time_each(warm, n, || {
        let v = q.enqueue(&[Command::nop()]).expect("submit");
        t.wait_with(v, WaitMode::Spin, Duration::from_secs(10))
            .expect("wait");
    }))
}

fn dispatches(dev: &Device, warm: usize, n: usize) -> Res<crate::stats::Latency> {
    let mut q = dev.create_queue()?;
    let b = dev.alloc::<u32>(256)?;
    let cmd = kernels::fill_u32(256, 1, &b)?;
    Ok(time_each(warm, n, || {
        q.submit(cmd.clone())
            .expect("submit")
            .wait_with(WaitMode::Spin, Duration::from_secs(10))
            .expect("wait");
    }))
}

/// Runs the comparisons.
pub fn measure(dir: &std::path::Path, quick: bool) -> Res<ObserveFigures> {
    let on = DeviceProcs::start(Mode::Daemon, &dir.join("on"))?;
    // The firmware child inherits the environment: this one publishes nothing.
    std::env::set_var("USERQ_FW_TELEMETRY", "0");
    let off = DeviceProcs::start(Mode::Daemon, &dir.join("off"));
    std::env::remove_var("USERQ_FW_TELEMETRY");
    let off = off?;
    let (don, doff) = (on.connect()?, off.connect()?);
    let rounds = if quick { 3 } else { 7 };
    let (n, warm) = if quick { (5_000, 500) } else { (20_000, 2_000) };
    let (mut qon, mut qoff) = (don.create_queue()?, doff.create_queue()?);
    let (telemetry_nop, _, _) = interleave(
        "NOP round trip, telemetry on",
        "telemetry off",
        rounds,
        || nops(&mut qoff, warm, n),
        || nops(&mut qon, warm, n),
    )?;
    let dn = n / 10;
    let (telemetry_dispatch, _, _) = interleave(
        "1-workgroup DISPATCH round trip, telemetry on",
        "telemetry off",
        rounds,
        || dispatches(&doff, warm / 10, dn),
        || dispatches(&don, warm / 10, dn),
    )?;
    let mut plain = don.create_queue()?;
    let mut profiled = don.queue().profiling(true).create()?;
    let (profiling_nop, _, _) = interleave(
        "NOP round trip, queue with profiling",
        "queue without",
        rounds,
        || nops(&mut plain, warm, n),
        || nops(&mut profiled, warm, n),
    )?;
    Ok(ObserveFigures {
        telemetry_nop,
        telemetry_dispatch,
        profiling_nop,
    })
}

impl ObserveFigures {
    /// Human-readable lines.
    pub fn print(&self) {
        println!("\nobservability cost (daemon mode, paired rounds)");
        for p in [
            &self.telemetry_nop,
            &self.telemetry_dispatch,
            &self.profiling_nop,
        ] {
            let r: Vec<String> = p.ratios_p50().iter().map(|x| format!("{x:.2}")).collect();
            println!(
                "  {} vs {}: p50 {:.0} ns vs {:.0} ns, median ×{:.2} (p50) ×{:.2} (p99); rounds {}",
                p.name,
                p.floor,
                p.subject_p50(),
                p.floor_p50(),
                p.median_p50(),
                p.median_p99(),
                r.join(" ")
            );
        }
    }

    /// The figures as JSON.
    pub fn json(&self) -> serde_json::Value {
        use serde_json::json;
        let one = |p: &Paired| {
            json!({
                "name": p.name, "floor": p.floor,
                "subject_p50_ns": p.subject_p50(), "floor_p50_ns": p.floor_p50(),
                "median_ratio_p50": p.median_p50(), "median_ratio_p99": p.median_p99(),
                "ratios_p50": p.ratios_p50(), "ratios_p99": p.ratios_p99(),
            })
        };
        json!({
            "telemetry_nop": one(&self.telemetry_nop),
            "telemetry_dispatch": one(&self.telemetry_dispatch),
            "profiling_nop": one(&self.profiling_nop),
        })
    }
}
