//! The `kmd-shim` daemon: serves a userq device on a Unix socket and runs `fw-emu` as its
//! child process.

use kmd_shim::{FirmwareLauncher, Kmd, KmdConfig};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const USAGE: &str = "usage: kmd-shim [--socket PATH] [--fw PATH] [--quiet]

  --socket PATH  where to listen (default: $XDG_RUNTIME_DIR/userq/dev0.sock,
                 or /tmp/userq-$UID/dev0.sock)
  --fw PATH      the fw-emu executable (default: fw-emu next to kmd-shim)
  --quiet        do not log queue errors";

fn main() -> ExitCode {
    let mut socket = kmd_shim::default_socket_path();
    let mut fw: Option<PathBuf> = None;
    let mut verbose = true;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--socket" => match args.next() {
                Some(p) => socket = p.into(),
                None => return usage("--socket needs a path"),
            },
            "--fw" => match args.next() {
                Some(p) => fw = Some(p.into()),
                None => return usage("--fw needs a path"),
            },
            "--quiet" => verbose = false,
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other => return usage(&format!("unknown argument {other:?}")),
        }
    }
    let launcher = match fw {
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
    config.verbose = verbose;
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
    let mut reported_lost = false;
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(50));
        if kmd.is_lost() && !reported_lost {
            reported_lost = true;
            eprintln!("kmd-shim: device lost; stop kmd-shim and start it again to recover");
        }
    }
    eprintln!("kmd-shim: shutting down");
    kmd.shutdown();
    ExitCode::SUCCESS
}

fn usage(msg: &str) -> ExitCode {
    eprintln!("kmd-shim: {msg}\n{USAGE}");
    ExitCode::from(2)
}
