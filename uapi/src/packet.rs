//! DOC: queue packets.
//!
//! A packet is 64 bytes: eight little-endian `u64` words. Word 0 holds the opcode in its
//! low byte and the packet's *sequence tag* in its high 32 bits: the low 32 bits of the
//! packet's ring index plus one ([`sequence_tag`]). A producer writes words 1..8 first and
//! word 0 last (release), so a consumer that sees the tag it expects in a slot (acquire)
//! sees the whole packet: the firmware polls a busy queue's next slot this way, as AQL's
//! packet processor polls packet headers. Bits 8..32 of word 0 are reserved and must be
//! zero, as must every argument word an opcode does not use.
//!
//! | opcode | word 1 | word 2 | word 3 | word 4 |
//! |---|---|---|---|---|
//! | `NOP` | | | | |
//! | `WRITE_VALUE` | device address (8-aligned) | value | | |
//! | `SIGNAL_FENCE` | fence handle | value | | |
//! | `WAIT_FENCE` | fence handle | value | mask | [`WaitCondition`] |
//! | `TIMESTAMP` | device address (8-aligned) | | | |
//! | `DISPATCH` | kernel id \| arg count << 32 | grid x \| grid y << 32 | grid z \| wg x << 32 | wg y \| wg z << 32 |
//!
//! `DISPATCH` also uses word 5: the device address of its kernel arguments, `arg count`
//! 64-bit words (scalars, f32 bit patterns in the low half, or buffer addresses). The grid
//! counts work-items per dimension; workgroups at the edges may be partial.
//!
//! The firmware copies a packet out of the ring once ([`Packet::from_words`]) and decodes
//! that private copy ([`Command::decode`]); it never reads the slot again.

use bytemuck::{Pod, Zeroable};

/// Size of one packet in bytes.
pub const PACKET_SIZE: usize = 64;

/// The sequence tag of the packet at ring index `index`: `index + 1`, truncated to 32 bits
/// (never 0 for the first lap, and different from the previous lap's tag of the same slot).
#[inline]
pub fn sequence_tag(index: u64) -> u32 {
    index.wrapping_add(1) as u32
}

/// Packet opcodes.
pub mod opcode {
    /// Does nothing; completes in order like every packet.
    pub const NOP: u8 = 1;
    /// Stores a 64-bit value at a device address.
    pub const WRITE_VALUE: u8 = 2;
    /// Advances a fence to a value (never backwards) and wakes its waiters.
    pub const SIGNAL_FENCE: u8 = 3;
    /// Parks the queue until a fence meets a condition.
    pub const WAIT_FENCE: u8 = 4;
    /// Stores the device clock (CLOCK_MONOTONIC nanoseconds) at a device address.
    pub const TIMESTAMP: u8 = 5;
    /// Runs a kernel over a grid of workgroups.
    pub const DISPATCH: u8 = 6;
    /// Stores any value into a fence used as a flag word, and wakes its waiters.
    pub const SET_FENCE: u8 = 7;
}

/// Most kernel arguments one DISPATCH may pass.
pub const MAX_KERNEL_ARGS: u32 = 16;

/// Most workgroups one DISPATCH may have.
pub const MAX_WORKGROUPS: u64 = 1 << 32;

/// Most work-items one workgroup may have.
pub const MAX_WORKGROUP_ITEMS: u64 = 1024;

/// A fence as named inside one context: an index into that context's fence table,
/// assigned by kmd-shim at create or import time.
#[repr(transparent)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct FenceHandle(pub u32);

/// How WAIT_FENCE compares `fence & mask` with `value & mask`.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitCondition {
    /// `fence & mask >= value & mask`: the timeline case.
    GreaterOrEqual = 0,
    /// `fence & mask == value & mask`.
    Equal = 1,
    /// `fence & mask != value & mask`.
    NotEqual = 2,
}

impl WaitCondition {
    /// Decodes a condition word.
    pub fn from_u64(v: u64) -> Option<Self> {
        match v {
            0 => Some(Self::GreaterOrEqual),
            1 => Some(Self::Equal),
            2 => Some(Self::NotEqual),
            _ => None,
        }
    }

    /// Whether `current` satisfies the condition against `value` under `mask`.
    #[inline]
    pub fn holds(self, current: u64, value: u64, mask: u64) -> bool {
        let (c, v) = (current & mask, value & mask);
        match self {
            Self::GreaterOrEqual => c >= v,
            Self::Equal => c == v,
            Self::NotEqual => c != v,
        }
    }
}

/// The raw 64-byte packet as it sits in a ring slot.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Pod, Zeroable)]
pub struct Packet {
    /// Word 0: opcode in bits 0..8, the rest reserved.
    pub header: u64,
    /// Words 1..8: arguments.
    pub args: [u64; 7],
}

const _: () = assert!(core::mem::size_of::<Packet>() == PACKET_SIZE);

impl Packet {
    /// The packet's eight words, in slot order.
    #[inline]
    pub fn to_words(&self) -> [u64; 8] {
        bytemuck::cast(*self)
    }

    /// A packet from eight words copied out of a slot.
    #[inline]
    pub fn from_words(words: [u64; 8]) -> Self {
        bytemuck::cast(words)
    }

    /// The packet with its sequence tag set for ring index `index`.
    #[inline]
    pub fn tagged(mut self, index: u64) -> Self {
        self.header = (self.header & 0xffff_ffff) | (sequence_tag(index) as u64) << 32;
        self
    }

    /// The sequence tag in word 0.
    #[inline]
    pub fn tag(&self) -> u32 {
        (self.header >> 32) as u32
    }
}

/// Why a packet was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    /// The opcode is not one this ABI version defines.
    #[error("unknown opcode {0:#04x}")]
    UnknownOpcode(u8),
    /// A reserved bit or unused argument word is not zero.
    #[error("reserved field is not zero (word {word})")]
    ReservedNotZero {
        /// Index of the offending word, 0..8.
        word: u8,
    },
    /// WAIT_FENCE with a condition this ABI does not define.
    #[error("unknown wait condition {0}")]
    BadCondition(u64),
    /// A fence handle does not fit in 32 bits.
    #[error("fence handle {0:#x} out of range")]
    BadHandle(u64),
    /// A DISPATCH grid or workgroup size is zero, or the grid has too many workgroups or a
    /// workgroup too many items.
    #[error("bad dispatch grid")]
    BadGrid,
    /// A DISPATCH with more than [`MAX_KERNEL_ARGS`] arguments.
    #[error("too many kernel arguments: {0}")]
    TooManyArgs(u32),
}

/// A decoded, structurally valid packet. Whether its addresses and handles exist is the
/// executor's business.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// [`opcode::NOP`].
    Nop,
    /// [`opcode::WRITE_VALUE`].
    WriteValue {
        /// Device address, must be 8-aligned and inside the queue's VM.
        addr: u64,
        /// Value to store.
        value: u64,
    },
    /// [`opcode::SIGNAL_FENCE`].
    SignalFence {
        /// Fence to signal; must be writable by this context.
        fence: FenceHandle,
        /// Value to advance it to: a value below the fence's current one stops the queue
        /// (`FenceBackwards`) and leaves the fence as it is.
        value: u64,
    },
    /// [`opcode::SET_FENCE`]: a fence used as a flag word (masked `Equal`/`NotEqual`
    /// waits) may go down.
    SetFence {
        /// Fence to set; must be writable by this context.
        fence: FenceHandle,
        /// Value to store.
        value: u64,
    },
    /// [`opcode::WAIT_FENCE`].
    WaitFence {
        /// Fence to wait on.
        fence: FenceHandle,
        /// Value to compare with.
        value: u64,
        /// Mask applied to both sides.
        mask: u64,
        /// Comparison.
        condition: WaitCondition,
    },
    /// [`opcode::TIMESTAMP`].
    Timestamp {
        /// Device address, must be 8-aligned and inside the queue's VM.
        addr: u64,
    },
    /// [`opcode::DISPATCH`].
    Dispatch(Dispatch),
}

/// A kernel launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dispatch {
    /// Which kernel (ids are the firmware's; see its kernel library).
    pub kernel: u32,
    /// Work-items per dimension, each ≥ 1.
    pub grid: [u32; 3],
    /// Work-items per workgroup per dimension, each ≥ 1.
    pub workgroup: [u32; 3],
    /// Device address of the argument words (8-aligned).
    pub args: u64,
    /// Number of argument words.
    pub arg_count: u32,
}

impl Dispatch {
    /// Workgroups per dimension (edge workgroups may be partial).
    pub fn workgroups(&self) -> [u32; 3] {
        [0, 1, 2].map(|d| self.grid[d].div_ceil(self.workgroup[d]))
    }

    /// Total workgroups (saturating: an untrusted grid can multiply past `u64`).
    pub fn workgroup_count(&self) -> u64 {
        self.workgroups()
            .iter()
            .fold(1u64, |acc, &w| acc.saturating_mul(w as u64))
    }

    fn check(&self) -> Result<(), PacketError> {
        if self.grid.contains(&0) || self.workgroup.contains(&0) {
            return Err(PacketError::BadGrid);
        }
        // Client-supplied sizes: never multiply them unchecked.
        let items = self
            .workgroup
            .iter()
            .try_fold(1u64, |acc, &w| acc.checked_mul(w as u64));
        if items.is_none_or(|n| n > MAX_WORKGROUP_ITEMS) || self.workgroup_count() > MAX_WORKGROUPS
        {
            return Err(PacketError::BadGrid);
        }
        if self.arg_count > MAX_KERNEL_ARGS {
            return Err(PacketError::TooManyArgs(self.arg_count));
        }
        Ok(())
    }
}

impl Command {
    /// Encodes the command as a packet.
    #[inline]
    pub fn encode(&self) -> Packet {
        let mut p = Packet::zeroed();
        match *self {
            Command::Nop => p.header = opcode::NOP as u64,
            Command::WriteValue { addr, value } => {
                p.header = opcode::WRITE_VALUE as u64;
                p.args[0] = addr;
                p.args[1] = value;
            }
            Command::SignalFence { fence, value } => {
                p.header = opcode::SIGNAL_FENCE as u64;
                p.args[0] = fence.0 as u64;
                p.args[1] = value;
            }
            Command::SetFence { fence, value } => {
                p.header = opcode::SET_FENCE as u64;
                p.args[0] = fence.0 as u64;
                p.args[1] = value;
            }
            Command::WaitFence {
                fence,
                value,
                mask,
                condition,
            } => {
                p.header = opcode::WAIT_FENCE as u64;
                p.args[0] = fence.0 as u64;
                p.args[1] = value;
                p.args[2] = mask;
                p.args[3] = condition as u64;
            }
            Command::Timestamp { addr } => {
                p.header = opcode::TIMESTAMP as u64;
                p.args[0] = addr;
            }
            Command::Dispatch(d) => {
                p.header = opcode::DISPATCH as u64;
                let pair = |lo: u32, hi: u32| lo as u64 | (hi as u64) << 32;
                p.args[0] = pair(d.kernel, d.arg_count);
                p.args[1] = pair(d.grid[0], d.grid[1]);
                p.args[2] = pair(d.grid[2], d.workgroup[0]);
                p.args[3] = pair(d.workgroup[1], d.workgroup[2]);
                p.args[4] = d.args;
            }
        }
        p
    }

    /// Decodes and structurally validates a private copy of a packet.
    #[inline]
    pub fn decode(p: &Packet) -> Result<Command, PacketError> {
        // Bits 32..64 are the sequence tag, checked by whoever relies on it.
        if (p.header >> 8) & 0x00ff_ffff != 0 {
            return Err(PacketError::ReservedNotZero { word: 0 });
        }
        let op = p.header as u8;
        let (cmd, used) = match op {
            opcode::NOP => (Command::Nop, 0),
            opcode::WRITE_VALUE => (
                Command::WriteValue {
                    addr: p.args[0],
                    value: p.args[1],
                },
                2,
            ),
            opcode::SIGNAL_FENCE => (
                Command::SignalFence {
                    fence: handle(p.args[0])?,
                    value: p.args[1],
                },
                2,
            ),
            opcode::SET_FENCE => (
                Command::SetFence {
                    fence: handle(p.args[0])?,
                    value: p.args[1],
                },
                2,
            ),
            opcode::WAIT_FENCE => (
                Command::WaitFence {
                    fence: handle(p.args[0])?,
                    value: p.args[1],
                    mask: p.args[2],
                    condition: WaitCondition::from_u64(p.args[3])
                        .ok_or(PacketError::BadCondition(p.args[3]))?,
                },
                4,
            ),
            opcode::TIMESTAMP => (Command::Timestamp { addr: p.args[0] }, 1),
            opcode::DISPATCH => {
                let lo = |w: u64| w as u32;
                let hi = |w: u64| (w >> 32) as u32;
                let d = Dispatch {
                    kernel: lo(p.args[0]),
                    arg_count: hi(p.args[0]),
                    grid: [lo(p.args[1]), hi(p.args[1]), lo(p.args[2])],
                    workgroup: [hi(p.args[2]), lo(p.args[3]), hi(p.args[3])],
                    args: p.args[4],
                };
                d.check()?;
                (Command::Dispatch(d), 5)
            }
            other => return Err(PacketError::UnknownOpcode(other)),
        };
        // The words past the command's own must be zero. One OR over all seven, masked,
        // with no early exit: a fixed, branch-free loop (this runs for every packet); the
        // position is looked for only when one is not zero.
        let stray = p
            .args
            .iter()
            .enumerate()
            .fold(0, |acc, (i, &w)| acc | if i >= used { w } else { 0 });
        if stray != 0 {
            // Found: `stray` is the OR of exactly these words.
            let i = p.args[used..].iter().position(|&w| w != 0).unwrap_or(0);
            return Err(PacketError::ReservedNotZero {
                word: (used + i + 1) as u8,
            });
        }
        Ok(cmd)
    }
}

fn handle(word: u64) -> Result<FenceHandle, PacketError> {
    u32::try_from(word)
        .map(FenceHandle)
        .map_err(|_| PacketError::BadHandle(word))
}

#[cfg(test)]
mod tests;
