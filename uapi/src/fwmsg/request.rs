//! DOC: the kmd → firmware requests as eight words: [`FwRequest::encode`] and
//! [`FwRequest::decode`], which refuses an unknown kind or an out-of-range field with
//! [`FwStatus::Malformed`].

use super::{head, kind, FwRequest, FwStatus, Words};
use crate::error::ErrorCode;
use crate::ioctl::Priority;
use crate::packet::FenceHandle;
use crate::watchdog::Watchdog;

impl FwRequest {
    /// Encodes the request with a sequence number.
    pub fn encode(&self, seq: u32) -> Words {
        let mut w = [0u64; 8];
        let k = match *self {
            FwRequest::MapContext {
                ctx,
                doorbell,
                waiters,
                row,
            } => {
                w[1] = ctx as u64;
                w[2] = doorbell;
                w[3] = waiters;
                w[4] = row as u64;
                kind::MAP_CONTEXT
            }
            FwRequest::UnmapContext { ctx } => {
                w[1] = ctx as u64;
                kind::UNMAP_CONTEXT
            }
            FwRequest::MapQueue {
                ctx,
                slot,
                ring,
                entries,
                priority,
                timeline,
                time_slice_us,
            } => {
                w[1] = ctx as u64;
                w[2] = slot as u64;
                w[3] = ring;
                w[4] = entries as u64;
                w[5] = priority as u64;
                w[6] = timeline;
                w[7] = time_slice_us as u64;
                kind::MAP_QUEUE
            }
            FwRequest::UnmapQueue { ctx, slot } => {
                w[1] = ctx as u64;
                w[2] = slot as u64;
                kind::UNMAP_QUEUE
            }
            FwRequest::RegisterFence {
                fence,
                state,
                waiters,
            } => {
                w[1] = fence;
                w[2] = state;
                w[3] = waiters;
                kind::REGISTER_FENCE
            }
            FwRequest::BindFence {
                ctx,
                handle,
                fence,
                writable,
                waiter_slot,
            } => {
                w[1] = ctx as u64;
                w[2] = handle.0 as u64;
                w[3] = fence;
                w[4] = writable as u64;
                w[5] = waiter_slot as u64;
                kind::BIND_FENCE
            }
            FwRequest::UnbindFence { ctx, handle } => {
                w[1] = ctx as u64;
                w[2] = handle.0 as u64;
                kind::UNBIND_FENCE
            }
            FwRequest::PoisonFence { fence, code } => {
                w[1] = fence;
                w[2] = code as u64;
                kind::POISON_FENCE
            }
            FwRequest::DropFence { fence } => {
                w[1] = fence;
                kind::DROP_FENCE
            }
            FwRequest::MapBuffer {
                ctx,
                va,
                size,
                object,
            } => {
                w[1] = ctx as u64;
                w[2] = va;
                w[3] = size;
                w[4] = object;
                kind::MAP_BUFFER
            }
            FwRequest::UnmapBuffer { ctx, va } => {
                w[1] = ctx as u64;
                w[2] = va;
                kind::UNMAP_BUFFER
            }
            FwRequest::Shutdown => kind::SHUTDOWN,
            FwRequest::Suspend { ctx, slot } | FwRequest::Resume { ctx, slot } => {
                w[1] = ctx as u64;
                w[2] = slot.map_or(u64::MAX, |s| s as u64);
                if matches!(self, FwRequest::Suspend { .. }) {
                    kind::SUSPEND
                } else {
                    kind::RESUME
                }
            }
            FwRequest::SetWatchdog {
                ctx,
                slot,
                watchdog,
            } => {
                w[1] = ctx as u64;
                w[2] = slot as u64;
                w[3] = watchdog.encode();
                kind::SET_WATCHDOG
            }
            FwRequest::ResetQueue {
                ctx,
                slot,
                code,
                detail,
                packet_index,
                job,
            } => {
                w[1] = ctx as u64;
                w[2] = slot as u64;
                w[3] = code as u64;
                w[4] = detail as u64;
                w[5] = packet_index;
                w[6] = job;
                kind::RESET_QUEUE
            }
            FwRequest::BanContext { ctx } => {
                w[1] = ctx as u64;
                kind::BAN_CONTEXT
            }
            FwRequest::Sync => kind::SYNC,
            FwRequest::MapOnDemand { ctx, va, size } => {
                w[1] = ctx as u64;
                w[2] = va;
                w[3] = size;
                kind::MAP_ON_DEMAND
            }
            FwRequest::MapPages {
                ctx,
                va,
                slot,
                count,
            } => {
                w[1] = ctx as u64;
                w[2] = va;
                w[3] = slot as u64;
                w[4] = count as u64;
                kind::MAP_PAGES
            }
            FwRequest::Invalidate { ctx, va, count } => {
                w[1] = ctx as u64;
                w[2] = va;
                w[3] = count as u64;
                kind::INVALIDATE
            }
            FwRequest::FaultReply {
                ctx,
                slot,
                job,
                code,
                address,
            } => {
                w[1] = ctx as u64;
                w[2] = slot as u64;
                w[3] = job;
                w[4] = code as u64;
                w[5] = address;
                kind::FAULT_REPLY
            }
            FwRequest::WaitJobs {
                ctx,
                va,
                timeout_ms,
            } => {
                w[1] = ctx as u64;
                w[2] = va;
                w[3] = timeout_ms as u64;
                kind::WAIT_JOBS
            }
            FwRequest::MapProfile { ctx, slot, object } => {
                w[1] = ctx as u64;
                w[2] = slot as u64;
                w[3] = object;
                kind::MAP_PROFILE
            }
        };
        w[0] = head(k, seq);
        w
    }

    /// Decodes a request; returns its sequence number too.
    pub fn decode(w: &Words) -> Result<(u32, FwRequest), FwStatus> {
        let seq = (w[0] >> 32) as u32;
        let n32 = |v: u64| u32::try_from(v).map_err(|_| FwStatus::Malformed);
        let req = match w[0] as u32 {
            kind::MAP_CONTEXT => FwRequest::MapContext {
                ctx: n32(w[1])?,
                doorbell: w[2],
                waiters: w[3],
                row: n32(w[4])?,
            },
            kind::UNMAP_CONTEXT => FwRequest::UnmapContext { ctx: n32(w[1])? },
            kind::MAP_QUEUE => FwRequest::MapQueue {
                ctx: n32(w[1])?,
                slot: n32(w[2])?,
                ring: w[3],
                entries: n32(w[4])?,
                priority: Priority::from_u64(w[5]).ok_or(FwStatus::Malformed)?,
                timeline: w[6],
                time_slice_us: n32(w[7])?,
            },
            kind::UNMAP_QUEUE => FwRequest::UnmapQueue {
                ctx: n32(w[1])?,
                slot: n32(w[2])?,
            },
            kind::REGISTER_FENCE => FwRequest::RegisterFence {
                fence: w[1],
                state: w[2],
                waiters: w[3],
            },
            kind::BIND_FENCE => FwRequest::BindFence {
                ctx: n32(w[1])?,
                handle: FenceHandle(n32(w[2])?),
                fence: w[3],
                writable: w[4] != 0,
                waiter_slot: n32(w[5])?,
            },
            kind::UNBIND_FENCE => FwRequest::UnbindFence {
                ctx: n32(w[1])?,
                handle: FenceHandle(n32(w[2])?),
            },
            kind::POISON_FENCE => FwRequest::PoisonFence {
                fence: w[1],
                code: ErrorCode::from_u32(n32(w[2])?).ok_or(FwStatus::Malformed)?,
            },
            kind::DROP_FENCE => FwRequest::DropFence { fence: w[1] },
            kind::MAP_BUFFER => FwRequest::MapBuffer {
                ctx: n32(w[1])?,
                va: w[2],
                size: w[3],
                object: w[4],
            },
            kind::UNMAP_BUFFER => FwRequest::UnmapBuffer {
                ctx: n32(w[1])?,
                va: w[2],
            },
            kind::SHUTDOWN => FwRequest::Shutdown,
            kind::SUSPEND | kind::RESUME => {
                let ctx = n32(w[1])?;
                let slot = if w[2] == u64::MAX {
                    None
                } else {
                    Some(n32(w[2])?)
                };
                if w[0] as u32 == kind::SUSPEND {
                    FwRequest::Suspend { ctx, slot }
                } else {
                    FwRequest::Resume { ctx, slot }
                }
            }
            kind::SET_WATCHDOG => FwRequest::SetWatchdog {
                ctx: n32(w[1])?,
                slot: n32(w[2])?,
                watchdog: Watchdog::decode(w[3]).map_err(|_| FwStatus::Malformed)?,
            },
            kind::RESET_QUEUE => FwRequest::ResetQueue {
                ctx: n32(w[1])?,
                slot: n32(w[2])?,
                code: ErrorCode::from_u32(n32(w[3])?).ok_or(FwStatus::Malformed)?,
                detail: n32(w[4])?,
                packet_index: w[5],
                job: w[6],
            },
            kind::BAN_CONTEXT => FwRequest::BanContext { ctx: n32(w[1])? },
            kind::SYNC => FwRequest::Sync,
            kind::MAP_ON_DEMAND => FwRequest::MapOnDemand {
                ctx: n32(w[1])?,
                va: w[2],
                size: w[3],
            },
            kind::MAP_PAGES => FwRequest::MapPages {
                ctx: n32(w[1])?,
                va: w[2],
                slot: n32(w[3])?,
                count: n32(w[4])?,
            },
            kind::INVALIDATE => FwRequest::Invalidate {
                ctx: n32(w[1])?,
                va: w[2],
                count: n32(w[3])?,
            },
            kind::FAULT_REPLY => FwRequest::FaultReply {
                ctx: n32(w[1])?,
                slot: n32(w[2])?,
                job: w[3],
                code: n32(w[4])?,
                address: w[5],
            },
            kind::MAP_PROFILE => FwRequest::MapProfile {
                ctx: n32(w[1])?,
                slot: n32(w[2])?,
                object: w[3],
            },
            kind::WAIT_JOBS => FwRequest::WaitJobs {
                ctx: n32(w[1])?,
                va: w[2],
                timeout_ms: n32(w[3])?,
            },
            _ => return Err(FwStatus::Malformed),
        };
        Ok((seq, req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fwmsg::FwEvent;

    #[test]
    fn requests_and_events_round_trip() {
        let reqs = [
            FwRequest::MapContext {
                ctx: 1,
                doorbell: 20,
                waiters: 21,
                row: 1023,
            },
            FwRequest::UnmapContext { ctx: 1 },
            FwRequest::MapQueue {
                ctx: 1,
                slot: 255,
                ring: 21,
                entries: 1024,
                priority: Priority::Low,
                timeline: 7,
                time_slice_us: 250,
            },
            FwRequest::UnmapQueue { ctx: 1, slot: 2 },
            FwRequest::RegisterFence {
                fence: 7,
                state: 22,
                waiters: 23,
            },
            FwRequest::BindFence {
                ctx: 1,
                handle: FenceHandle(4),
                fence: 7,
                writable: true,
                waiter_slot: 4079,
            },
            FwRequest::UnbindFence {
                ctx: 1,
                handle: FenceHandle(4),
            },
            FwRequest::PoisonFence {
                fence: 7,
                code: ErrorCode::OwnerDied,
            },
            FwRequest::DropFence { fence: 7 },
            FwRequest::MapBuffer {
                ctx: 1,
                va: 1 << 32,
                size: 4096,
                object: 30,
            },
            FwRequest::UnmapBuffer {
                ctx: 1,
                va: 1 << 32,
            },
            FwRequest::Shutdown,
            FwRequest::Suspend { ctx: 3, slot: None },
            FwRequest::Suspend {
                ctx: 3,
                slot: Some(7),
            },
            FwRequest::Resume { ctx: 3, slot: None },
            FwRequest::SetWatchdog {
                ctx: 3,
                slot: 1,
                watchdog: Watchdog::NoProgress(std::time::Duration::from_millis(40)),
            },
            FwRequest::ResetQueue {
                ctx: 3,
                slot: 1,
                code: ErrorCode::JobTimeout,
                detail: 2000,
                packet_index: 12,
                job: 77,
            },
            FwRequest::BanContext { ctx: 3 },
            FwRequest::Sync,
            FwRequest::MapOnDemand {
                ctx: 3,
                va: 1 << 32,
                size: 1 << 20,
            },
            FwRequest::MapPages {
                ctx: 3,
                va: 1 << 32,
                slot: 9,
                count: 4,
            },
            FwRequest::Invalidate {
                ctx: 3,
                va: 1 << 32,
                count: 2,
            },
            FwRequest::FaultReply {
                ctx: 3,
                slot: 1,
                job: 44,
                code: ErrorCode::MemoryViolation as u32,
                address: 0x1234_0000,
            },
            FwRequest::WaitJobs {
                ctx: 3,
                va: 1 << 32,
                timeout_ms: 2000,
            },
            FwRequest::MapProfile {
                ctx: 3,
                slot: 4,
                object: 99,
            },
        ];
        for (i, r) in reqs.iter().enumerate() {
            assert_eq!(FwRequest::decode(&r.encode(i as u32)), Ok((i as u32, *r)));
        }
        let evs = [
            FwEvent::Ready,
            FwEvent::Ack {
                seq: 9,
                status: FwStatus::NotFound,
            },
            FwEvent::QueueError {
                ctx: 2,
                slot: 3,
                code: ErrorCode::MemoryViolation,
                packet_index: 4,
                address: 0xdead_0000,
                detail: 17,
            },
            FwEvent::Hang {
                ctx: 2,
                slot: 3,
                code: ErrorCode::NoProgress,
                packet_index: 9,
                elapsed_ms: 2001,
                job: 5,
            },
            FwEvent::Fault {
                ctx: 2,
                slot: 3,
                address: 1 << 32,
                access: crate::paging::Access::Write,
                job: 8,
                batch: 77,
                last: true,
                ahead: true,
            },
            FwEvent::Busy {
                ctx: 2,
                slot: 3,
                job: 8,
                packet_index: 5,
                va: 1 << 32,
                faulted: true,
            },
        ];
        for e in evs {
            assert_eq!(FwEvent::decode(&e.encode()), Some(e));
        }
        assert_eq!(FwRequest::decode(&[77; 8]), Err(FwStatus::Malformed));
    }
}
