//! DOC: the firmware → kmd side of the transport: events ([`FwEvent`]: acks, queue errors,
//! hang reports) and the status an ack carries ([`FwStatus`]).

use super::{head, kind, Words};
use crate::error::ErrorCode;

/// Result of a request, in its ack.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FwStatus {
    /// Done.
    #[error("ok")]
    Ok = 0,
    /// A named object was missing from the channel or failed its map-time check.
    #[error("bad memory object")]
    BadObject = 1,
    /// The context, queue, fence or mapping named does not exist.
    #[error("not found")]
    NotFound = 2,
    /// The context, queue, handle or address is already in use.
    #[error("already exists")]
    Exists = 3,
    /// The request could not be decoded.
    #[error("malformed request")]
    Malformed = 4,
    /// A suspend could not be completed in time: a workgroup did not yield. Its queue was
    /// reset ([`ErrorCode::PreemptTimeout`]).
    #[error("preemption timed out")]
    PreemptTimeout = 5,
    /// A [`super::FwRequest::WaitJobs`] gave up: jobs still use the buffer.
    #[error("jobs still use the buffer")]
    Busy = 6,
}

impl FwStatus {
    fn from_u64(v: u64) -> Self {
        match v {
            0 => Self::Ok,
            1 => Self::BadObject,
            2 => Self::NotFound,
            3 => Self::Exists,
            5 => Self::PreemptTimeout,
            6 => Self::Busy,
            _ => Self::Malformed,
        }
    }
}

/// A firmware → kmd event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FwEvent {
    /// The firmware mapped its boot objects and is polling.
    Ready,
    /// A request was processed.
    Ack {
        /// The request's sequence number.
        seq: u32,
        /// Its result.
        status: FwStatus,
    },
    /// A queue stopped on an error (bad packet, memory violation, bad index, failed
    /// dependency). Its timeline fence is poisoned already.
    QueueError {
        /// Context id.
        ctx: u32,
        /// Queue slot.
        slot: u32,
        /// What happened.
        code: ErrorCode,
        /// Index of the offending packet.
        packet_index: u64,
        /// Offending address or index, if any.
        address: u64,
        /// The error record's detail (for [`ErrorCode::DependencyFailed`], the poison
        /// code of the fence waited on).
        detail: u32,
    },
    /// A queue's watchdog fired: its dispatch ran past the job timeout, or a
    /// long-running dispatch made no progress. The queue keeps running until kmd-shim
    /// decides ([`super::FwRequest::ResetQueue`]). Reported once per dispatch.
    Hang {
        /// Context id.
        ctx: u32,
        /// Queue slot.
        slot: u32,
        /// [`ErrorCode::JobTimeout`] or [`ErrorCode::NoProgress`].
        code: ErrorCode,
        /// Index of the DISPATCH packet.
        packet_index: u64,
        /// How long it ran (job timeout) or went without progress, in milliseconds.
        elapsed_ms: u64,
        /// The firmware's id of the hung job, to name in [`super::FwRequest::ResetQueue`].
        job: u64,
    },
    /// A workgroup's footprint touched a page that is not resident. The job stopped
    /// handing out workgroups; the faulting ones wait, with their checkpoint state, for
    /// [`super::FwRequest::FaultReply`]. Faults go in batches (at most
    /// [`crate::paging::FAULT_BATCH_MAX`], sorted by address so that pages of one 2 MiB
    /// region are together); the last of a batch has `last` set.
    Fault {
        /// Context id.
        ctx: u32,
        /// Queue slot.
        slot: u32,
        /// Device address of the page (page-aligned).
        address: u64,
        /// How the workgroup touches it.
        access: crate::paging::Access,
        /// The faulting job.
        job: u64,
        /// The batch's number.
        batch: u64,
        /// The batch's last fault.
        last: bool,
        /// Not a page the faulting workgroup needs, but one of a following workgroup of
        /// its job ("fault-ahead", a prefetch): serviced after the pages that are needed.
        ahead: bool,
    },
    /// Sent before a [`super::FwRequest::WaitJobs`] that timed out is acknowledged: a job
    /// that still uses the buffer.
    Busy {
        /// Context id.
        ctx: u32,
        /// Queue slot.
        slot: u32,
        /// The job.
        job: u64,
        /// Index of its DISPATCH packet.
        packet_index: u64,
        /// The buffer address the wait named.
        va: u64,
        /// The job waits for a fault of its own to be serviced (in this batch or a later
        /// one): it cannot finish before kmd-shim answers, so waiting for it is a cycle.
        faulted: bool,
    },
}

impl FwEvent {
    /// Encodes the event.
    pub fn encode(&self) -> Words {
        let mut w = [0u64; 8];
        match *self {
            FwEvent::Ready => w[0] = head(kind::READY, 0),
            FwEvent::Ack { seq, status } => {
                w[0] = head(kind::ACK, seq);
                w[1] = status as u64;
            }
            FwEvent::QueueError {
                ctx,
                slot,
                code,
                packet_index,
                address,
                detail,
            } => {
                w[0] = head(kind::QUEUE_ERROR, 0);
                w[1] = ctx as u64;
                w[2] = slot as u64;
                w[3] = code as u64;
                w[4] = packet_index;
                w[5] = address;
                w[6] = detail as u64;
            }
            FwEvent::Hang {
                ctx,
                slot,
                code,
                packet_index,
                elapsed_ms,
                job,
            } => {
                w[0] = head(kind::HANG, 0);
                w[1] = ctx as u64;
                w[2] = slot as u64;
                w[3] = code as u64;
                w[4] = packet_index;
                w[5] = elapsed_ms;
                w[6] = job;
            }
            FwEvent::Fault {
                ctx,
                slot,
                address,
                access,
                job,
                batch,
                last,
                ahead,
            } => {
                w[0] = head(kind::FAULT, 0);
                w[1] = ctx as u64;
                w[2] = slot as u64;
                w[3] = address;
                w[4] = access as u64;
                w[5] = job;
                w[6] = batch;
                w[7] = last as u64 | (ahead as u64) << 1;
            }
            FwEvent::Busy {
                ctx,
                slot,
                job,
                packet_index,
                va,
                faulted,
            } => {
                w[0] = head(kind::BUSY, 0);
                w[1] = ctx as u64;
                w[2] = slot as u64;
                w[3] = job;
                w[4] = packet_index;
                w[5] = va;
                w[6] = faulted as u64;
            }
        }
        w
    }

    /// Decodes an event; `None` if it is not one this ABI defines.
    pub fn decode(w: &Words) -> Option<FwEvent> {
        Some(match w[0] as u32 {
            kind::READY => FwEvent::Ready,
            kind::ACK => FwEvent::Ack {
                seq: (w[0] >> 32) as u32,
                status: FwStatus::from_u64(w[1]),
            },
            kind::QUEUE_ERROR => FwEvent::QueueError {
                ctx: u32::try_from(w[1]).ok()?,
                slot: u32::try_from(w[2]).ok()?,
                code: ErrorCode::from_u32(u32::try_from(w[3]).ok()?)?,
                packet_index: w[4],
                address: w[5],
                detail: u32::try_from(w[6]).ok()?,
            },
            kind::HANG => FwEvent::Hang {
                ctx: u32::try_from(w[1]).ok()?,
                slot: u32::try_from(w[2]).ok()?,
                code: ErrorCode::from_u32(u32::try_from(w[3]).ok()?)?,
                packet_index: w[4],
                elapsed_ms: w[5],
                job: w[6],
            },
            kind::FAULT => FwEvent::Fault {
                ctx: u32::try_from(w[1]).ok()?,
                slot: u32::try_from(w[2]).ok()?,
                address: w[3],
                access: crate::paging::Access::from_u64(w[4])?,
                job: w[5],
                batch: w[6],
                last: w[7] & 1 != 0,
                ahead: w[7] & 2 != 0,
            },
            kind::BUSY => FwEvent::Busy {
                ctx: u32::try_from(w[1]).ok()?,
                slot: u32::try_from(w[2]).ok()?,
                job: w[3],
                packet_index: w[4],
                va: w[5],
                faulted: match w[6] {
                    0 => false,
                    1 => true,
                    _ => return None,
                },
            },
            _ => return None,
        })
    }
}
