//! Packets of arbitrary bytes: decoding never panics, and whatever decodes encodes back to
//! a packet that decodes to the same command (the tag bits aside, which decoding ignores).
#![no_main]

use libfuzzer_sys::fuzz_target;
use userq_uapi::packet::{Command, Packet};

fuzz_target!(|data: &[u8]| {
    let mut words = [0u64; 8];
    for (i, w) in words.iter_mut().enumerate() {
        let mut b = [0u8; 8];
        for (j, byte) in b.iter_mut().enumerate() {
            *byte = data.get(i * 8 + j).copied().unwrap_or(0);
        }
        *w = u64::from_le_bytes(b);
    }
    let p = Packet::from_words(words);
    if let Ok(cmd) = Command::decode(&p) {
        assert_eq!(Command::decode(&cmd.encode()), Ok(cmd));
    }
});
