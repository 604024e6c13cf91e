//! Commands: what a queue runs, built on the host before they are written into its ring.
//!
//! A [`Command`] is a decoded packet plus what the runtime must keep with it: the fence it
//! names (held by the queue until the packet completes) and a DISPATCH's argument words
//! (written into the queue's argument area at submit).

use crate::buffer::BufferMemory;
use crate::fence::{Fence, FencePoint};
use crate::Buffer;
use std::sync::Arc;
use userq_uapi::packet::{self, Packet, WaitCondition};

/// One packet for a queue. Build with the constructors; fences named must belong to the
/// same [`Device`](crate::Device) (context) as the queue. A command that names a fence holds it: once
/// submitted, the queue keeps the fence alive until the packet has completed.
#[derive(Debug, Clone)]
pub struct Command {
    pub(crate) cmd: packet::Command,
    /// The fence the command names, if any.
    pub(crate) fence: Option<Fence>,
    /// What few commands carry: a DISPATCH's argument words (written into the queue's
    /// argument area at submit) and the buffers the queue keeps until the packet completes.
    /// Boxed, so the common commands stay small and cheap to build, submit and drop.
    pub(crate) extra: Option<Box<Extra>>,
}

/// The rarer parts of a [`Command`].
#[derive(Debug, Clone, Default)]
pub(crate) struct Extra {
    /// A DISPATCH's argument words.
    pub(crate) kernel_args: Option<Box<[u64]>>,
    /// Buffers the command uses.
    pub(crate) buffers: Vec<Arc<BufferMemory>>,
}

/// One kernel argument word.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KernelArg {
    /// An integer.
    U64(u64),
    /// A float (its bit pattern travels in the low half of the word).
    F32(f32),
    /// A device address, e.g. [`crate::Buffer::device_address`].
    Address(u64),
}

impl KernelArg {
    fn word(self) -> u64 {
        match self {
            KernelArg::U64(v) | KernelArg::Address(v) => v,
            KernelArg::F32(f) => f.to_bits() as u64,
        }
    }
}

impl Command {
    /// Does nothing; completes in order like every command.
    pub fn nop() -> Self {
        Command {
            cmd: packet::Command::Nop,
            fence: None,
            extra: None,
        }
    }

    /// Stores `value` at device address `addr` (8-aligned, in this context's VM; see
    /// [`crate::Buffer::address_of`]).
    pub fn write_value(addr: u64, value: u64) -> Self {
        Command {
            cmd: packet::Command::WriteValue { addr, value },
            fence: None,
            extra: None,
        }
    }

    /// Stores the device clock (CLOCK_MONOTONIC nanoseconds) at device address `addr`.
    pub fn timestamp(addr: u64) -> Self {
        Command {
            cmd: packet::Command::Timestamp { addr },
            fence: None,
            extra: None,
        }
    }

    /// Runs kernel `kernel` (see [`crate::kernels`]) over `grid` work-items in workgroups
    /// of `workgroup` items, with `args`. The packet completes when every workgroup has.
    pub fn dispatch(kernel: u32, grid: [u32; 3], workgroup: [u32; 3], args: &[KernelArg]) -> Self {
        Command {
            cmd: packet::Command::Dispatch(packet::Dispatch {
                kernel,
                grid,
                workgroup,
                args: 0, // set at submit: the argument area slot of this packet
                arg_count: args.len() as u32,
            }),
            fence: None,
            extra: Some(Box::new(Extra {
                kernel_args: Some(args.iter().map(|a| a.word()).collect()),
                buffers: Vec::new(),
            })),
        }
    }

    /// Makes the command hold `buffer`: once submitted, the buffer's memory stays mapped (in
    /// the device and here) until the packet has completed, even if the `Buffer` is dropped
    /// meanwhile. The launchers of [`crate::kernels`] hold every buffer they name; use this
    /// for commands built from raw addresses.
    pub fn holding<T>(mut self, buffer: &Buffer<T>) -> Self {
        self.extra
            .get_or_insert_with(Default::default)
            .buffers
            .push(buffer.hold());
        self
    }

    /// A DISPATCH's argument words, if this is one.
    pub(crate) fn kernel_args(&self) -> Option<&[u64]> {
        self.extra.as_ref()?.kernel_args.as_deref()
    }

    /// Whether the command names no fence and carries nothing else (no argument words,
    /// no buffers): its packet is all a submit writes, and the queue keeps nothing for it.
    #[inline]
    pub(crate) fn is_plain(&self) -> bool {
        self.fence.is_none() && self.extra.is_none()
    }

    /// The buffers the command holds.
    pub(crate) fn buffers(&self) -> &[Arc<BufferMemory>] {
        self.extra.as_ref().map_or(&[], |e| &e.buffers)
    }

    /// The packet this command encodes to (a DISPATCH's argument address is filled in
    /// at submit).
    pub fn packet(&self) -> Packet {
        self.cmd.encode()
    }

    /// Advances a user fence to `value` and wakes its waiters. Fences never go
    /// backwards: if the fence is above `value` when the packet runs, the queue stops with
    /// [`crate::ErrorCode::FenceBackwards`] and the fence stays as it is. For a fence used
    /// as a flag word, see [`Command::set_fence`].
    pub fn signal(fence: &Fence, value: u64) -> Self {
        Command {
            cmd: packet::Command::SignalFence {
                fence: fence.inner.handle,
                value,
            },
            fence: Some(fence.clone()),
            extra: None,
        }
    }

    /// Stores `value` into a user fence used as a flag word (waited on with masked
    /// `Equal`/`NotEqual` conditions), which may go down, and wakes its waiters.
    pub fn set_fence(fence: &Fence, value: u64) -> Self {
        Command {
            cmd: packet::Command::SetFence {
                fence: fence.inner.handle,
                value,
            },
            fence: Some(fence.clone()),
            extra: None,
        }
    }

    /// Holds the queue until the point is reached (fence ≥ value). The queue is parked
    /// meanwhile and costs the firmware nothing.
    pub fn wait(point: &FencePoint) -> Self {
        Self::wait_fence(
            point.fence(),
            point.value(),
            WaitCondition::GreaterOrEqual,
            u64::MAX,
        )
    }

    /// Holds the queue until `fence & mask` compares with `value & mask` as `condition`
    /// says.
    pub fn wait_fence(fence: &Fence, value: u64, condition: WaitCondition, mask: u64) -> Self {
        Command {
            cmd: packet::Command::WaitFence {
                fence: fence.inner.handle,
                value,
                mask,
                condition,
            },
            fence: Some(fence.clone()),
            extra: None,
        }
    }
}
