//! Paired, interleaved rounds: a floor and a subject measured alternately, several times.
//!
//! vCPU placement on a small VM moves between two measurements and can flatter or sink a
//! ratio taken from one pair. So each round measures the floor and the subject back to
//! back (the order flipped every round), each round gives its own ratio, and the result is
//! the median ratio with its spread; the bad rounds stay in the report.

use crate::stats::{Latency, Summary};

/// One round: the floor's and the subject's percentiles, measured back to back.
#[derive(Debug, Clone, Copy)]
pub struct Round {
    /// The floor.
    pub floor: Summary,
    /// The subject.
    pub subject: Summary,
}

impl Round {
    /// Subject p50 / floor p50.
    pub fn ratio_p50(&self) -> f64 {
        self.subject.p50 as f64 / self.floor.p50.max(1) as f64
    }

    /// Subject p99 / floor p99.
    pub fn ratio_p99(&self) -> f64 {
        self.subject.p99 as f64 / self.floor.p99.max(1) as f64
    }
}

/// A subject measured against a floor over several interleaved rounds.
#[derive(Debug, Clone)]
pub struct Paired {
    /// What was measured.
    pub name: String,
    /// What it is compared with.
    pub floor: String,
    /// Every round, in the order run.
    pub rounds: Vec<Round>,
}

/// The median of some values (0 for none).
pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

impl Paired {
    /// Per-round p50 ratios, in round order.
    pub fn ratios_p50(&self) -> Vec<f64> {
        self.rounds.iter().map(Round::ratio_p50).collect()
    }

    /// Per-round p99 ratios, in round order.
    pub fn ratios_p99(&self) -> Vec<f64> {
        self.rounds.iter().map(Round::ratio_p99).collect()
    }

    /// Median of the per-round p50 ratios.
    pub fn median_p50(&self) -> f64 {
        median(self.ratios_p50())
    }

    /// Median of the per-round p99 ratios.
    pub fn median_p99(&self) -> f64 {
        median(self.ratios_p99())
    }

    /// Median subject p50 over the rounds, in ns.
    pub fn subject_p50(&self) -> f64 {
        median(self.rounds.iter().map(|r| r.subject.p50 as f64).collect())
    }

    /// Median floor p50 over the rounds, in ns.
    pub fn floor_p50(&self) -> f64 {
        median(self.rounds.iter().map(|r| r.floor.p50 as f64).collect())
    }
}

/// Measures `floor` and `subject` alternately for `rounds` rounds, the order flipped every
/// round. Returns the pairing and both distributions merged over all rounds.
pub fn interleave<E>(
    name: &str,
    floor_name: &str,
    rounds: usize,
    mut floor: impl FnMut() -> Result<Latency, E>,
    mut subject: impl FnMut() -> Result<Latency, E>,
) -> Result<(Paired, Latency, Latency), E> {
    let mut out = Paired {
        name: name.into(),
        floor: floor_name.into(),
        rounds: Vec::with_capacity(rounds),
    };
    let (mut all_floor, mut all_subject) = (Latency::new(), Latency::new());
    for i in 0..rounds {
        let (f, s) = if i % 2 == 0 {
            let f = floor()?;
            (f, subject()?)
        } else {
            let s = subject()?;
            (floor()?, s)
        };
        out.rounds.push(Round {
            floor: f.summary(),
            subject: s.summary(),
        });
        all_floor.merge(&f);
        all_subject.merge(&s);
    }
    Ok((out, all_floor, all_subject))
}

/// One round of batched throughput: userq, the streaming floor and io_uring, back to back.
#[derive(Debug, Clone, Copy)]
pub struct RateRound {
    /// userq NOPs per second.
    pub userq: f64,
    /// The streaming floor's packets per second (`floors::stream_floor`).
    pub floor: f64,
    /// io_uring NOPs per second.
    pub io_uring: f64,
}

impl RateRound {
    /// userq's rate over io_uring's.
    pub fn ratio(&self) -> f64 {
        self.userq / self.io_uring.max(1.0)
    }

    /// userq's rate over the streaming floor's.
    pub fn of_floor(&self) -> f64 {
        self.userq / self.floor.max(1.0)
    }
}

/// Batched throughput, userq against io_uring and the streaming floor, over several
/// interleaved rounds.
#[derive(Debug, Clone)]
pub struct RatePaired {
    /// Packets per doorbell, and NOPs per `io_uring_enter`.
    pub batch: usize,
    /// Every round, in the order run.
    pub rounds: Vec<RateRound>,
}

impl RatePaired {
    /// Per-round ratios to io_uring, in round order.
    pub fn ratios(&self) -> Vec<f64> {
        self.rounds.iter().map(RateRound::ratio).collect()
    }

    /// Median of the per-round ratios to io_uring.
    pub fn median_ratio(&self) -> f64 {
        median(self.ratios())
    }

    /// Per-round shares of the streaming floor, in round order.
    pub fn of_floor(&self) -> Vec<f64> {
        self.rounds.iter().map(RateRound::of_floor).collect()
    }

    /// Median of the per-round shares of the streaming floor.
    pub fn median_of_floor(&self) -> f64 {
        median(self.of_floor())
    }

    /// Median rates over the rounds: (userq, streaming floor, io_uring).
    pub fn median_rates(&self) -> (f64, f64, f64) {
        let m = |f: fn(&RateRound) -> f64| median(self.rounds.iter().map(f).collect());
        (m(|r| r.userq), m(|r| r.floor), m(|r| r.io_uring))
    }
}

/// Measures three rates in turn for `rounds` rounds: io_uring, the floor, userq, and the
/// other way round in every other round, so that userq always runs beside its floor.
pub fn interleave_rates<E>(
    batch: usize,
    rounds: usize,
    mut userq: impl FnMut() -> Result<f64, E>,
    mut floor: impl FnMut() -> Result<f64, E>,
    mut io_uring: impl FnMut() -> Result<f64, E>,
) -> Result<RatePaired, E> {
    let mut out = RatePaired {
        batch,
        rounds: Vec::with_capacity(rounds),
    };
    for i in 0..rounds {
        let round = if i % 2 == 0 {
            let io_uring = io_uring()?;
            let floor = floor()?;
            RateRound {
                userq: userq()?,
                floor,
                io_uring,
            }
        } else {
            let userq = userq()?;
            let floor = floor()?;
            RateRound {
                userq,
                floor,
                io_uring: io_uring()?,
            }
        };
        out.rounds.push(round);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_alternate_and_the_median_ratio_ignores_one_bad_round() {
        let mut order = Vec::new();
        let mut k = 0u64;
        let lat = |v: u64| {
            let mut l = Latency::new();
            l.record(v);
            l
        };
        let order_cell = std::cell::RefCell::new(&mut order);
        let (p, _, _) = interleave::<()>(
            "s",
            "f",
            5,
            || {
                order_cell.borrow_mut().push('f');
                Ok(lat(100))
            },
            || {
                order_cell.borrow_mut().push('s');
                k += 1;
                // One flattering round (a slow floor would do the same): 90 ns.
                Ok(lat(if k == 3 { 90 } else { 150 }))
            },
        )
        .unwrap();
        assert_eq!(order.iter().collect::<String>(), "fssffssffs");
        assert_eq!(p.rounds.len(), 5);
        assert!((p.median_p50() - 1.5).abs() < 0.02, "{}", p.median_p50());
        assert!(
            p.ratios_p50().iter().any(|r| *r < 1.0),
            "the bad round is kept"
        );
    }

    #[test]
    fn rate_rounds_alternate_and_keep_every_ratio() {
        let order = std::cell::RefCell::new(String::new());
        let mut k = 0;
        let p = interleave_rates::<()>(
            256,
            3,
            || {
                order.borrow_mut().push('u');
                k += 1;
                Ok(if k == 2 { 30.0 } else { 100.0 })
            },
            || {
                order.borrow_mut().push('f');
                Ok(200.0)
            },
            || {
                order.borrow_mut().push('i');
                Ok(10.0)
            },
        )
        .unwrap();
        assert_eq!(order.into_inner(), "ifuufiifu");
        assert_eq!(p.ratios(), vec![10.0, 3.0, 10.0]);
        assert_eq!(p.of_floor(), vec![0.5, 0.15, 0.5]);
        assert_eq!(p.median_ratio(), 10.0);
        assert_eq!(p.median_rates(), (100.0, 200.0, 10.0));
    }
}
