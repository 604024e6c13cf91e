//! The cold round trip (the firmware asleep), paired with both shared-futex floors; the
//! same round trip with the default wait, and through a host signal.

use crate::report::{LatencyRow, COLD_FLOOR, FUTEX_FLOOR};
use crate::rounds::{self, Paired};
use crate::{floors, round_trip};
use userq::{Device, WaitMode};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// The name of the cold round-trip row (blocking wait: two wake-ups, like the floors).
pub const COLD: &str = "userq NOP, daemon, cold (fw asleep), block";
/// The name of the cold round-trip row with the default (adaptive) wait.
pub const COLD_ADAPTIVE: &str = "userq NOP, daemon, cold (fw asleep), adaptive";
/// The name of the row of a NOP gated on a user fence that the host signals while the
/// firmware sleeps, with the default wait.
pub const COLD_SIGNAL: &str = "userq NOP after a host signal, daemon, cold (fw asleep), adaptive";

/// What [`measure`] found.
pub struct Cold {
    /// The paired rounds: against the back-to-back ping-pong (the target), then against
    /// the ping-pong started from the same idle gap.
    pub paired: Vec<Paired>,
    /// The blocking row, the idle-gap ping-pong's row, the adaptive row and the
    /// host-signal row.
    pub rows: Vec<LatencyRow>,
    /// In how many of the idle-gap ping-pong's round trips its parent had to wait.
    pub floor_waited: usize,
    /// How many round trips the idle-gap ping-pong timed.
    pub floor_count: u64,
}

/// Cold round trips on `dev`, paired the same way as the spin ones: against the
/// back-to-back futex ping-pong (`warm`/`n` round trips a run: it needs a long run to
/// settle into sleeping every time, a short one mostly finds its partner still awake),
/// and, for the record, against the ping-pong started from the same idle gap (its rounds
/// land in two modes: both processes woken on one vCPU, or on two). Then the adaptive
/// round trip and the one through a host signal, unpaired (no target).
pub fn measure(dev: &Device, quick: bool, warm: usize, n: usize) -> Res<Cold> {
    let iters = if quick { 40 } else { 150 };
    let count = if quick { 3 } else { 5 };
    let cold = || round_trip::cold_round_trip(dev, WaitMode::Block, iters);
    let (against_futex, _, block) = rounds::interleave(
        COLD,
        FUTEX_FLOOR,
        count,
        || -> Res<_> { Ok(floors::futex_floor(warm / 5, n)?) },
        cold,
    )?;
    let mut waited = 0;
    let (against_cold, cold_floor, _) = rounds::interleave(
        COLD,
        COLD_FLOOR,
        count,
        || -> Res<_> {
            let (l, w) = floors::futex_floor_cold(iters, round_trip::COLD_IDLE)?;
            waited += w;
            Ok(l)
        },
        cold,
    )?;
    let adaptive = round_trip::cold_round_trip(dev, WaitMode::Adaptive, 2 * iters)?;
    let signalled = round_trip::cold_signal_round_trip(dev, WaitMode::Adaptive, iters)?;
    let row = |name: &str, latency| LatencyRow {
        name: name.into(),
        floor: Some("futex"),
        latency,
    };
    Ok(Cold {
        paired: vec![against_futex, against_cold],
        floor_count: cold_floor.count(),
        floor_waited: waited,
        rows: vec![
            row(COLD, block),
            row(COLD_FLOOR, cold_floor),
            row(COLD_ADAPTIVE, adaptive),
            row(COLD_SIGNAL, signalled),
        ],
    })
}
