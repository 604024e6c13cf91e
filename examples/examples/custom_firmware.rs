//! Custom kernels in daemon mode: a firmware program of one's own.
//!
//! This executable is two programs. With `--channel-fd N` it is a firmware: fw-emu's
//! library with one extra kernel registered, which is what `kmd-shim` starts as its child:
//!
//! ```text
//! cargo build --release --example custom_firmware
//! target/release/kmd-shim --socket /tmp/userq.sock --fw target/release/examples/custom_firmware
//! ```
//!
//! Without arguments it demonstrates that layout by itself: it runs kmd-shim's library
//! with this executable as the firmware child process, connects as a client, and runs the
//! custom kernel. (In embedded mode, `DeviceBuilder::kernel` registers a kernel directly.)
//!
//! cargo run --release --example custom_firmware

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use userq::firmware::{ArgError, ArgKind, Args, Checkpoint, Kernel, Workgroup, WorkgroupStatus};
use userq::uapi::packet::Dispatch;
use userq::{kernels, Command, Device, KernelArg};

/// The custom kernel's id.
const COLLATZ: u32 = kernels::FIRST_CUSTOM + 42;

/// out[i] = number of Collatz steps from i + 1 to 1.
struct Collatz;

impl Kernel for Collatz {
    fn name(&self) -> &str {
        "collatz_steps"
    }
    fn signature(&self) -> &[ArgKind] {
        &[ArgKind::U64, ArgKind::Buffer]
    }
    fn validate(&self, a: &Args, _: &Dispatch) -> Result<(), ArgError> {
        userq::firmware::need(a, 1, a.u64(0), 4)
    }
    fn run(&self, a: &Args, wg: &mut Workgroup, _: &Checkpoint<'_>) -> WorkgroupStatus {
        let out = a.buffer(1).words32();
        for i in wg.range(0).filter(|&i| i < a.u64(0)) {
            out[i as usize].store(collatz(i + 1), Relaxed);
        }
        WorkgroupStatus::Done
    }
}

fn collatz(mut n: u64) -> u32 {
    let mut steps = 0;
    while n != 1 {
        n = if n % 2 == 0 { n / 2 } else { 3 * n + 1 };
        steps += 1;
    }
    steps
}

/// Firmware mode: boot fw-emu with the extra kernel on the channel kmd-shim passed.
fn firmware(fd: &str) -> Result<(), Box<dyn std::error::Error>> {
    let channel = fw_emu::channel::inherited_channel(fd)?;
    let mut config = fw_emu::FirmwareConfig::default();
    config.kernels.register(COLLATZ, Arc::new(Collatz));
    fw_emu::Firmware::boot(channel, config)?.run();
    Ok(())
}

/// Demo mode: kmd-shim (library) in this process, this executable as its firmware.
fn demo() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("userq-custom-fw-{}", std::process::id()));
    let socket = dir.join("dev.sock");
    let launcher = kmd_shim::FirmwareLauncher::Process {
        program: std::env::current_exe()?,
        args: Vec::new(),
    };
    let kmd = kmd_shim::Kmd::start(kmd_shim::KmdConfig::new(&socket, launcher))?;
    let result = (|| -> Result<(), Box<dyn std::error::Error>> {
        let dev = Device::connect(&socket)?;
        let n = 10_000u32;
        let out = dev.alloc::<u32>(n as usize)?;
        let mut q = dev.create_queue()?;
        q.submit(Command::dispatch(
            COLLATZ,
            [n, 1, 1],
            [kernels::WORKGROUP, 1, 1],
            &[
                KernelArg::U64(n as u64),
                KernelArg::Address(out.device_address()),
            ],
        ))?
        .wait(Duration::from_secs(30))?;
        let got = out.to_vec();
        let bad = (0..n as usize).find(|&i| got[i] != collatz(i as u64 + 1));
        if let Some(i) = bad {
            return Err(format!(
                "element {i}: {} steps, want {}",
                got[i],
                collatz(i as u64 + 1)
            )
            .into());
        }
        println!(
            "custom_firmware: kernel {COLLATZ:#x} ran in firmware process {} (kmd-shim in {}); {n} results match the CPU; the longest chain below {n} takes {} steps",
            kmd.firmware_pid().unwrap_or(0),
            std::process::id(),
            got.iter().max().copied().unwrap_or(0)
        );
        Ok(())
    })();
    kmd.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [flag, fd] if flag == "--channel-fd" => firmware(fd),
        [] => demo(),
        _ => Err("usage: custom_firmware            (demo)\n       custom_firmware --channel-fd N   (as kmd-shim's firmware)".into()),
    }
}
