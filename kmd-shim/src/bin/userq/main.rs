//! `userq`: what a userq device is doing, as nvidia-smi, amd-smi, intel_gpu_top and nsys
//! tell of a GPU.
//!
//! - `userq status [--json]`: the device, its processes, queues (state, fence values),
//!   memory (budget, resident, faults, evictions), resets and bans, engine use;
//! - `userq top`: the same, live, sorted by engine time (`q` or Ctrl-C quits);
//! - `userq events [--json] [--from-start]`: follows the device's event log;
//! - `userq trace --out FILE --seconds N`: a Perfetto-openable trace of the queues that
//!   have profiling on, their engine time, and the device's events.
//!
//! The device is `--socket PATH`, else `$USERQ_DEVICE`, else the default socket. Every
//! failure is a message and a non-zero exit; the terminal is always restored.

mod events;
mod format;
mod status;
mod top;
mod trace;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use userq_uapi::observe::Observer;

#[derive(Parser, Debug)]
#[command(name = "userq", version, about = "What a userq device is doing")]
struct Cli {
    /// The device's socket (default: $USERQ_DEVICE, else the default socket).
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand, Debug)]
enum What {
    /// The device, processes, queues, memory, resets, engines, once.
    Status {
        /// JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// A live view, sorted by engine time.
    Top {
        /// Refresh period in milliseconds.
        #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(50..=10_000))]
        interval_ms: u64,
    },
    /// Follows the event log.
    Events {
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        /// Start from the oldest event the log still holds (default: from now).
        #[arg(long)]
        from_start: bool,
        /// Stop after this many seconds (default: until Ctrl-C or the device goes).
        #[arg(long, value_parser = seconds)]
        seconds: Option<f64>,
    },
    /// Records a Perfetto-openable trace.
    Trace {
        /// Where to write it (Chrome trace-event JSON; open it at ui.perfetto.dev).
        #[arg(long)]
        out: PathBuf,
        /// How long to record (up to an hour).
        #[arg(long, default_value_t = 5.0, value_parser = seconds)]
        seconds: f64,
    },
}

/// A duration in seconds: finite, from 0 to an hour.
fn seconds(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if v.is_finite() && (0.0..=3600.0).contains(&v) {
        Ok(v)
    } else {
        Err("must be a number of seconds from 0 to 3600".into())
    }
}

/// The device socket this invocation means.
fn socket(cli: &Cli) -> PathBuf {
    cli.socket
        .clone()
        .or_else(|| {
            std::env::var_os("USERQ_DEVICE")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        })
        .unwrap_or_else(userq_uapi::socket::default_socket_path)
}

/// A failure: what to tell, then exit non-zero.
pub(crate) type Res<T> = Result<T, String>;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let path = socket(&cli);
    let run = || -> Res<()> {
        let obs = Observer::connect(&path).map_err(|e| e.to_string())?;
        match cli.what {
            What::Status { json } => status::run(&obs, json),
            What::Top { interval_ms } => top::run(&path, obs, interval_ms),
            What::Events {
                json,
                from_start,
                seconds,
            } => events::run(&obs, json, from_start, seconds),
            What::Trace { ref out, seconds } => trace::run(&path, &obs, out, seconds),
        }
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        // Output to a closed pipe (`userq events | head`): stop quietly, but not with 0.
        Err(e) if e == format::CLOSED_PIPE => ExitCode::from(141),
        Err(e) => {
            eprintln!("userq: {e}");
            ExitCode::FAILURE
        }
    }
}
