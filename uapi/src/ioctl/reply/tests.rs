//! The ioctl reply types: every op's values round-trip, and hostile values are refused.

use super::*;
use crate::error::KmdStatus;
use crate::ioctl::RawReply;
use crate::layout::WAITER_SLOTS;

/// Encodes `reply`, checks the words against `wire` (the positions are ABI) and decodes
/// it back.
fn round_trip<R: Reply + PartialEq + std::fmt::Debug>(reply: R, wire: &[u64]) {
    let values = reply.encode();
    assert_eq!(&values[..wire.len()], wire, "{reply:?}");
    assert!(values[wire.len()..].iter().all(|&w| w == 0), "{reply:?}");
    assert_eq!(R::decode(&values), Ok(reply));
}

#[test]
fn replies_round_trip_in_their_wire_positions() {
    round_trip(
        OpenContextReply {
            ctx: 7,
            generation: 3,
        },
        &[7, 3],
    );
    round_trip(
        CreateQueueReply {
            slot: 5,
            timeline: FenceHandle(9),
            fence: 1 << 40,
            waiter: WaiterSlot { slot: 3 },
        },
        &[5, 9, 1 << 40, 3],
    );
    round_trip(
        CreateFenceReply {
            handle: FenceHandle(u32::MAX),
            fence: 12,
            waiter: WaiterSlot { slot: 0 },
        },
        &[u32::MAX as u64, 12, 0],
    );
    for kind in [FenceKind::User, FenceKind::Timeline] {
        round_trip(
            ImportFenceReply {
                handle: FenceHandle(2),
                fence: 8,
                kind,
                waiter: WaiterSlot { slot: 7 },
            },
            &[2, 8, kind as u64, 7],
        );
    }
    round_trip(
        BufferReply {
            va: crate::VA_BASE,
            size: 100,
        },
        &[crate::VA_BASE, 100],
    );
    round_trip(EmptyReply, &[]);
    round_trip(
        ResetStatsReply {
            guilty: 3,
            innocent: 1,
            banned: true,
        },
        &[3, 1, 1],
    );
}

#[test]
fn garbage_replies_are_typed_errors() {
    let too_big = reply_values(&[1 << 32, 0]);
    assert_eq!(
        OpenContextReply::decode(&too_big),
        Err(ReplyDecodeError::ValueOutOfRange {
            index: 0,
            value: 1 << 32
        })
    );
    assert_eq!(
        CreateQueueReply::decode(&reply_values(&[1, u64::MAX, 1])),
        Err(ReplyDecodeError::ValueOutOfRange {
            index: 1,
            value: u64::MAX
        })
    );
    assert_eq!(
        CreateFenceReply::decode(&too_big),
        Err(ReplyDecodeError::ValueOutOfRange {
            index: 0,
            value: 1 << 32
        })
    );
    for kind in [0, 3, (1 << 32) | 1] {
        assert_eq!(
            ImportFenceReply::decode(&reply_values(&[1, 1, kind])),
            Err(ReplyDecodeError::UnknownFenceKind(kind))
        );
    }
    // A waiter slot beyond the context's counts.
    for bad in [WAITER_SLOTS as u64, 1 << 32] {
        assert_eq!(
            CreateFenceReply::decode(&reply_values(&[1, 2, bad])),
            Err(ReplyDecodeError::ValueOutOfRange {
                index: 2,
                value: bad
            })
        );
    }
    let mut trailing = reply_values(&[1, 2, 1]);
    trailing[6] = 1;
    assert_eq!(
        ImportFenceReply::decode(&trailing),
        Err(ReplyDecodeError::UnusedValueNotZero { index: 6 })
    );
    assert_eq!(
        BufferReply::decode(&reply_values(&[1, 2, 3])),
        Err(ReplyDecodeError::UnusedValueNotZero { index: 2 })
    );
    assert_eq!(
        OpenContextReply::decode(&reply_values(&[1, 2, 3])),
        Err(ReplyDecodeError::UnusedValueNotZero { index: 2 })
    );
    assert_eq!(
        CreateQueueReply::decode(&reply_values(&[1, 2, 3, 4, 5])),
        Err(ReplyDecodeError::UnusedValueNotZero { index: 4 })
    );
    assert_eq!(
        EmptyReply::decode(&reply_values(&[0, 0, 0, 0, 1])),
        Err(ReplyDecodeError::UnusedValueNotZero { index: 4 })
    );
}

#[test]
fn a_reply_keeps_its_bytes_on_the_wire() {
    let reply = CreateQueueReply {
        slot: 1,
        timeline: FenceHandle(2),
        fence: 3,
        waiter: WaiterSlot::default(),
    };
    let raw = RawReply::new(KmdStatus::Ok, &reply.encode());
    let bytes = bytemuck::bytes_of(&raw);
    assert_eq!(&bytes[..8], &[0; 8], "status Ok, reserved zero");
    assert_eq!(&bytes[8..16], &1u64.to_ne_bytes());
    assert_eq!(&bytes[16..24], &2u64.to_ne_bytes());
    assert_eq!(&bytes[24..32], &3u64.to_ne_bytes());
    assert!(bytes[32..].iter().all(|&b| b == 0));
    let back = RawReply::decode(bytes).expect("64 bytes");
    assert_eq!(CreateQueueReply::decode(&back.values), Ok(reply));
}
