//! The `fw-emu` process: started by kmd-shim with the firmware's end of the object channel
//! as an inherited descriptor (`--channel-fd N`).

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let channel = match args.as_slice() {
        [flag, n] if flag == "--channel-fd" => fw_emu::channel::inherited_channel(n),
        _ => Err(fw_emu::channel::ChannelFdError::NotANumber(String::new())),
    };
    let channel = match channel {
        Ok(c) => c,
        Err(e) => {
            eprintln!("fw-emu: {e}");
            eprintln!("usage: fw-emu --channel-fd N   (started by kmd-shim, not by hand)");
            return ExitCode::from(2);
        }
    };
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
