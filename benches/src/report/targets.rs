//! DOC: the report's targets: each measured figure against the bound the latency issue
//! and the benchmarks' own checks set, PASS or MISS.

use super::*;

impl Report {
    /// The targets of the benchmark issue, judged on this run.
    pub fn targets(&self) -> Vec<Target> {
        let mut t = Vec::new();
        let ratio = |a: u64, b: u64| a as f64 / b.max(1) as f64;
        // The target is against the ping-pong run back to back; the pairing with the one
        // started from cold is reported beside it.
        for p in self
            .paired
            .iter()
            .filter(|p| p.name.contains("cold") && p.floor == FUTEX_FLOOR)
        {
            let r50 = p.median_p50();
            t.push(Target {
                what: format!(
                    "cold round trip (firmware asleep) p50 ≤ 1.3× the shared-futex ping-pong (median of {} paired rounds)",
                    p.rounds.len()
                ),
                measured: format!("{r50:.2}× (rounds {})", fmt_ratios(&p.ratios_p50())),
                verdict: Some(r50 <= 1.3),
            });
        }
        for p in self
            .paired
            .iter()
            .filter(|p| p.name.contains("idle queues"))
        {
            let r50 = p.median_p50();
            t.push(Target {
                what: format!(
                    "idle queues cost nothing: hot queue p50 with 4096 idle queues from 64 processes ≤ 1.1× alone (median of {} paired rounds)",
                    p.rounds.len()
                ),
                measured: format!("{r50:.2}× (rounds {})", fmt_ratios(&p.ratios_p50())),
                verdict: Some(r50 <= 1.1),
            });
        }
        if let Some(idle) = self.idle_cpu_with_idle_queues {
            t.push(Target {
                what: "idle fw-emu < 2% of a core with 4096 idle queues attached".into(),
                measured: format!("{:.2}%", idle * 100.0),
                verdict: Some(idle < 0.02),
            });
        }
        for p in self.paired.iter().filter(|p| {
            p.name.contains("spin") && !p.name.contains("idle queues") && p.floor == EXCHANGE_FLOOR
        }) {
            let (r50, r99) = (p.median_p50(), p.median_p99());
            t.push(Target {
                what: format!(
                    "{}: p50 ≤ 1.25× the minimal exchange (median of {} paired rounds)",
                    p.name,
                    p.rounds.len()
                ),
                measured: format!("{r50:.2}× (rounds {})", fmt_ratios(&p.ratios_p50())),
                verdict: Some(r50 <= 1.25),
            });
            t.push(Target {
                what: format!("{}: p99 ≤ 2× the minimal exchange's p99", p.name),
                measured: format!("{r99:.2}× (rounds {})", fmt_ratios(&p.ratios_p99())),
                verdict: Some(r99 <= 2.0),
            });
        }
        let futex = self.floor("futex");
        // Against the cache-line ping-pong measured beside each of the daemon's rounds.
        if let Some(p) = self
            .paired
            .iter()
            .find(|p| p.name == "userq NOP, daemon, spin" && p.floor == POLL_FLOOR)
        {
            let (r50, r99) = (p.median_p50(), p.median_p99());
            t.push(Target {
                what: format!(
                    "spin round trip p50 ≤ 1.5× polling floor (median of {} paired rounds)",
                    p.rounds.len()
                ),
                measured: format!("{r50:.2}× (rounds {})", fmt_ratios(&p.ratios_p50())),
                verdict: Some(r50 <= 1.5),
            });
            t.push(Target {
                what: "spin round trip p99 ≤ 2.5× polling floor".into(),
                measured: format!("{r99:.2}× (rounds {})", fmt_ratios(&p.ratios_p99())),
                verdict: Some(r99 <= 2.5),
            });
        }
        if let Some(k) = self.summary(KERNEL_LAUNCH) {
            t.push(Target {
                what: "small kernel launch: 1-workgroup DISPATCH round trip on an idle device p50 ≤ 2 µs".into(),
                measured: format!("p50 {}, p99 {}", ns(k.p50), ns(k.p99)),
                verdict: Some(k.p50 <= 2_000),
            });
        }
        if let (Some(f), Some(u)) = (futex, self.summary("userq NOP, daemon, block")) {
            t.push(Target {
                what: "blocking round trip p50 ≤ 1.3× blocking floor".into(),
                // A warm blocking round trip mostly finds its value before it sleeps: a
                // few hundred ns against the floor's tens of µs, which two decimals
                // would show as 0.00×.
                measured: format!(
                    "{:.3}× ({} against {})",
                    ratio(u.p50, f.p50),
                    ns(u.p50),
                    ns(f.p50)
                ),
                verdict: Some(ratio(u.p50, f.p50) <= 1.3),
            });
        }
        match (
            self.summary("userq NOP, daemon, spin"),
            self.summary("iceoryx2 pub/sub ping-pong"),
        ) {
            (Some(u), Some(i)) => t.push(Target {
                what: "userq spin p50 below iceoryx2's".into(),
                measured: format!("{} vs {}", ns(u.p50), ns(i.p50)),
                verdict: Some(u.p50 < i.p50),
            }),
            (Some(_), None) => t.push(Target {
                what: "userq spin p50 below iceoryx2's".into(),
                measured: "iceoryx2 not measured".into(),
                verdict: None,
            }),
            _ => {}
        }
        if let Some(p) = &self.throughput_paired {
            let r = p.median_ratio();
            t.push(Target {
                what: format!(
                    "single-queue batched throughput ≥ 5× io_uring batched NOPs (batch {}, median of {} paired rounds)",
                    p.batch,
                    p.rounds.len()
                ),
                measured: format!(
                    "{r:.2}× (rounds {}; userq at {:.2}× the streaming floor)",
                    fmt_ratios(&p.ratios()),
                    p.median_of_floor()
                ),
                verdict: Some(r >= 5.0),
            });
        }
        if let Some((cost, p99, worst, wakes, sleeps)) = self.submit() {
            let traced = match self.submit_syscalls {
                Some(n) => format!("{n} syscalls under strace"),
                None => "strace unavailable".into(),
            };
            t.push(Target {
                what: format!(
                    "submit ≤ 30 ns median and ≤ 100 ns p99 over {} rounds, zero syscalls while fw-emu is awake",
                    self.submit_rounds.len()
                ),
                measured: format!(
                    "median {cost:.1} ns, p99 {p99:.1} ns (worst round {worst:.1} ns), {wakes} futex wakes (the firmware slept {sleeps} times), {traced}"
                ),
                verdict: Some(
                    cost <= 30.0 && p99 <= 100.0 && wakes == 0 && self.submit_syscalls.unwrap_or(0) == 0,
                ),
            });
        }
        if let Some((a, b)) = self.fairness {
            let skew = (a as f64 - b as f64).abs() / ((a + b) as f64 / 2.0).max(1.0);
            t.push(Target {
                what: "fairness: equal queues' engine time within ±10% over 2 s".into(),
                measured: format!("{a} vs {b} workgroups ({:.1}% apart)", skew * 100.0),
                verdict: Some(skew <= 0.10 && a + b > 0),
            });
        }
        if let Some(l) = &self.priority {
            let p99 = l.summary().p99;
            t.push(Target {
                what: "priority: high-priority dispatch p99 within about one 1 ms slice".into(),
                measured: format!("p99 {} under 8 saturating low-priority queues", ns(p99)),
                verdict: Some(p99 <= 1_500_000),
            });
        }
        if let Some(o) = &self.oversubscription {
            t.push(Target {
                what: format!(
                    "oversubscription: {} queues from {} processes all complete",
                    o.procs * o.queues,
                    o.procs
                ),
                measured: format!(
                    "{} of {} processes' queues completed with checked results in {:.2?}{}",
                    o.completed,
                    o.procs,
                    o.elapsed,
                    if o.failures.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", o.failures.join("; "))
                    }
                ),
                verdict: Some(o.completed == o.procs && o.failures.is_empty()),
            });
        }
        if let Some(idle) = self.idle_cpu {
            t.push(Target {
                what: "idle fw-emu < 2% of a core".into(),
                measured: format!("{:.2}%", idle * 100.0),
                verdict: Some(idle < 0.02),
            });
        }
        t
    }
}
