//! Every decoder of untrusted bytes, fed seeded random garbage: it never panics, and what
//! it accepts re-encodes to the same bytes (so nothing is accepted that the encoder could
//! not have produced). A bounded, deterministic fuzz run of the normal test suite.

use userq_uapi::fwmsg::{FwEvent, FwRequest};
use userq_uapi::ioctl::{
    BufferReply, CreateFenceReply, CreateQueueReply, ImportFenceReply, OpenContextReply, RawReply,
    Reply, Request,
};
use userq_uapi::packet::{Command, Packet};
use userq_uapi::watchdog::Watchdog;

/// xorshift64*: a seeded generator, so a failure can be replayed from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A word that is often small, zero or all ones: garbage that reaches deep branches.
    fn word(&mut self) -> u64 {
        match self.next() % 4 {
            0 => 0,
            1 => self.next() % 32,
            2 => u64::MAX >> (self.next() % 64),
            _ => self.next(),
        }
    }

    fn words(&mut self) -> [u64; 8] {
        std::array::from_fn(|_| self.word())
    }
}

const ROUNDS: usize = 200_000;

/// One request of every kind, the seeds of the mutated ones.
const VALID: [Request; 11] = [
    Request::OpenContext { abi_version: 3 },
    Request::CreateQueue {
        ring_entries: 64,
        priority: userq_uapi::ioctl::Priority::High,
        time_slice_us: 500,
        watchdog: Watchdog::NoProgress(std::time::Duration::from_millis(250)),
        profile: false,
    },
    Request::DestroyQueue { slot: 3 },
    Request::CreateFence { initial: 5 },
    Request::ImportFence,
    Request::ReleaseFence {
        handle: userq_uapi::packet::FenceHandle(2),
    },
    Request::AllocBuffer {
        size: 4096,
        flags: 0,
    },
    Request::FreeBuffer { va: 1 << 32 },
    Request::ImportBuffer,
    Request::SetWatchdog {
        slot: 1,
        watchdog: Watchdog::JobTimeout(std::time::Duration::from_secs(3)),
    },
    Request::ResetStats,
];

#[test]
fn packets_of_garbage_decode_to_an_error_or_to_what_encodes_back() {
    let mut rng = Rng(0x5eed_0001);
    let mut accepted = 0;
    for _ in 0..ROUNDS {
        let p = Packet::from_words(rng.words());
        if let Ok(cmd) = Command::decode(&p) {
            accepted += 1;
            assert_eq!(
                Command::decode(&cmd.encode()),
                Ok(cmd),
                "re-decoding {cmd:?}"
            );
        }
    }
    assert!(accepted > 0, "the generator reaches valid packets too");
}

#[test]
fn ioctl_requests_and_replies_of_garbage_never_panic() {
    let mut rng = Rng(0x5eed_0002);
    let mut accepted = 0;
    for _ in 0..ROUNDS {
        let mut bytes: Vec<u8> = if rng.next() % 2 == 0 {
            // A valid request with a few bytes changed: garbage that passes the first checks.
            let valid = VALID[(rng.next() % VALID.len() as u64) as usize].encode();
            let mut b = bytemuck::bytes_of(&valid).to_vec();
            for _ in 0..rng.next() % 3 {
                let i = (rng.next() % b.len() as u64) as usize;
                b[i] = rng.next() as u8;
            }
            b
        } else {
            let w = rng.words();
            let mut b: Vec<u8> = w.iter().flat_map(|x| x.to_le_bytes()).collect();
            // Short, long and exact messages alike.
            b.truncate((rng.next() % 80) as usize);
            b
        };
        if rng.next() % 16 == 0 {
            bytes.push(0); // one byte too long
        }
        if let Ok(req) = Request::decode(&bytes) {
            accepted += 1;
            assert_eq!(
                bytemuck::bytes_of(&req.encode()),
                &bytes[..],
                "re-encoding {req:?}"
            );
        }
        if let Ok(raw) = RawReply::decode(&bytes) {
            let v = raw.values;
            let _ = (
                OpenContextReply::decode(&v),
                CreateQueueReply::decode(&v),
                CreateFenceReply::decode(&v),
                ImportFenceReply::decode(&v),
                BufferReply::decode(&v),
            );
        }
    }
    assert!(accepted > 0, "the generator reaches valid requests too");
}

#[test]
fn firmware_messages_of_garbage_never_panic() {
    let mut rng = Rng(0x5eed_0003);
    for _ in 0..ROUNDS {
        let w = rng.words();
        if let Ok((seq, req)) = FwRequest::decode(&w) {
            assert_eq!(FwRequest::decode(&req.encode(seq)), Ok((seq, req)));
        }
        if let Some(ev) = FwEvent::decode(&w) {
            assert_eq!(FwEvent::decode(&ev.encode()), Some(ev));
        }
    }
}
