//! The `kmd-shim` daemon: serves a userq device on a Unix socket and runs `fw-emu` as its
//! child process, restarting it if it dies.

use clap::Parser;
use kmd_shim::{FirmwareLauncher, Kmd, KmdConfig, Limits, RestartPolicy};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Serves a userq device: the control socket, the device table and the firmware.
#[derive(Parser, Debug)]
#[command(name = "kmd-shim", version)]
struct Args {
    /// Where to listen (default: $XDG_RUNTIME_DIR/userq/dev0.sock, or
    /// /tmp/userq-$UID/dev0.sock).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// The fw-emu executable (default: fw-emu next to kmd-shim).
    #[arg(long)]
    fw: Option<PathBuf>,
    /// Do not log queue errors, hangs and resets.
    #[arg(long)]
    quiet: bool,
    /// Ban a context after this many hangs within --ban-window-secs.
    #[arg(long, default_value_t = Limits::default().ban_after_hangs, value_parser = clap::value_parser!(u32).range(1..))]
    ban_after_hangs: u32,
    /// The window of --ban-after-hangs, in seconds.
    #[arg(long, default_value_t = Limits::default().ban_window.as_secs(), value_parser = clap::value_parser!(u64).range(1..=86_400))]
    ban_window_secs: u64,
    /// Firmware restarts allowed within a minute; 0 leaves a lost device lost.
    #[arg(long, default_value_t = RestartPolicy::default().max_restarts)]
    max_restarts: u32,
    /// Device memory for on-demand buffers, in bytes (64 KiB to 64 GiB).
    #[arg(long, default_value_t = userq_uapi::paging::DEFAULT_VRAM)]
    vram: u64,
    /// The counterfactual eviction policy (off by default): wait up to this many
    /// milliseconds for the jobs using a buffer before evicting it, as a dma-fence-backed
    /// memory manager would. It deadlocks with page faults; the watchdog then prints the
    /// cycle and stops the faulting queues.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=3000))]
    eviction_waits_for_jobs_ms: Option<u64>,
}

/// Raises the soft descriptor limit to the hard one: each connection is a descriptor, and
/// the default soft limit (often 1024) is below the connection bound plus the objects.
fn raise_nofile() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut l = getrlimit(Resource::Nofile);
    l.current = l.maximum;
    let _ = setrlimit(Resource::Nofile, l);
}

fn main() -> ExitCode {
    let args = Args::parse();
    raise_nofile();
    let socket = args.socket.unwrap_or_else(kmd_shim::default_socket_path);
    let launcher = match args.fw {
        Some(program) => FirmwareLauncher::Process {
            program,
            args: Vec::new(),
        },
        None => FirmwareLauncher::sibling_process(),
    };
    if let FirmwareLauncher::Process { program: p, .. } = &launcher {
        if !p.exists() {
            eprintln!(
                "kmd-shim: firmware executable {} not found; build it with `cargo build --release -p userq-fw-emu` or pass --fw",
                p.display()
            );
            return ExitCode::from(2);
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        if let Err(e) = signal_hook::flag::register(sig, stop.clone()) {
            eprintln!("kmd-shim: cannot install signal handler: {e}");
            return ExitCode::FAILURE;
        }
    }
    let mut config = KmdConfig::new(&socket, launcher);
    config.verbose = !args.quiet;
    config.limits.ban_after_hangs = args.ban_after_hangs;
    config.limits.ban_window = Duration::from_secs(args.ban_window_secs);
    config.restart.max_restarts = args.max_restarts;
    config.vram = args.vram;
    if let Some(ms) = args.eviction_waits_for_jobs_ms {
        config.eviction = kmd_shim::EvictionPolicy::WaitForIdleJobs {
            watchdog: Duration::from_millis(ms),
        };
    }
    let kmd = match Kmd::start(config) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("kmd-shim: {e}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!(
        "kmd-shim: serving {} (fw-emu pid {})",
        kmd.socket_path().display(),
        kmd.firmware_pid().map_or("?".into(), |p| p.to_string())
    );
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("kmd-shim: shutting down");
    kmd.shutdown();
    ExitCode::SUCCESS
}
