//! `userq status`: one look at the device.

use crate::format::{error, mib, ms, out, priority, snapshot_json};
use std::time::Duration;
use userq_uapi::observe::{Observer, Snapshot};
use userq_uapi::paging::DEVICE_PAGE;

/// How long engine use is sampled over.
const WINDOW: Duration = Duration::from_millis(200);

/// Each engine's busy share between two snapshots.
pub fn utilisation(a: &Snapshot, b: &Snapshot, window: Duration) -> Vec<f64> {
    a.engines
        .iter()
        .zip(&b.engines)
        .map(|(x, y)| share(x.busy_ns, y.busy_ns, window))
        .collect()
}

/// The command processor's share of the window spent running small dispatches itself.
pub fn inline_share(a: &Snapshot, b: &Snapshot, window: Duration) -> f64 {
    share(a.inline.busy_ns, b.inline.busy_ns, window)
}

/// Busy time between two readings of a counter over `window`, at most 1. A value that
/// went backwards (a restart) counts as idle.
pub fn share(was: u64, is: u64, window: Duration) -> f64 {
    (is.saturating_sub(was) as f64 / window.as_nanos().max(1) as f64).min(1.0)
}

pub fn run(obs: &Observer, json: bool) -> crate::Res<()> {
    let a = obs.snapshot();
    let t = std::time::Instant::now();
    std::thread::sleep(WINDOW);
    let s = obs.snapshot();
    let busy = utilisation(&a, &s, t.elapsed());
    let inline = inline_share(&a, &s, t.elapsed());
    if json {
        let v = snapshot_json(&s, &busy, inline);
        return out(&serde_json::to_string_pretty(&v).map_err(|e| e.to_string())?);
    }
    let p = &s.paging;
    out(&format!(
        "device: generation {}, {}, firmware pid {}, {} engine(s)",
        s.generation,
        if s.lost { "LOST" } else { "running" },
        s.firmware_pid,
        s.engines.len()
    ))?;
    let use_: Vec<String> = busy.iter().map(|b| format!("{:.0}%", b * 100.0)).collect();
    out(&format!(
        "engines: busy {} (over {:?}); the command processor ran small dispatches itself {:.0}% of that time, and {} workgroups of them since start ({})",
        use_.join(" "),
        WINDOW,
        inline * 100.0,
        s.inline.workgroups,
        ms(s.inline.busy_ns)
    ))?;
    out(&format!(
        "memory: budget {}, resident {} (peak {}); {} faults in {} batches, {} pages in, {} evicted, {} refaults, {} violations, {} eviction deadlocks; service {}, copying {}",
        mib(s.vram_bytes),
        mib(p.resident_pages * DEVICE_PAGE),
        mib(p.peak_resident_pages * DEVICE_PAGE),
        p.faults,
        p.batches,
        p.pages_in,
        p.pages_out,
        p.refaults,
        p.violations,
        p.deadlocks,
        ms(p.service_ns),
        ms(p.migrate_ns)
    ))?;
    out(&format!("processes: {}", s.contexts.len()))?;
    for c in &s.contexts {
        out(&format!(
            "  ctx {:<5} pid {:<7} {:<16} engine {:>10}  resets: guilty {} innocent {}{}",
            c.ctx,
            c.pid,
            c.comm,
            ms(c.engine_ns),
            c.guilty,
            c.innocent,
            if c.banned { "  BANNED" } else { "" }
        ))?;
        for q in &c.queues {
            out(&format!(
                "    queue {:<3} {:<7} {:<10} submitted {:<8} completed {:<8} pending {:<6} engine {:>10} faults {}{}",
                q.slot,
                priority(q.priority),
                q.state.map_or("starting", |s| s.name()),
                q.submitted,
                q.completed,
                q.submitted.saturating_sub(q.completed),
                ms(q.engine_ns),
                q.faults,
                if q.error != 0 {
                    format!("  ({})", error(q.error))
                } else {
                    String::new()
                }
            ))?;
        }
    }
    Ok(())
}
