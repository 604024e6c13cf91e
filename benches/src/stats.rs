//! Latency samples and their summaries.

use hdrhistogram::Histogram;
use std::time::Instant;

/// A latency distribution in nanoseconds.
pub struct Latency {
    hist: Histogram<u64>,
}

impl Default for Latency {
    fn default() -> Self {
        Self::new()
    }
}

impl Latency {
    /// An empty distribution (1 ns .. 100 s, 3 significant digits).
    pub fn new() -> Self {
        Latency {
            hist: Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("valid bounds"),
        }
    }

    /// Records one sample.
    pub fn record(&mut self, ns: u64) {
        self.hist.saturating_record(ns.max(1));
    }

    /// Adds another distribution's samples.
    pub fn merge(&mut self, other: &Latency) {
        let _ = self.hist.add(&other.hist);
    }

    /// Number of samples.
    pub fn count(&self) -> u64 {
        self.hist.len()
    }

    /// The value at a quantile (0..=1), in ns.
    pub fn quantile(&self, q: f64) -> u64 {
        self.hist.value_at_quantile(q)
    }

    /// p50 / p99 / p99.9.
    pub fn summary(&self) -> Summary {
        Summary {
            p50: self.quantile(0.50),
            p99: self.quantile(0.99),
            p999: self.quantile(0.999),
            count: self.count(),
        }
    }

    /// Points of the cumulative distribution, for plots: (ns, fraction ≤ ns).
    pub fn cdf(&self) -> Vec<(f64, f64)> {
        let n = self.count().max(1) as f64;
        let mut acc = 0u64;
        let mut out = Vec::new();
        for v in self.hist.iter_recorded() {
            acc += v.count_since_last_iteration();
            out.push((v.value_iterated_to() as f64, acc as f64 / n));
        }
        out
    }
}

/// Times `iters` calls of `op` (after `warmup` untimed ones), one clock read pair per call.
/// Every system is measured this way, so the clock's own cost is in every number alike.
pub fn time_each(warmup: usize, iters: usize, mut op: impl FnMut()) -> Latency {
    for _ in 0..warmup {
        op();
    }
    let mut lat = Latency::new();
    for _ in 0..iters {
        let t = Instant::now();
        op();
        lat.record(t.elapsed().as_nanos() as u64);
    }
    lat
}

/// Percentiles of one distribution, in ns.
#[derive(Debug, Clone, Copy, Default)]
pub struct Summary {
    /// Median.
    pub p50: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Samples.
    pub count: u64,
}

/// Formats nanoseconds for a table.
pub fn ns(v: u64) -> String {
    if v >= 10_000_000 {
        format!("{:.1} ms", v as f64 / 1e6)
    } else if v >= 10_000 {
        format!("{:.1} µs", v as f64 / 1e3)
    } else {
        format!("{v} ns")
    }
}
