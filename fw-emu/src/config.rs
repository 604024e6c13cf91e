//! DOC: the firmware's tunables ([`FirmwareConfig`]) and the defaults they take from the
//! machine and the environment.

use crate::kernels;
use std::time::Duration;

/// Tunables of the firmware.
#[derive(Debug, Clone)]
pub struct FirmwareConfig {
    /// Engine threads that run kernels' workgroups.
    pub engines: usize,
    /// How long an engine runs one job's workgroups before taking another turn.
    pub time_slice: Duration,
    /// The kernels DISPATCH may name: the built-ins plus any registered ones.
    pub kernels: kernels::KernelLibrary,
    /// How long the loop spins with nothing to do before it starts yielding.
    pub spin: Duration,
    /// How long after the last work the loop goes to sleep.
    pub idle_before_sleep: Duration,
    /// Packets one queue may run per turn before the next queue gets its turn.
    pub packets_per_turn: u32,
    /// Publish telemetry every tick (off only to measure what it costs:
    /// `$USERQ_FW_TELEMETRY=0`).
    pub telemetry: bool,
}

impl Default for FirmwareConfig {
    fn default() -> Self {
        FirmwareConfig {
            engines: default_engines(),
            time_slice: Duration::from_millis(1),
            kernels: kernels::KernelLibrary::builtin(),
            spin: Duration::from_micros(50),
            idle_before_sleep: Duration::from_millis(2),
            packets_per_turn: 256,
            telemetry: std::env::var_os("USERQ_FW_TELEMETRY").is_none_or(|v| v != "0"),
        }
    }
}

/// How long a suspend waits for running workgroups to yield before the firmware resets
/// their queues: well inside kmd-shim's ack timeout, so a kernel that never reaches a
/// checkpoint costs its own queue, not the device.
pub const PREEMPT_TIMEOUT: Duration = Duration::from_secs(2);

/// Environment variable that sets the number of engine threads (1 to 256).
pub const ENGINES_ENV: &str = "USERQ_FW_ENGINES";

/// `$USERQ_FW_ENGINES` if it is a number from 1 to 256; otherwise one fewer than the
/// cores, at least one: one core stays with the command processor, so that command
/// processing and kernel execution never starve each other (on 2 cores: one engine).
pub fn default_engines() -> usize {
    std::env::var(ENGINES_ENV)
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| (1..=256).contains(n))
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map_or(1, |n| n.get().saturating_sub(1))
                .max(1)
        })
}
