//! DOC: the typed values of successful ioctl replies.
//!
//! A successful [`RawReply`](super::RawReply) carries its op's values at the front of
//! its `values`, in the order the table in [`super`] lists them; the rest are zero. Each
//! op's reply type reads and writes exactly those positions, so the wire format is the
//! table and nothing else. Decoding treats the values as untrusted: a value that does
//! not fit its field, an unknown fence kind or a non-zero unused value is a
//! [`ReplyDecodeError`], never a panic.

use crate::fwmsg::FenceId;
use crate::layout::{FenceKind, WaiterSlot};
use crate::packet::FenceHandle;

/// Why the values of a reply could not be decoded: whoever answered broke the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReplyDecodeError {
    /// A value does not fit the field it carries (a slot, handle or context id above
    /// `u32::MAX`).
    #[error("reply value {index} ({value:#x}) does not fit its field")]
    ValueOutOfRange {
        /// Position of the value in [`RawReply::values`](super::RawReply::values).
        index: usize,
        /// The value.
        value: u64,
    },
    /// IMPORT_FENCE answered with a fence kind this ABI does not define.
    #[error("unknown fence kind {0}")]
    UnknownFenceKind(u64),
    /// A value the op does not use is not zero.
    #[error("unused reply value {index} is not zero")]
    UnusedValueNotZero {
        /// Position of the value in [`RawReply::values`](super::RawReply::values).
        index: usize,
    },
}

impl ReplyDecodeError {
    /// Short human-readable description, without the values.
    pub fn describe(&self) -> &'static str {
        match self {
            ReplyDecodeError::ValueOutOfRange { .. } => "reply value does not fit its field",
            ReplyDecodeError::UnknownFenceKind(_) => "unknown fence kind",
            ReplyDecodeError::UnusedValueNotZero { .. } => "unused reply value is not zero",
        }
    }
}

/// The values of a successful reply to one op, as
/// [`RawReply::values`](super::RawReply::values) carries them (see the table in [`super`]).
pub trait Reply: Sized {
    /// The values, in the positions the table gives; the unused ones zero.
    fn encode(&self) -> [u64; 7];

    /// Decodes untrusted values: every value must fit its field and the unused ones must be
    /// zero.
    fn decode(values: &[u64; 7]) -> Result<Self, ReplyDecodeError>;
}

/// The values of a reply, read one at a time from the front; [`ReplyReader::finish`] checks
/// that the rest are zero.
struct ReplyReader<'a> {
    values: &'a [u64; 7],
    /// Index of the next value to read, in `0..=7`.
    next: usize,
}

impl<'a> ReplyReader<'a> {
    fn new(values: &'a [u64; 7]) -> Self {
        ReplyReader { values, next: 0 }
    }

    /// The next value, whole. Reading more than seven values is a bug in this module.
    fn word(&mut self) -> u64 {
        let v = self.values[self.next];
        self.next += 1;
        v
    }

    /// The next value, which must fit 32 bits.
    fn narrow(&mut self) -> Result<u32, ReplyDecodeError> {
        let index = self.next;
        let value = self.word();
        u32::try_from(value).map_err(|_| ReplyDecodeError::ValueOutOfRange { index, value })
    }

    /// The next value, a [`FenceKind`].
    fn fence_kind(&mut self) -> Result<FenceKind, ReplyDecodeError> {
        let value = self.word();
        u32::try_from(value)
            .ok()
            .and_then(FenceKind::from_u32)
            .ok_or(ReplyDecodeError::UnknownFenceKind(value))
    }

    /// The next value, a [`WaiterSlot`].
    fn waiter(&mut self) -> Result<WaiterSlot, ReplyDecodeError> {
        let index = self.next;
        let value = self.word();
        WaiterSlot::decode(value).ok_or(ReplyDecodeError::ValueOutOfRange { index, value })
    }

    /// Checks that the values not read are zero.
    fn finish(self) -> Result<(), ReplyDecodeError> {
        match (self.next..self.values.len()).find(|&i| self.values[i] != 0) {
            Some(index) => Err(ReplyDecodeError::UnusedValueNotZero { index }),
            None => Ok(()),
        }
    }
}

/// Puts `used` at the front of a reply's values; the rest stay zero.
fn reply_values(used: &[u64]) -> [u64; 7] {
    let mut values = [0; 7];
    values[..used.len()].copy_from_slice(used);
    values
}

/// The reply to OPEN_CONTEXT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenContextReply {
    /// The context's id on the device.
    pub ctx: u32,
    /// The device generation the context was opened on.
    pub generation: u64,
}

impl Reply for OpenContextReply {
    fn encode(&self) -> [u64; 7] {
        reply_values(&[self.ctx as u64, self.generation])
    }

    fn decode(values: &[u64; 7]) -> Result<Self, ReplyDecodeError> {
        let mut r = ReplyReader::new(values);
        let reply = OpenContextReply {
            ctx: r.narrow()?,
            generation: r.word(),
        };
        r.finish()?;
        Ok(reply)
    }
}

/// The reply to CREATE_QUEUE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreateQueueReply {
    /// The queue's slot: its doorbell in the context's doorbell page.
    pub slot: u32,
    /// This context's handle on the queue's timeline fence.
    pub timeline: FenceHandle,
    /// The timeline fence's id on the device.
    pub fence: FenceId,
    /// Where this context registers its waiters on the timeline.
    pub waiter: WaiterSlot,
}

impl Reply for CreateQueueReply {
    fn encode(&self) -> [u64; 7] {
        reply_values(&[
            self.slot as u64,
            self.timeline.0 as u64,
            self.fence,
            self.waiter.encode(),
        ])
    }

    fn decode(values: &[u64; 7]) -> Result<Self, ReplyDecodeError> {
        let mut r = ReplyReader::new(values);
        let reply = CreateQueueReply {
            slot: r.narrow()?,
            timeline: FenceHandle(r.narrow()?),
            fence: r.word(),
            waiter: r.waiter()?,
        };
        r.finish()?;
        Ok(reply)
    }
}

/// The reply to CREATE_FENCE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreateFenceReply {
    /// This context's handle on the new fence.
    pub handle: FenceHandle,
    /// The fence's id on the device.
    pub fence: FenceId,
    /// Where this context registers its waiters on it.
    pub waiter: WaiterSlot,
}

impl Reply for CreateFenceReply {
    fn encode(&self) -> [u64; 7] {
        reply_values(&[self.handle.0 as u64, self.fence, self.waiter.encode()])
    }

    fn decode(values: &[u64; 7]) -> Result<Self, ReplyDecodeError> {
        let mut r = ReplyReader::new(values);
        let reply = CreateFenceReply {
            handle: FenceHandle(r.narrow()?),
            fence: r.word(),
            waiter: r.waiter()?,
        };
        r.finish()?;
        Ok(reply)
    }
}

/// The reply to IMPORT_FENCE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImportFenceReply {
    /// This context's handle on the imported fence.
    pub handle: FenceHandle,
    /// The fence's id on the device.
    pub fence: FenceId,
    /// What kind of fence it is: a timeline is read-only for its importers.
    pub kind: FenceKind,
    /// Where this context registers its waiters on it.
    pub waiter: WaiterSlot,
}

impl Reply for ImportFenceReply {
    fn encode(&self) -> [u64; 7] {
        reply_values(&[
            self.handle.0 as u64,
            self.fence,
            self.kind as u64,
            self.waiter.encode(),
        ])
    }

    fn decode(values: &[u64; 7]) -> Result<Self, ReplyDecodeError> {
        let mut r = ReplyReader::new(values);
        let reply = ImportFenceReply {
            handle: FenceHandle(r.narrow()?),
            fence: r.word(),
            kind: r.fence_kind()?,
            waiter: r.waiter()?,
        };
        r.finish()?;
        Ok(reply)
    }
}

/// The reply to ALLOC_BUFFER and IMPORT_BUFFER: where the buffer is mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferReply {
    /// The buffer's device address in this context's VM.
    pub va: u64,
    /// The bytes the VM maps: the size asked for at allocation (the memfd is whole pages).
    pub size: u64,
}

impl Reply for BufferReply {
    fn encode(&self) -> [u64; 7] {
        reply_values(&[self.va, self.size])
    }

    fn decode(values: &[u64; 7]) -> Result<Self, ReplyDecodeError> {
        let mut r = ReplyReader::new(values);
        let reply = BufferReply {
            va: r.word(),
            size: r.word(),
        };
        r.finish()?;
        Ok(reply)
    }
}

/// The reply to RESET_STATS: how resets touched the context.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ResetStatsReply {
    /// Hangs of this context's queues (each one reset): it was guilty.
    pub guilty: u32,
    /// Queues of this context stopped by something they did not do: a wait on a fence
    /// that another queue's hang or a ban poisoned; plus one for each loss of the device
    /// while the context was open.
    pub innocent: u32,
    /// Whether the context is banned.
    pub banned: bool,
}

impl Reply for ResetStatsReply {
    fn encode(&self) -> [u64; 7] {
        reply_values(&[self.guilty as u64, self.innocent as u64, self.banned as u64])
    }

    fn decode(values: &[u64; 7]) -> Result<Self, ReplyDecodeError> {
        let mut r = ReplyReader::new(values);
        let guilty = r.narrow()?;
        let innocent = r.narrow()?;
        let index = r.next;
        let banned = match r.word() {
            0 => false,
            1 => true,
            value => return Err(ReplyDecodeError::ValueOutOfRange { index, value }),
        };
        r.finish()?;
        Ok(ResetStatsReply {
            guilty,
            innocent,
            banned,
        })
    }
}

/// The reply to OBSERVE (its fds: device status, telemetry, event log, all read-only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObserveReply {
    /// The device generation the objects belong to.
    pub generation: u64,
}

impl Reply for ObserveReply {
    fn encode(&self) -> [u64; 7] {
        reply_values(&[self.generation])
    }

    fn decode(values: &[u64; 7]) -> Result<Self, ReplyDecodeError> {
        let mut r = ReplyReader::new(values);
        let generation = r.word();
        r.finish()?;
        Ok(ObserveReply { generation })
    }
}

/// The reply to PAGING_STATS: one half of [`crate::paging::PagingStats::parts`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PagingStatsReply(pub [u64; 6]);

impl Reply for PagingStatsReply {
    fn encode(&self) -> [u64; 7] {
        reply_values(&self.0)
    }

    fn decode(values: &[u64; 7]) -> Result<Self, ReplyDecodeError> {
        let mut r = ReplyReader::new(values);
        let v = [r.word(), r.word(), r.word(), r.word(), r.word(), r.word()];
        r.finish()?;
        Ok(PagingStatsReply(v))
    }
}

/// The reply to DESTROY_QUEUE, RELEASE_FENCE, FREE_BUFFER, SET_WATCHDOG and MIGRATE: no
/// values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmptyReply;

impl Reply for EmptyReply {
    fn encode(&self) -> [u64; 7] {
        [0; 7]
    }

    fn decode(values: &[u64; 7]) -> Result<Self, ReplyDecodeError> {
        ReplyReader::new(values).finish()?;
        Ok(EmptyReply)
    }
}

#[cfg(test)]
mod tests;
