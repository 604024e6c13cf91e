//! The `fw-emu` process: started by kmd-shim with the firmware's end of the object channel
//! as an inherited descriptor (`--channel-fd N`).

use rustix::fd::{FromRawFd, OwnedFd, RawFd};
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let fd = match args.as_slice() {
        [flag, n] if flag == "--channel-fd" => n.parse::<RawFd>().ok(),
        _ => None,
    };
    let Some(fd) = fd.filter(|&fd| fd > 2 && rustix::io::fcntl_getfd(unsafe_borrow(fd)).is_ok())
    else {
        eprintln!("usage: fw-emu --channel-fd N   (started by kmd-shim, not by hand)");
        return ExitCode::from(2);
    };
    // SAFETY: `fd` is an open descriptor (checked with F_GETFD above) that kmd-shim passed
    // to this process for it alone; nothing else in this process owns it.
    let channel = unsafe { OwnedFd::from_raw_fd(fd) };
    match fw_emu::Firmware::boot(channel, fw_emu::FirmwareConfig::default()) {
        Ok(fw) => {
            fw.run();
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("fw-emu: boot failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn unsafe_borrow(fd: RawFd) -> rustix::fd::BorrowedFd<'static> {
    // SAFETY: used only for an F_GETFD probe; a closed descriptor makes that call fail
    // with EBADF, which is what the probe checks. The borrow does not outlive main.
    unsafe { rustix::fd::BorrowedFd::borrow_raw(fd) }
}
