//! Results of a run: tables for people, JSON for tools, PASS/MISS against the targets.

use crate::rounds::{median, Paired, RatePaired};
use crate::stats::{ns, Latency, Summary};
use crate::submit::SubmitCost;

mod targets;

/// The cache-line ping-pong's row and pairing name: what any polling protocol costs.
pub const POLL_FLOOR: &str = "floor: cache-line ping-pong";
/// The minimal packet + doorbell + fence exchange: what any user queue moves per round trip.
pub const EXCHANGE_FLOOR: &str = "floor: minimal packet + doorbell + fence exchange";
/// The shared-futex ping-pong run back to back: what any blocking protocol costs.
pub const FUTEX_FLOOR: &str = "floor: shared-futex ping-pong";
/// The kernel-launch row: a one-workgroup DISPATCH round trip on an idle device.
pub const KERNEL_LAUNCH: &str = "userq 1-workgroup DISPATCH, daemon, spin";
/// A 16-workgroup DISPATCH round trip on an idle device: more than the command processor
/// runs on its own, so an engine is woken, but while it wakes the command processor runs
/// the workgroups (often all of them).
pub const KERNEL_LAUNCH_16: &str = "userq 16-workgroup DISPATCH (4096 items), daemon, spin";
/// The shared-futex ping-pong started from the cold round trip's idle gap.
pub const COLD_FLOOR: &str = "floor: shared-futex ping-pong from cold";

/// One latency row.
pub struct LatencyRow {
    /// What was measured.
    pub name: String,
    /// Which floor it is compared with (`poll`, `exchange` or `futex`), if any.
    pub floor: Option<&'static str>,
    /// The distribution.
    pub latency: Latency,
}

/// A throughput row.
pub struct ThroughputRow {
    /// System.
    pub system: &'static str,
    /// Packets per doorbell / per `io_uring_enter`.
    pub batch: usize,
    /// Operations per second.
    pub ops_per_sec: f64,
}

/// A scaling row.
pub struct ScalingRow {
    /// Total queues.
    pub queues: usize,
    /// Client processes.
    pub procs: usize,
    /// Aggregate packets per second.
    pub packets_per_sec: f64,
    /// Round-trip percentiles.
    pub summary: Summary,
}

/// A target check.
pub struct Target {
    /// The target as stated.
    pub what: String,
    /// The measured value, formatted.
    pub measured: String,
    /// Met, missed, or not measured in this run.
    pub verdict: Option<bool>,
}

/// Everything a run measured.
#[derive(Default)]
pub struct Report {
    /// Latency rows, floors first.
    pub latency: Vec<LatencyRow>,
    /// Throughput rows: one measurement per system and batch.
    pub throughput: Vec<ThroughputRow>,
    /// Batched throughput, userq against io_uring and the streaming floor at one batch, in
    /// interleaved rounds.
    pub throughput_paired: Option<RatePaired>,
    /// Scaling rows.
    pub scaling: Vec<ScalingRow>,
    /// Idle CPU share of the firmware process.
    pub idle_cpu: Option<f64>,
    /// Idle CPU share of the firmware process with 4096 idle queues attached.
    pub idle_cpu_with_idle_queues: Option<f64>,
    /// Submit cost, one entry per round.
    pub submit_rounds: Vec<SubmitCost>,
    /// Subjects measured against a floor in paired, interleaved rounds.
    pub paired: Vec<Paired>,
    /// Syscalls strace saw the submitting thread make during 50 000 submits.
    pub submit_syscalls: Option<u64>,
    /// Workgroups run by two equal queues over the fairness window.
    pub fairness: Option<(u64, u64)>,
    /// High-priority dispatch round trips under saturating low-priority work.
    pub priority: Option<Latency>,
    /// Many queues from several processes.
    pub oversubscription: Option<crate::sched::Oversubscription>,
    /// Peers that could not run here, with why.
    pub skipped: Vec<(String, String)>,
    /// Hang detection, resets, kills and firmware restart.
    pub resets: Option<crate::resets::ResetFigures>,
    /// Faults, batches, eviction, innocent round trips during a fault storm.
    pub paging: Option<crate::paging::PagingFigures>,
    /// Telemetry and profiling on vs off.
    pub observe: Option<crate::observe::ObserveFigures>,
}

impl Report {
    /// The p50/p99 of a named latency row.
    pub fn summary(&self, name: &str) -> Option<Summary> {
        self.latency
            .iter()
            .find(|r| r.name == name)
            .map(|r| r.latency.summary())
    }

    fn floor(&self, which: &str) -> Option<Summary> {
        self.summary(match which {
            "poll" => POLL_FLOOR,
            "exchange" => EXCHANGE_FLOOR,
            _ => FUTEX_FLOOR,
        })
    }

    /// Submit cost over the rounds: (median of the rounds' medians, median of their p99s,
    /// worst round's p99, futex wakes in all rounds, firmware sleeps in all rounds).
    pub fn submit(&self) -> Option<(f64, f64, f64, u64, u64)> {
        if self.submit_rounds.is_empty() {
            return None;
        }
        let r = &self.submit_rounds;
        Some((
            median(r.iter().map(|c| c.median_ns).collect()),
            median(r.iter().map(|c| c.p99_ns).collect()),
            r.iter().map(|c| c.p99_ns).fold(0.0, f64::max),
            r.iter().map(|c| c.futex_wakes).sum(),
            r.iter().map(|c| c.firmware_sleeps).sum(),
        ))
    }

    /// Human-readable tables.
    pub fn print(&self) {
        if !self.latency.is_empty() {
            println!(
                "\nround-trip latency (one clock read pair per sample, for every system alike)"
            );
            println!(
                "{:<38} {:>10} {:>10} {:>10} {:>9} {:>9}",
                "system", "p50", "p99", "p99.9", "×floor50", "×floor99"
            );
            for r in &self.latency {
                let s = r.latency.summary();
                let (r50, r99) = match r.floor.and_then(|f| self.floor(f)) {
                    Some(f) => (
                        format!("{:.2}", s.p50 as f64 / f.p50.max(1) as f64),
                        format!("{:.2}", s.p99 as f64 / f.p99.max(1) as f64),
                    ),
                    None => ("-".into(), "-".into()),
                };
                println!(
                    "{:<38} {:>10} {:>10} {:>10} {:>9} {:>9}",
                    r.name,
                    ns(s.p50),
                    ns(s.p99),
                    ns(s.p999),
                    r50,
                    r99
                );
            }
        }
        if !self.throughput.is_empty() {
            println!("\nthroughput (NOPs per second)");
            println!("{:<10} {:>6} {:>14}", "system", "batch", "ops/s");
            for r in &self.throughput {
                println!("{:<10} {:>6} {:>14.0}", r.system, r.batch, r.ops_per_sec);
            }
        }
        if let Some(t) = &self.throughput_paired {
            let (u, f, io) = t.median_rates();
            let per: Vec<String> = t
                .rounds
                .iter()
                .map(|r| {
                    format!(
                        "{:.1}/{:.1}/{:.1}",
                        r.userq / 1e6,
                        r.floor / 1e6,
                        r.io_uring / 1e6
                    )
                })
                .collect();
            println!(
                "\nthroughput in {} interleaved rounds at batch {} (medians): userq {:.1} M/s, streaming floor {:.1} M/s, io_uring {:.1} M/s",
                t.rounds.len(),
                t.batch,
                u / 1e6,
                f / 1e6,
                io / 1e6
            );
            println!(
                "  userq ×io_uring per round {} (median {:.2}); userq ×floor per round {} (median {:.2})",
                fmt_ratios(&t.ratios()),
                t.median_ratio(),
                fmt_ratios(&t.of_floor()),
                t.median_of_floor()
            );
            println!("  M/s userq/floor/io_uring per round: {}", per.join(" "));
        }
        if !self.scaling.is_empty() {
            println!("\nscaling (daemon mode, NOP round trips, adaptive waits)");
            println!(
                "{:>7} {:>6} {:>14} {:>10} {:>10}",
                "queues", "procs", "packets/s", "p50", "p99"
            );
            for r in &self.scaling {
                println!(
                    "{:>7} {:>6} {:>14.0} {:>10} {:>10}",
                    r.queues,
                    r.procs,
                    r.packets_per_sec,
                    ns(r.summary.p50),
                    ns(r.summary.p99)
                );
            }
        }
        if let Some((a, b)) = self.fairness {
            println!("\nfairness: two equal queues with endless spin kernels ran {a} and {b} workgroups of 100 µs in 2 s");
        }
        if let Some(l) = &self.priority {
            let s = l.summary();
            println!(
                "priority: high-priority dispatch round trip under 8 saturating low-priority queues: p50 {}, p99 {}, p99.9 {}",
                ns(s.p50), ns(s.p99), ns(s.p999)
            );
        }
        if let Some(o) = &self.oversubscription {
            println!(
                "oversubscription: {} queues from {} processes, {} dependent dispatches each: {} of {} processes completed with checked results in {:.2?}",
                o.procs * o.queues,
                o.procs,
                o.rounds,
                o.completed,
                o.procs,
                o.elapsed
            );
            for f in &o.failures {
                println!("  {f}");
            }
        }
        if !self.paired.is_empty() {
            println!("\npaired rounds (floor and subject back to back, order flipped every round)");
            println!(
                "{:<28} {:<50} {:>8} {:>8} {:>8}  per-round ×p50 | ×p99",
                "subject", "floor", "p50", "floor50", "×med50"
            );
            for p in &self.paired {
                println!(
                    "{:<28} {:<50} {:>8} {:>8} {:>8.2}  {} | {}",
                    p.name,
                    p.floor,
                    ns(p.subject_p50() as u64),
                    ns(p.floor_p50() as u64),
                    p.median_p50(),
                    fmt_ratios(&p.ratios_p50()),
                    fmt_ratios(&p.ratios_p99())
                );
            }
        }
        if let Some((cost, p99, worst, wakes, sleeps)) = self.submit() {
            let per: Vec<String> = self
                .submit_rounds
                .iter()
                .map(|c| format!("{:.1}/{:.1}", c.median_ns, c.p99_ns))
                .collect();
            println!(
                "\nsubmit cost over {} rounds: median {cost:.1} ns, p99 {p99:.1} ns (worst round {worst:.1} ns) per NOP submit; {wakes} futex wakes while measuring (the firmware slept {sleeps} times meanwhile); per round median/p99: {}",
                self.submit_rounds.len(),
                per.join(" ")
            );
        }
        if let Some(n) = self.submit_syscalls {
            println!("syscalls of the submitting thread during 50000 submits (strace -c): {n}");
        }
        if let Some(idle) = self.idle_cpu {
            println!(
                "idle fw-emu: {:.2}% of a core, measured 10 ms after the last work",
                idle * 100.0
            );
        }
        for (what, why) in &self.skipped {
            println!("skipped {what}: {why}");
        }
        let targets = self.targets();
        if !targets.is_empty() {
            println!("\ntargets");
            for t in targets {
                let v = match t.verdict {
                    Some(true) => "PASS",
                    Some(false) => "MISS",
                    None => "n/a ",
                };
                println!("  {v}  {:<62} {}", t.what, t.measured);
            }
        }
        if let Some(r) = &self.resets {
            r.print();
        }
        if let Some(p) = &self.paging {
            p.print();
        }
        if let Some(o) = &self.observe {
            o.print();
        }
    }

    /// The run as JSON.
    pub fn json(&self) -> String {
        use serde_json::{json, Value};
        let ratio = |a: u64, b: u64| round3(a as f64 / b.max(1) as f64);
        let latency: Vec<Value> = self
            .latency
            .iter()
            .map(|r| {
                let s = r.latency.summary();
                let floor = r.floor.and_then(|f| self.floor(f));
                json!({
                    "name": r.name,
                    "p50_ns": s.p50,
                    "p99_ns": s.p99,
                    "p999_ns": s.p999,
                    "samples": s.count,
                    "ratio_p50": floor.map(|f| ratio(s.p50, f.p50)),
                    "ratio_p99": floor.map(|f| ratio(s.p99, f.p99)),
                })
            })
            .collect();
        let throughput: Vec<Value> = self
            .throughput
            .iter()
            .map(|r| json!({"system": r.system, "batch": r.batch, "ops_per_sec": r.ops_per_sec.round()}))
            .collect();
        let scaling: Vec<Value> = self
            .scaling
            .iter()
            .map(|r| {
                json!({
                    "queues": r.queues,
                    "procs": r.procs,
                    "packets_per_sec": r.packets_per_sec.round(),
                    "p50_ns": r.summary.p50,
                    "p99_ns": r.summary.p99,
                })
            })
            .collect();
        let targets: Vec<Value> = self
            .targets()
            .iter()
            .map(|t| json!({"target": t.what, "measured": t.measured, "pass": t.verdict}))
            .collect();
        let skipped: Vec<Value> = self
            .skipped
            .iter()
            .map(|(what, why)| json!({"what": what, "why": why}))
            .collect();
        json!({
            "resets": self.resets.as_ref().map(|r| r.json()),
            "paging": self.paging.as_ref().map(|p| p.json()),
            "observe": self.observe.as_ref().map(|o| o.json()),
            "latency": latency,
            "throughput": throughput,
            "throughput_paired": self.throughput_paired.as_ref().map(|t| json!({
                "batch": t.batch,
                "median_ratio": round3(t.median_ratio()),
                "median_of_floor": round3(t.median_of_floor()),
                "rounds": t.rounds.iter().map(|r| json!({
                    "userq_ops_per_sec": r.userq.round(),
                    "floor_ops_per_sec": r.floor.round(),
                    "io_uring_ops_per_sec": r.io_uring.round(),
                    "ratio": round3(r.ratio()),
                    "of_floor": round3(r.of_floor()),
                })).collect::<Vec<_>>(),
            })),
            "scaling": scaling,
            "idle_cpu": self.idle_cpu,
            "sched": json!({
                "fairness_workgroups": self.fairness.map(|(a, b)| [a, b]),
                "priority_p50_ns": self.priority.as_ref().map(|l| l.summary().p50),
                "priority_p99_ns": self.priority.as_ref().map(|l| l.summary().p99),
                "oversubscription": self.oversubscription.as_ref().map(|o| json!({
                    "procs": o.procs,
                    "queues_each": o.queues,
                    "rounds": o.rounds,
                    "completed_procs": o.completed,
                    "failures": o.failures,
                    "elapsed_ms": o.elapsed.as_millis() as u64,
                })),
            }),
            "submit": self.submit().map(|(median, p99, worst, wakes, sleeps)| json!({
                "median_ns": (median * 100.0).round() / 100.0,
                "p99_ns": (p99 * 100.0).round() / 100.0,
                "worst_round_p99_ns": (worst * 100.0).round() / 100.0,
                "rounds": self.submit_rounds.iter().map(|c| json!({
                    "median_ns": (c.median_ns * 100.0).round() / 100.0,
                    "p99_ns": (c.p99_ns * 100.0).round() / 100.0,
                })).collect::<Vec<_>>(),
                "futex_wakes": wakes,
                "firmware_sleeps": sleeps,
                "syscalls_traced": self.submit_syscalls,
            })),
            "paired": self.paired.iter().map(|p| json!({
                "name": p.name,
                "floor": p.floor,
                "median_ratio_p50": round3(p.median_p50()),
                "median_ratio_p99": round3(p.median_p99()),
                "rounds": p.rounds.iter().map(|r| json!({
                    "floor_p50_ns": r.floor.p50,
                    "floor_p99_ns": r.floor.p99,
                    "p50_ns": r.subject.p50,
                    "p99_ns": r.subject.p99,
                    "ratio_p50": round3(r.ratio_p50()),
                    "ratio_p99": round3(r.ratio_p99()),
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "targets": targets,
            "skipped": skipped,
        })
        .to_string()
    }
}

/// Per-round ratios, for a table: `1.31 1.28 …`.
fn fmt_ratios(v: &[f64]) -> String {
    v.iter()
        .map(|r| format!("{r:.2}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Rounds a ratio to three decimals for printing.
fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_escapes_every_string() {
        let mut r = Report::default();
        r.skipped.push((
            "a \"quoted\"\tname\\".into(),
            "line one\nline two \u{1} end".into(),
        ));
        let v: serde_json::Value = serde_json::from_str(&r.json()).expect("valid JSON");
        assert_eq!(v["skipped"][0]["why"], "line one\nline two \u{1} end");
        assert_eq!(v["skipped"][0]["what"], "a \"quoted\"\tname\\");
    }

    fn verdict(r: &Report, starts: &str) -> Option<bool> {
        r.targets()
            .into_iter()
            .find(|t| t.what.starts_with(starts))
            .unwrap_or_else(|| panic!("no target {starts}"))
            .verdict
    }

    #[test]
    fn a_failed_or_killed_oversubscription_client_is_a_miss() {
        let run = |completed, failures: Vec<String>| Report {
            oversubscription: Some(crate::sched::Oversubscription {
                procs: 4,
                queues: 16,
                rounds: 20,
                completed,
                failures,
                elapsed: std::time::Duration::from_millis(50),
            }),
            ..Report::default()
        };
        assert_eq!(verdict(&run(4, vec![]), "oversubscription"), Some(true));
        let killed = run(3, vec!["client 2: not done after 150s; killed".into()]);
        assert_eq!(verdict(&killed, "oversubscription"), Some(false));
        let v: serde_json::Value = serde_json::from_str(&killed.json()).expect("valid JSON");
        assert_eq!(v["sched"]["oversubscription"]["completed_procs"], 3);
    }

    #[test]
    fn throughput_is_judged_on_the_median_round_not_the_best() {
        use crate::rounds::{RatePaired, RateRound};
        let round = |userq| RateRound {
            userq,
            floor: 200.0,
            io_uring: 10.0,
        };
        // One flattering round among slow ones: the median misses.
        let r = Report {
            throughput_paired: Some(RatePaired {
                batch: 256,
                rounds: vec![round(40.0), round(120.0), round(45.0)],
            }),
            ..Report::default()
        };
        assert_eq!(verdict(&r, "single-queue batched throughput"), Some(false));
        let v: serde_json::Value = serde_json::from_str(&r.json()).expect("valid JSON");
        assert_eq!(v["throughput_paired"]["median_ratio"], 4.5);
        assert_eq!(v["throughput_paired"]["rounds"][1]["ratio"], 12.0);
    }
}
