//! Packet encoding and decoding: every command round-trips, bad packets are refused.

use super::*;

#[test]
fn every_command_round_trips_through_a_packet() {
    let cmds = [
        Command::Nop,
        Command::WriteValue {
            addr: 0x1000,
            value: 7,
        },
        Command::SignalFence {
            fence: FenceHandle(3),
            value: u64::MAX,
        },
        Command::SetFence {
            fence: FenceHandle(4),
            value: 0,
        },
        Command::WaitFence {
            fence: FenceHandle(1),
            value: 9,
            mask: 0xff,
            condition: WaitCondition::NotEqual,
        },
        Command::Timestamp { addr: 0x2000 },
        Command::Dispatch(Dispatch {
            kernel: 7,
            grid: [1000, 3, 1],
            workgroup: [64, 1, 1],
            args: 0x1_0000_0000,
            arg_count: 4,
        }),
    ];
    for c in cmds {
        let p = Packet::from_words(c.encode().to_words());
        assert_eq!(Command::decode(&p), Ok(c));
    }
}

#[test]
fn unknown_opcode_and_reserved_bits_are_rejected() {
    let mut p = Packet::zeroed();
    p.header = 0x7f;
    assert_eq!(Command::decode(&p), Err(PacketError::UnknownOpcode(0x7f)));
    p.header = 8;
    assert_eq!(Command::decode(&p), Err(PacketError::UnknownOpcode(8)));
    p.header = opcode::NOP as u64 | 1 << 20;
    assert_eq!(
        Command::decode(&p),
        Err(PacketError::ReservedNotZero { word: 0 })
    );
    let tagged = Command::Nop.encode().tagged(41);
    assert_eq!(tagged.tag(), 42);
    assert_eq!(
        Command::decode(&tagged),
        Ok(Command::Nop),
        "the tag is not a reserved bit"
    );
    let mut p = Command::Nop.encode();
    p.args[6] = 1;
    assert_eq!(
        Command::decode(&p),
        Err(PacketError::ReservedNotZero { word: 7 })
    );
    let mut p = Command::Timestamp { addr: 8 }.encode();
    p.args[1] = 5;
    assert_eq!(
        Command::decode(&p),
        Err(PacketError::ReservedNotZero { word: 2 })
    );
    // Several stray words: the first is named.
    let mut p = Command::Nop.encode();
    (p.args[2], p.args[5]) = (1 << 63, 3);
    assert_eq!(
        Command::decode(&p),
        Err(PacketError::ReservedNotZero { word: 3 })
    );
}

#[test]
fn wait_condition_applies_the_mask_to_both_sides() {
    assert!(WaitCondition::GreaterOrEqual.holds(5, 5, !0));
    assert!(!WaitCondition::GreaterOrEqual.holds(4, 5, !0));
    assert!(WaitCondition::Equal.holds(0x1ff, 0xff, 0xff));
    assert!(WaitCondition::NotEqual.holds(0x100, 0x200, 0xf00));
    assert!(!WaitCondition::NotEqual.holds(0x1100, 0x2100, 0xff));
    let mut p = Command::WaitFence {
        fence: FenceHandle(0),
        value: 0,
        mask: !0,
        condition: WaitCondition::Equal,
    }
    .encode();
    p.args[3] = 9;
    assert_eq!(Command::decode(&p), Err(PacketError::BadCondition(9)));
    p.args[3] = 0;
    p.args[0] = 1 << 40;
    assert_eq!(Command::decode(&p), Err(PacketError::BadHandle(1 << 40)));
}

mod dispatch {
    use super::*;

    fn dispatch(grid: [u32; 3], workgroup: [u32; 3], arg_count: u32) -> Packet {
        Command::Dispatch(Dispatch {
            kernel: 1,
            grid,
            workgroup,
            args: 0x1000,
            arg_count,
        })
        .encode()
    }

    #[test]
    fn dispatch_grids_are_checked() {
        assert!(Command::decode(&dispatch([10, 1, 1], [4, 1, 1], 2)).is_ok());
        assert_eq!(
            Command::decode(&dispatch([0, 1, 1], [4, 1, 1], 2)),
            Err(PacketError::BadGrid)
        );
        assert_eq!(
            Command::decode(&dispatch([10, 1, 1], [0, 1, 1], 2)),
            Err(PacketError::BadGrid)
        );
        assert_eq!(
            Command::decode(&dispatch([10, 1, 1], [64, 64, 1], 2)),
            Err(PacketError::BadGrid),
            "4096 items per workgroup"
        );
        assert_eq!(
            Command::decode(&dispatch([u32::MAX, u32::MAX, 2], [1, 1, 1], 2)),
            Err(PacketError::BadGrid),
            "too many workgroups"
        );
        assert_eq!(
            Command::decode(&dispatch([8, 8, 8], [u32::MAX, u32::MAX, 2], 2)),
            Err(PacketError::BadGrid),
            "a workgroup size whose product overflows"
        );
        assert_eq!(
            Command::decode(&dispatch([8, 8, 8], [1 << 31, 1 << 31, 4], 2)),
            Err(PacketError::BadGrid),
            "a workgroup size whose product wraps to zero"
        );
        assert_eq!(
            Command::decode(&dispatch([10, 1, 1], [4, 1, 1], 17)),
            Err(PacketError::TooManyArgs(17))
        );
        let Ok(Command::Dispatch(d)) = Command::decode(&dispatch([10, 7, 1], [4, 2, 1], 0)) else {
            panic!("valid dispatch");
        };
        assert_eq!(d.workgroups(), [3, 4, 1]);
        assert_eq!(d.workgroup_count(), 12);
    }
}
