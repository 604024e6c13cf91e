//! DOC: the control socket ("ioctls") between clients and kmd-shim.
//!
//! The socket is a Unix `SOCK_SEQPACKET` socket, so message boundaries survive. Every
//! request is exactly one [`RawRequest`] (64 bytes) with the file descriptors the op takes
//! attached as `SCM_RIGHTS`; every reply is exactly one [`RawReply`] with the op's file
//! descriptors attached. A connection carries at most one context: the first request must be
//! [`Request::OpenContext`], and closing the connection destroys the context and everything
//! it owns. Requests are answered in order, one at a time.
//!
//! | op | request args | reply values | fds in | fds out |
//! |---|---|---|---|---|
//! | OPEN_CONTEXT | abi version | [`OpenContextReply`]: ctx id, device generation | | doorbell page (rw), device status (ro), device kick (rw), context waiters (rw) |
//! | CREATE_QUEUE | ring entries, [`Priority`], time slice µs (0: default), [`Watchdog`] word, profiling (0/1) | [`CreateQueueReply`]: slot, timeline fence handle, global fence id, [`crate::layout::WaiterSlot`] | | ring (rw), fence state (ro), fence waiters (rw) |
//! | DESTROY_QUEUE | slot | [`EmptyReply`] | | |
//! | CREATE_FENCE | initial value | [`CreateFenceReply`]: handle, global fence id, waiter slot | | fence state (rw), fence waiters (rw) |
//! | IMPORT_FENCE | | [`ImportFenceReply`]: handle, global fence id, [`crate::layout::FenceKind`], waiter slot | fence state, fence waiters | |
//! | RELEASE_FENCE | handle | [`EmptyReply`] | | |
//! | ALLOC_BUFFER | size in bytes, flags ([`crate::paging::ON_DEMAND`]) | [`BufferReply`]: device address, size (as asked; the memfd is whole pages) | | buffer memfd (rw) |
//! | FREE_BUFFER | device address | [`EmptyReply`] | | |
//! | IMPORT_BUFFER | | [`BufferReply`]: device address, size | buffer memfd (another context's) | |
//! | SET_WATCHDOG | slot, [`Watchdog`] word | [`EmptyReply`] | | |
//! | RESET_STATS | | [`ResetStatsReply`]: hangs (guilty), queues stopped by others' hangs or device loss (innocent), banned | | |
//! | MIGRATE | device address, bytes, [`crate::paging::MigrateTo`] | [`EmptyReply`] | | |
//! | PAGING_STATS | part (0 or 1) | [`PagingStatsReply`]: six values of [`crate::paging::PagingStats::parts`] | | |
//! | PROFILE_FD (also without a context) | ctx, slot | [`EmptyReply`] | | the queue's profile object (ro) |
//! | OBSERVE (also as a connection's first request, without a context) | abi version | [`ObserveReply`]: device generation | | device status (ro), [`crate::layout::Telemetry`] (ro), [`crate::layout::EventLog`] (ro) |
//!
//! Reply values sit in [`RawReply::values`] in the order the table lists them; the values an
//! op does not use are zero. Each reply type's [`Reply::decode`] checks exactly that.

use crate::error::KmdStatus;
use crate::packet::FenceHandle;
use crate::watchdog::Watchdog;
use bytemuck::{Pod, Zeroable};

mod reply;
pub use reply::{
    BufferReply, CreateFenceReply, CreateQueueReply, EmptyReply, ImportFenceReply, ObserveReply,
    OpenContextReply, PagingStatsReply, Reply, ReplyDecodeError, ResetStatsReply,
};

/// Largest buffer one ALLOC_BUFFER may ask for (16 GiB).
pub const MAX_BUFFER_SIZE: u64 = 16 << 30;

/// Longest time slice a queue may ask for (1 s).
pub const MAX_TIME_SLICE_US: u32 = 1_000_000;

/// Most file descriptors any message carries.
pub const MAX_FDS_PER_MESSAGE: usize = 4;

/// Request op codes.
pub mod op {
    /// See [`super::Request::OpenContext`].
    pub const OPEN_CONTEXT: u32 = 1;
    /// See [`super::Request::CreateQueue`].
    pub const CREATE_QUEUE: u32 = 2;
    /// See [`super::Request::DestroyQueue`].
    pub const DESTROY_QUEUE: u32 = 3;
    /// See [`super::Request::CreateFence`].
    pub const CREATE_FENCE: u32 = 4;
    /// See [`super::Request::ImportFence`].
    pub const IMPORT_FENCE: u32 = 5;
    /// See [`super::Request::ReleaseFence`].
    pub const RELEASE_FENCE: u32 = 6;
    /// See [`super::Request::AllocBuffer`].
    pub const ALLOC_BUFFER: u32 = 7;
    /// See [`super::Request::FreeBuffer`].
    pub const FREE_BUFFER: u32 = 8;
    /// See [`super::Request::ImportBuffer`].
    pub const IMPORT_BUFFER: u32 = 9;
    /// See [`super::Request::SetWatchdog`].
    pub const SET_WATCHDOG: u32 = 10;
    /// See [`super::Request::ResetStats`].
    pub const RESET_STATS: u32 = 11;
    /// See [`super::Request::Migrate`].
    pub const MIGRATE: u32 = 12;
    /// See [`super::Request::PagingStats`].
    pub const PAGING_STATS: u32 = 13;
    /// See [`super::Request::Observe`].
    pub const OBSERVE: u32 = 14;
    /// See [`super::Request::ProfileFd`].
    pub const PROFILE_FD: u32 = 15;
}

/// Scheduling priority of a queue.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Priority {
    /// Background work.
    Low = 0,
    /// The default.
    #[default]
    Normal = 1,
    /// Latency-sensitive work.
    High = 2,
}

impl Priority {
    /// Decodes a priority word.
    pub fn from_u64(v: u64) -> Option<Self> {
        match v {
            0 => Some(Self::Low),
            1 => Some(Self::Normal),
            2 => Some(Self::High),
            _ => None,
        }
    }
}

/// A request as it travels on the socket.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Pod, Zeroable)]
pub struct RawRequest {
    /// One of [`op`].
    pub op: u32,
    /// Zero.
    pub reserved: u32,
    /// Op-specific arguments; unused ones are zero.
    pub args: [u64; 7],
}

/// A reply as it travels on the socket.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Pod, Zeroable)]
pub struct RawReply {
    /// A [`KmdStatus`] word.
    pub status: u32,
    /// Zero.
    pub reserved: u32,
    /// Op-specific values.
    pub values: [u64; 7],
}

/// Size of every request and reply.
pub const MESSAGE_SIZE: usize = 64;
const _: () = assert!(core::mem::size_of::<RawRequest>() == MESSAGE_SIZE);
const _: () = assert!(core::mem::size_of::<RawReply>() == MESSAGE_SIZE);

/// A decoded request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Opens this connection's context.
    OpenContext {
        /// The client's [`crate::ABI_VERSION`].
        abi_version: u32,
    },
    /// Creates a queue.
    CreateQueue {
        /// Ring size in packets: a power of two in
        /// [`crate::layout::MIN_RING_ENTRIES`]..=[`crate::layout::MAX_RING_ENTRIES`].
        ring_entries: u32,
        /// Scheduling priority.
        priority: Priority,
        /// Engine time slice of its dispatches in microseconds, up to
        /// [`MAX_TIME_SLICE_US`]; 0 for the firmware's default.
        time_slice_us: u32,
        /// Hang detection for its dispatches.
        watchdog: Watchdog,
        /// Per-packet profiling timestamps ([`crate::layout::profile`]): the reply then
        /// carries a fourth fd, the queue's profile object (rw).
        profile: bool,
    },
    /// Destroys a queue; its timeline fence is poisoned for values it never reached.
    DestroyQueue {
        /// The queue's slot.
        slot: u32,
    },
    /// Creates a user fence.
    CreateFence {
        /// Its initial value.
        initial: u64,
    },
    /// Imports a fence exported by another context; two fds attached.
    ImportFence,
    /// Drops this context's hold on a fence.
    ReleaseFence {
        /// The handle to drop.
        handle: FenceHandle,
    },
    /// Allocates a CPU-visible buffer in the context's device address space.
    AllocBuffer {
        /// Size in bytes, 1..=[`MAX_BUFFER_SIZE`].
        size: u64,
        /// 0, or [`crate::paging::ON_DEMAND`]: no device pages until a kernel touches
        /// them (the memfd returned is the host backing).
        flags: u64,
    },
    /// Frees a buffer.
    FreeBuffer {
        /// Its device address.
        va: u64,
    },
    /// Maps a buffer another context allocated (its memfd attached) into this context's
    /// VM. The memory is shared; the allocating context's budget pays for it.
    ImportBuffer,
    /// Changes a queue's hang detection; applies to the dispatch running now too.
    SetWatchdog {
        /// The queue's slot.
        slot: u32,
        /// The new watchdog.
        watchdog: Watchdog,
    },
    /// Asks how resets touched this context (as `GL_ARB_robustness` and
    /// `gem_reset_stats`).
    ResetStats,
    /// Moves a range of an on-demand buffer to host or device memory (see
    /// [`crate::paging::MigrateTo`]); returns once it is there.
    Migrate {
        /// Device address inside an on-demand buffer.
        va: u64,
        /// Bytes from `va` (clipped to the buffer's end; at least 1).
        len: u64,
        /// Where to.
        to: crate::paging::MigrateTo,
    },
    /// Reads half of the device's [`crate::paging::PagingStats`].
    PagingStats {
        /// 0 or 1.
        part: u32,
    },
    /// Asks for the device's read-only observation objects: its status page, telemetry
    /// and event log (what `userq status`, `top`, `events` and `trace` read). Allowed as a
    /// connection's first request: an observer needs no context.
    Observe {
        /// The client's [`crate::ABI_VERSION`].
        abi_version: u32,
    },
    /// A read-only descriptor of a queue's profile object, for tracers (needs no
    /// context, like OBSERVE).
    ProfileFd {
        /// The queue's context.
        ctx: u32,
        /// The queue's slot.
        slot: u32,
    },
}

impl Request {
    /// Encodes the request.
    pub fn encode(&self) -> RawRequest {
        let mut r = RawRequest::zeroed();
        match *self {
            Request::OpenContext { abi_version } => {
                r.op = op::OPEN_CONTEXT;
                r.args[0] = abi_version as u64;
            }
            Request::CreateQueue {
                ring_entries,
                priority,
                time_slice_us,
                watchdog,
                profile,
            } => {
                r.op = op::CREATE_QUEUE;
                r.args[0] = ring_entries as u64;
                r.args[1] = priority as u64;
                r.args[2] = time_slice_us as u64;
                r.args[3] = watchdog.encode();
                r.args[4] = profile as u64;
            }
            Request::DestroyQueue { slot } => {
                r.op = op::DESTROY_QUEUE;
                r.args[0] = slot as u64;
            }
            Request::CreateFence { initial } => {
                r.op = op::CREATE_FENCE;
                r.args[0] = initial;
            }
            Request::ImportFence => r.op = op::IMPORT_FENCE,
            Request::ReleaseFence { handle } => {
                r.op = op::RELEASE_FENCE;
                r.args[0] = handle.0 as u64;
            }
            Request::AllocBuffer { size, flags } => {
                r.op = op::ALLOC_BUFFER;
                r.args[0] = size;
                r.args[1] = flags;
            }
            Request::FreeBuffer { va } => {
                r.op = op::FREE_BUFFER;
                r.args[0] = va;
            }
            Request::ImportBuffer => r.op = op::IMPORT_BUFFER,
            Request::SetWatchdog { slot, watchdog } => {
                r.op = op::SET_WATCHDOG;
                r.args[0] = slot as u64;
                r.args[1] = watchdog.encode();
            }
            Request::ResetStats => r.op = op::RESET_STATS,
            Request::Migrate { va, len, to } => {
                r.op = op::MIGRATE;
                r.args[0] = va;
                r.args[1] = len;
                r.args[2] = to as u64;
            }
            Request::PagingStats { part } => {
                r.op = op::PAGING_STATS;
                r.args[0] = part as u64;
            }
            Request::Observe { abi_version } => {
                r.op = op::OBSERVE;
                r.args[0] = abi_version as u64;
            }
            Request::ProfileFd { ctx, slot } => {
                r.op = op::PROFILE_FD;
                r.args[0] = ctx as u64;
                r.args[1] = slot as u64;
            }
        }
        r
    }

    /// Decodes untrusted bytes from the socket.
    pub fn decode(bytes: &[u8]) -> Result<Request, KmdStatus> {
        let raw: RawRequest =
            bytemuck::try_pod_read_unaligned(bytes).map_err(|_| KmdStatus::Malformed)?;
        if raw.reserved != 0 {
            return Err(KmdStatus::Malformed);
        }
        let a = raw.args;
        let (req, used) = match raw.op {
            op::OPEN_CONTEXT => (
                Request::OpenContext {
                    abi_version: narrow(a[0])?,
                },
                1,
            ),
            op::CREATE_QUEUE => (
                Request::CreateQueue {
                    ring_entries: narrow(a[0])?,
                    priority: Priority::from_u64(a[1]).ok_or(KmdStatus::InvalidArgument)?,
                    time_slice_us: narrow(a[2])?,
                    watchdog: watchdog(a[3])?,
                    profile: match a[4] {
                        0 => false,
                        1 => true,
                        _ => return Err(KmdStatus::InvalidArgument),
                    },
                },
                5,
            ),
            op::DESTROY_QUEUE => (
                Request::DestroyQueue {
                    slot: narrow(a[0])?,
                },
                1,
            ),
            op::CREATE_FENCE => (Request::CreateFence { initial: a[0] }, 1),
            op::IMPORT_FENCE => (Request::ImportFence, 0),
            op::RELEASE_FENCE => (
                Request::ReleaseFence {
                    handle: FenceHandle(narrow(a[0])?),
                },
                1,
            ),
            op::ALLOC_BUFFER => {
                if a[1] & !crate::paging::ON_DEMAND != 0 {
                    return Err(KmdStatus::InvalidArgument);
                }
                (
                    Request::AllocBuffer {
                        size: a[0],
                        flags: a[1],
                    },
                    2,
                )
            }
            op::FREE_BUFFER => (Request::FreeBuffer { va: a[0] }, 1),
            op::IMPORT_BUFFER => (Request::ImportBuffer, 0),
            op::SET_WATCHDOG => (
                Request::SetWatchdog {
                    slot: narrow(a[0])?,
                    watchdog: watchdog(a[1])?,
                },
                2,
            ),
            op::RESET_STATS => (Request::ResetStats, 0),
            op::MIGRATE => (
                Request::Migrate {
                    va: a[0],
                    len: a[1],
                    to: crate::paging::MigrateTo::from_u64(a[2])
                        .ok_or(KmdStatus::InvalidArgument)?,
                },
                3,
            ),
            op::PROFILE_FD => (
                Request::ProfileFd {
                    ctx: narrow(a[0])?,
                    slot: narrow(a[1])?,
                },
                2,
            ),
            op::OBSERVE => (
                Request::Observe {
                    abi_version: narrow(a[0])?,
                },
                1,
            ),
            op::PAGING_STATS => match a[0] {
                0 | 1 => (Request::PagingStats { part: a[0] as u32 }, 1),
                _ => return Err(KmdStatus::InvalidArgument),
            },
            _ => return Err(KmdStatus::UnknownOp),
        };
        if a[used..].iter().any(|&w| w != 0) {
            return Err(KmdStatus::Malformed);
        }
        Ok(req)
    }

    /// File descriptors the request must carry.
    pub fn fds_in(&self) -> usize {
        match self {
            Request::ImportFence => 2,
            Request::ImportBuffer => 1,
            _ => 0,
        }
    }
}

fn narrow(v: u64) -> Result<u32, KmdStatus> {
    u32::try_from(v).map_err(|_| KmdStatus::InvalidArgument)
}

fn watchdog(v: u64) -> Result<Watchdog, KmdStatus> {
    Watchdog::decode(v).map_err(|_| KmdStatus::InvalidArgument)
}

impl RawReply {
    /// A reply with a status and values.
    pub fn new(status: KmdStatus, values: &[u64]) -> Self {
        let mut r = RawReply::zeroed();
        r.status = status as u32;
        r.values[..values.len()].copy_from_slice(values);
        r
    }

    /// Decodes untrusted bytes from the socket.
    pub fn decode(bytes: &[u8]) -> Result<RawReply, KmdStatus> {
        bytemuck::try_pod_read_unaligned(bytes).map_err(|_| KmdStatus::Malformed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{FenceKind, WaiterSlot, WAITER_SLOTS};

    /// Reply values with `used` at the front and zeros after.
    fn reply_values(used: &[u64]) -> [u64; 7] {
        let mut values = [0; 7];
        values[..used.len()].copy_from_slice(used);
        values
    }

    #[test]
    fn requests_round_trip_and_garbage_is_rejected() {
        let reqs = [
            Request::OpenContext { abi_version: 1 },
            Request::CreateQueue {
                ring_entries: 64,
                priority: Priority::High,
                time_slice_us: 500,
                watchdog: Watchdog::NoProgress(std::time::Duration::from_millis(300)),
                profile: true,
            },
            Request::DestroyQueue { slot: 3 },
            Request::CreateFence { initial: 5 },
            Request::ImportFence,
            Request::ReleaseFence {
                handle: FenceHandle(2),
            },
            Request::AllocBuffer {
                size: 4096,
                flags: 0,
            },
            Request::AllocBuffer {
                size: 1 << 20,
                flags: crate::paging::ON_DEMAND,
            },
            Request::Migrate {
                va: 1 << 32,
                len: 4096,
                to: crate::paging::MigrateTo::Device,
            },
            Request::PagingStats { part: 1 },
            Request::Observe { abi_version: 5 },
            Request::ProfileFd { ctx: 3, slot: 7 },
            Request::FreeBuffer { va: 1 << 32 },
            Request::ImportBuffer,
            Request::SetWatchdog {
                slot: 2,
                watchdog: Watchdog::JobTimeout(std::time::Duration::from_millis(50)),
            },
            Request::ResetStats,
        ];
        for r in reqs {
            let raw = r.encode();
            assert_eq!(Request::decode(bytemuck::bytes_of(&raw)), Ok(r));
        }
        assert_eq!(Request::decode(&[0u8; 10]), Err(KmdStatus::Malformed));
        let mut raw = Request::ImportFence.encode();
        raw.op = 99;
        assert_eq!(
            Request::decode(bytemuck::bytes_of(&raw)),
            Err(KmdStatus::UnknownOp)
        );
        let mut raw = Request::DestroyQueue { slot: 1 }.encode();
        raw.args[5] = 1;
        assert_eq!(
            Request::decode(bytemuck::bytes_of(&raw)),
            Err(KmdStatus::Malformed)
        );
        raw.args[5] = 0;
        raw.args[0] = u64::MAX;
        assert_eq!(
            Request::decode(bytemuck::bytes_of(&raw)),
            Err(KmdStatus::InvalidArgument)
        );
        // A watchdog of 0 ms (of either kind) or over the maximum is refused.
        let mut raw = Request::SetWatchdog {
            slot: 1,
            watchdog: Watchdog::default(),
        }
        .encode();
        for bad in [0, 1 << 32, 10_000_000] {
            raw.args[1] = bad;
            assert_eq!(
                Request::decode(bytemuck::bytes_of(&raw)),
                Err(KmdStatus::InvalidArgument)
            );
        }
    }

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
}
