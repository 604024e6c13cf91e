//! On-demand paging, measured against a daemon-mode device with a small budget: a single
//! fault's round trip against the shared-futex floor, batched fault service in pages/s and
//! its copy bandwidth against a plain memcpy of the same bytes, eviction + refault cost
//! per page, and an innocent context's round trips while another process storms faults.
//! Every comparison is paired and interleaved in rounds; every round is reported.

use crate::device::{DeviceProcs, Mode};
use crate::floors;
use crate::stats::{Latency, Summary};
use std::io::Write;
use std::time::{Duration, Instant};
use userq::uapi::paging::{PagingStats, DEVICE_PAGE};
use userq::{kernels, Command, Device, WaitMode};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// The budget of the bench's device: 512 pages (32 MiB).
pub const VRAM: u64 = 512 * DEVICE_PAGE;

/// One round of the single-fault measurement.
#[derive(Debug, Clone, Copy)]
pub struct FaultRound {
    /// Shared-futex ping-pong between two processes.
    pub floor: Summary,
    /// A one-workgroup dispatch on a resident page.
    pub resident: Summary,
    /// The same dispatch on a page just migrated to host: one fault.
    pub faulting: Summary,
    /// `resident` with the default (adaptive) wait instead of a spin: the client yields
    /// and then sleeps while kmd-shim and the firmware share the vCPUs with it.
    pub resident_adaptive: Summary,
    /// `faulting` with the default (adaptive) wait.
    pub faulting_adaptive: Summary,
}

impl FaultRound {
    /// (faulting − resident) / floor, at p50 and p99.
    pub fn ratios(&self) -> (f64, f64) {
        let d = |a: u64, b: u64| a.saturating_sub(b) as f64;
        (
            d(self.faulting.p50, self.resident.p50) / self.floor.p50.max(1) as f64,
            d(self.faulting.p99, self.resident.p99) / self.floor.p99.max(1) as f64,
        )
    }
}

/// One round of batched service.
#[derive(Debug, Clone, Copy)]
pub struct BatchRound {
    /// Pages serviced.
    pub pages: u64,
    /// Batches they came in.
    pub batches: u64,
    /// kmd-shim's service time for them.
    pub service: Duration,
    /// Of that, copying.
    pub copy: Duration,
    /// A plain memcpy of the same bytes, measured right before or after.
    pub memcpy: Duration,
}

impl BatchRound {
    /// Pages per second of service.
    pub fn pages_per_sec(&self) -> f64 {
        self.pages as f64 / self.service.as_secs_f64().max(1e-9)
    }

    /// Copy bandwidth / memcpy bandwidth.
    pub fn copy_ratio(&self) -> f64 {
        self.memcpy.as_secs_f64() / self.copy.as_secs_f64().max(1e-9)
    }
}

/// What [`measure`] found.
#[derive(Debug, Clone, Default)]
pub struct PagingFigures {
    /// Single-fault rounds.
    pub fault: Vec<FaultRound>,
    /// The first batch round, on a fresh pool and host mapping.
    pub batch_cold: Option<BatchRound>,
    /// Batched-service rounds (256-page batches), warm.
    pub batch: Vec<BatchRound>,
    /// Per round: (pages evicted and refaulted, client time per page, kmd service time per
    /// page).
    pub evict: Vec<(u64, Duration, Duration)>,
    /// Innocent NOP and 1-workgroup dispatch round trips: (quiet nop, storm nop, quiet
    /// dispatch, storm dispatch), per round.
    pub innocent: Vec<(Summary, Summary, Summary, Summary)>,
    /// Faults the storm made while the innocent context was measured, per round.
    pub storm_faults: Vec<u64>,
}

fn stats(dev: &Device) -> Res<PagingStats> {
    Ok(dev.paging_stats()?)
}

/// Single faults: `n` samples per kind per round.
fn fault_round(dev: &Device, n: usize) -> Res<FaultRound> {
    let floor = floors::futex_floor(n / 10, n)?.summary();
    let words = (DEVICE_PAGE / 4) as usize;
    let b = dev.alloc_on_demand::<u32>(words)?;
    let mut q = dev.create_queue()?;
    let fill = kernels::fill_u32(256, 1, &b)?;
    let run = |q: &mut userq::Queue, mode: WaitMode| -> Res<u64> {
        let t = Instant::now();
        q.submit(fill.clone())?
            .wait_with(mode, Duration::from_secs(30))?;
        Ok(t.elapsed().as_nanos() as u64)
    };
    run(&mut q, WaitMode::Spin)?; // resident now
                                  // [resident, faulting] × [spin, adaptive]: resident and faulting interleaved; the
                                  // spin pairs first, then the adaptive ones (a client that slept in an adaptive wait is
                                  // often woken onto the firmware's vCPU, and a spin right after it holds that vCPU
                                  // until the scheduler's tick: milliseconds in the spin rows' p99 that are the
                                  // interleaving's, not a fault's).
    let mut lat: [Latency; 4] = Default::default();
    for (m, mode) in [WaitMode::Spin, WaitMode::Adaptive].into_iter().enumerate() {
        for i in 0..2 * n {
            if i % 2 == 1 {
                b.migrate_to_host(0..words)?;
            }
            lat[2 * m + i % 2].record(run(&mut q, mode)?);
        }
    }
    let [resident, faulting, resident_adaptive, faulting_adaptive] = lat.map(|l| l.summary());
    Ok(FaultRound {
        floor,
        resident,
        faulting,
        resident_adaptive,
        faulting_adaptive,
    })
}

/// Pages of a batch round.
const BATCH_PAGES: u64 = 256;

/// One 256-page batch: a fill over 16 MiB of `b` that was migrated to host first. The
/// first round on a fresh device is *cold* (the OS allocates the pool's pages and maps
/// the host copy into kmd-shim as they are first touched); later rounds reuse both.
fn batch_round(dev: &Device, b: &userq::Buffer<u32>) -> Res<BatchRound> {
    let pages = BATCH_PAGES;
    let words = (pages * DEVICE_PAGE / 4) as usize;
    b.migrate_to_host(0..words)?;
    let mut q = dev.create_queue()?;
    let before = stats(dev)?;
    q.submit(kernels::fill_u32(words as u32, 3, b)?)?
        .wait(Duration::from_secs(60))?;
    let after = stats(dev)?;
    // A plain memcpy of the same bytes, in this process, right after.
    let src = vec![7u8; (pages * DEVICE_PAGE) as usize];
    let mut dst = vec![0u8; src.len()];
    dst.copy_from_slice(&src); // touch both once
    let t = Instant::now();
    dst.copy_from_slice(&src);
    let memcpy = t.elapsed();
    std::hint::black_box(&dst);
    Ok(BatchRound {
        pages: after.pages_in - before.pages_in,
        batches: after.batches - before.batches,
        service: Duration::from_nanos(after.service_ns - before.service_ns),
        copy: Duration::from_nanos(after.migrate_ns - before.migrate_ns),
        memcpy,
    })
}

/// Eviction and refault: two halves of a buffer of twice the budget, filled in turn.
fn evict_round(dev: &Device) -> Res<(u64, Duration, Duration)> {
    let budget_pages = VRAM / DEVICE_PAGE;
    let half = (budget_pages * DEVICE_PAGE / 4) as usize;
    let b = dev.alloc_on_demand::<u32>(2 * half)?;
    let mut q = dev.create_queue()?;
    let fill = |q: &mut userq::Queue, at: usize, v: u32| -> Res<Duration> {
        let cmd = Command::dispatch(
            userq::uapi::kernels::FILL_U32,
            [half as u32, 1, 1],
            [256, 1, 1],
            &[
                userq::KernelArg::U64(half as u64),
                userq::KernelArg::U64(v as u64),
                userq::KernelArg::U64(b.address_of(at).expect("in bounds")),
            ],
        );
        let t = Instant::now();
        q.submit(cmd)?.wait(Duration::from_secs(60))?;
        Ok(t.elapsed())
    };
    // Warm-up: the first evictions allocate the host copies' pages, and kmd-shim's
    // mapping of them fills in as they are first touched.
    for i in 0..4 {
        fill(&mut q, if i % 2 == 0 { 0 } else { half }, i)?;
    }
    let before = stats(dev)?;
    let mut client = Duration::ZERO;
    for i in 0..4 {
        client += fill(&mut q, if i % 2 == 0 { 0 } else { half }, i)?;
    }
    let after = stats(dev)?;
    let pages = after.pages_out - before.pages_out;
    let per = |d: Duration| d / pages.max(1) as u32;
    Ok((
        pages,
        per(client),
        per(Duration::from_nanos(after.service_ns - before.service_ns)),
    ))
}

/// NOP and dispatch round trips for `window`.
fn innocent(dev: &Device, window: Duration) -> Res<(Latency, Latency)> {
    let mut q = dev.create_queue()?;
    let buf = dev.alloc::<u32>(256)?;
    let d = kernels::fill_u32(256, 1, &buf)?;
    let (mut nop, mut disp) = (Latency::new(), Latency::new());
    let start = Instant::now();
    let mut i = 0u64;
    while start.elapsed() < window {
        let t = Instant::now();
        q.submit(Command::nop())?
            .wait_with(WaitMode::Spin, Duration::from_secs(30))?;
        nop.record(t.elapsed().as_nanos() as u64);
        if i % 10 == 0 {
            let t = Instant::now();
            q.submit(d.clone())?
                .wait_with(WaitMode::Spin, Duration::from_secs(30))?;
            disp.record(t.elapsed().as_nanos() as u64);
        }
        i += 1;
    }
    Ok((nop, disp))
}

/// Role `__fault-storm SOCKET`: streams a buffer of four times the budget until killed.
pub fn fault_storm_role(socket: &str) -> Res<()> {
    let dev = Device::connect(socket)?;
    let n = (4 * VRAM / 4) as usize;
    let x = dev.alloc_on_demand::<u32>(n)?;
    let mut q = dev.queue().long_running(Duration::from_secs(60)).create()?;
    let f = q.submit(kernels::stream_add_u32(n as u32, u32::MAX, n as u32, &x)?)?;
    println!("storming");
    std::io::stdout().flush()?;
    let _ = f.wait(Duration::from_secs(3600));
    Ok(())
}

/// Runs every measurement on a fresh daemon in `dir`.
pub fn measure(dir: &std::path::Path, quick: bool) -> Res<PagingFigures> {
    let procs = DeviceProcs::start_with_vram(Mode::Daemon, dir, VRAM)?;
    let dev = procs.connect()?;
    let rounds = if quick { 3 } else { 5 };
    let n = if quick { 200 } else { 1000 };
    let mut out = PagingFigures::default();
    let batch_buf = dev.alloc_on_demand::<u32>((BATCH_PAGES * DEVICE_PAGE / 4) as usize)?;
    // Batches first and back to back: the other measurements free buffers, which gives
    // their pool pages back to the OS and would make every batch round cold.
    out.batch_cold = Some(batch_round(&dev, &batch_buf)?);
    for _ in 0..rounds {
        out.batch.push(batch_round(&dev, &batch_buf)?);
    }
    drop(batch_buf);
    for _ in 0..rounds {
        out.fault.push(fault_round(&dev, n)?);
        out.evict.push(evict_round(&dev)?);
    }
    let window = Duration::from_millis(if quick { 300 } else { 1000 });
    for _ in 0..rounds {
        let (qn, qd) = innocent(&dev, window)?;
        let storm = crate::proc::Role::spawn(
            "__fault-storm",
            &[procs.socket.display().to_string()],
            None,
            std::process::Stdio::null(),
        )?;
        // Wait until the storm faults.
        let f0 = stats(&dev)?.faults;
        let t = Instant::now();
        while stats(&dev)?.faults < f0 + 50 && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let f1 = stats(&dev)?.faults;
        let (sn, sd) = innocent(&dev, window)?;
        out.storm_faults.push(stats(&dev)?.faults - f1);
        drop(storm);
        out.innocent
            .push((qn.summary(), sn.summary(), qd.summary(), sd.summary()));
    }
    Ok(out)
}

fn us(ns: u64) -> String {
    format!("{:.1} µs", ns as f64 / 1e3)
}

impl PagingFigures {
    /// Median of per-round values.
    fn med(mut v: Vec<f64>) -> f64 {
        crate::rounds::median(std::mem::take(&mut v))
    }

    /// Median (fault − resident) / futex floor at p50 and p99.
    pub fn fault_ratio(&self) -> (f64, f64) {
        (
            Self::med(self.fault.iter().map(|r| r.ratios().0).collect()),
            Self::med(self.fault.iter().map(|r| r.ratios().1).collect()),
        )
    }

    /// Median copy bandwidth / memcpy.
    pub fn copy_ratio(&self) -> f64 {
        Self::med(self.batch.iter().map(BatchRound::copy_ratio).collect())
    }

    /// Human-readable lines.
    pub fn print(&self) {
        println!(
            "\npaging (daemon mode, budget {} MiB, {} KiB pages)",
            VRAM >> 20,
            DEVICE_PAGE >> 10
        );
        // "dispatch faulting p50 / p99, resident p50 / p99 (p50/p99)"
        let pair = |f: &Summary, r: &Summary| {
            format!(
                "dispatch faulting {} / {}, resident {} / {} (p50/p99)",
                us(f.p50),
                us(f.p99),
                us(r.p50),
                us(r.p99)
            )
        };
        for (i, r) in self.fault.iter().enumerate() {
            let (a, b) = r.ratios();
            println!(
                "  round {i}: single fault: {}; fault cost {a:.2}× / {b:.2}× the futex floor ({} / {})",
                pair(&r.faulting, &r.resident),
                us(r.floor.p50),
                us(r.floor.p99)
            );
            println!(
                "           adaptive (default) wait: {}",
                pair(&r.faulting_adaptive, &r.resident_adaptive)
            );
        }
        let (a, b) = self.fault_ratio();
        println!("  single fault, median over rounds: {a:.2}× (p50) / {b:.2}× (p99) the futex floor (goal ≤ 2×)");
        let cold = self.batch_cold.iter().map(|r| ("cold", r));
        for (i, r) in cold
            .chain(self.batch.iter().map(|r| ("warm", r)))
            .enumerate()
        {
            let (kind, r) = r;
            println!(
                "  round {i} ({kind}): {} pages in {} batch(es): service {:.2} ms = {:.0} pages/s; copy {:.2} GB/s vs memcpy {:.2} GB/s = {:.0}%",
                r.pages,
                r.batches,
                r.service.as_secs_f64() * 1e3,
                r.pages_per_sec(),
                (r.pages * DEVICE_PAGE) as f64 / r.copy.as_secs_f64().max(1e-9) / 1e9,
                (r.pages * DEVICE_PAGE) as f64 / r.memcpy.as_secs_f64().max(1e-9) / 1e9,
                r.copy_ratio() * 100.0
            );
        }
        println!(
            "  migration copy bandwidth, median: {:.0}% of memcpy (goal ≥ 50%)",
            self.copy_ratio() * 100.0
        );
        for (i, (pages, client, kmd)) in self.evict.iter().enumerate() {
            println!(
                "  round {i}: eviction + refault: {pages} pages, {:.1} µs per page end to end, {:.1} µs of kmd-shim service",
                client.as_secs_f64() * 1e6,
                kmd.as_secs_f64() * 1e6
            );
        }
        for (i, (qn, sn, qd, sd)) in self.innocent.iter().enumerate() {
            println!(
                "  round {i}: innocent context, p50/p99: NOP quiet {} / {}, during {} faults {} / {}; dispatch quiet {} / {}, storm {} / {}",
                us(qn.p50),
                us(qn.p99),
                self.storm_faults.get(i).copied().unwrap_or(0),
                us(sn.p50),
                us(sn.p99),
                us(qd.p50),
                us(qd.p99),
                us(sd.p50),
                us(sd.p99)
            );
        }
    }

    /// The figures as JSON.
    pub fn json(&self) -> serde_json::Value {
        use serde_json::json;
        let s = |x: &Summary| json!({"p50_ns": x.p50, "p99_ns": x.p99, "p999_ns": x.p999});
        let (a, b) = self.fault_ratio();
        json!({
            "budget_bytes": VRAM,
            "page_bytes": DEVICE_PAGE,
            "single_fault": self.fault.iter().map(|r| json!({
                "floor": s(&r.floor), "resident": s(&r.resident), "faulting": s(&r.faulting),
                "resident_adaptive": s(&r.resident_adaptive),
                "faulting_adaptive": s(&r.faulting_adaptive),
                "ratio_p50": r.ratios().0, "ratio_p99": r.ratios().1,
            })).collect::<Vec<_>>(),
            "single_fault_median_ratio": {"p50": a, "p99": b},
            "batch_cold": self.batch_cold.map(|r| json!({
                "pages": r.pages, "service_ms": r.service.as_secs_f64() * 1e3,
                "copy_ms": r.copy.as_secs_f64() * 1e3, "memcpy_ms": r.memcpy.as_secs_f64() * 1e3,
                "copy_vs_memcpy": r.copy_ratio(),
            })),
            "batches": self.batch.iter().map(|r| json!({
                "pages": r.pages, "batches": r.batches,
                "service_ms": r.service.as_secs_f64() * 1e3,
                "pages_per_sec": r.pages_per_sec(),
                "copy_ms": r.copy.as_secs_f64() * 1e3,
                "memcpy_ms": r.memcpy.as_secs_f64() * 1e3,
                "copy_vs_memcpy": r.copy_ratio(),
            })).collect::<Vec<_>>(),
            "evict_refault": self.evict.iter().map(|(p, c, k)| json!({
                "pages": p, "client_us_per_page": c.as_secs_f64() * 1e6, "kmd_us_per_page": k.as_secs_f64() * 1e6,
            })).collect::<Vec<_>>(),
            "innocent": self.innocent.iter().zip(&self.storm_faults).map(|((qn, sn, qd, sd), f)| json!({
                "nop_quiet": s(qn), "nop_storm": s(sn), "dispatch_quiet": s(qd), "dispatch_storm": s(sd), "storm_faults": f,
            })).collect::<Vec<_>>(),
        })
    }
}
