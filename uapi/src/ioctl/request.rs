//! DOC: the client → kmd-shim requests as a [`RawRequest`]: [`Request::encode`], and
//! [`Request::decode`], which refuses an unknown op, a non-zero reserved word or an
//! out-of-range field with a typed [`KmdStatus`].

use super::{op, Priority, RawRequest, Request};
use crate::error::KmdStatus;
use crate::packet::FenceHandle;
use crate::watchdog::Watchdog;
use bytemuck::Zeroable;

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
