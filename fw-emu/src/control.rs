//! DOC: the firmware's side of the kmd transport (like xe's `xe_guc_ct.c`).
//!
//! Requests arrive on the `to_fw` ring of the [`ControlRegion`]; events and acks leave on
//! `to_kmd`. The firmware never blocks on a full `to_kmd` ring: an event that finds no room
//! goes into a private backlog, flushed in order at later loop turns, so events are never
//! reordered or lost. After pushing, the firmware wakes kmd-shim's event thread if it
//! announced that it sleeps (`ControlRegion.kmd_sleep`, the NEED_WAKEUP protocol of
//! [`userq_uapi::sync`]).

use crate::queue::Fault;
use crate::QueueId;
use std::collections::VecDeque;
use userq_uapi::fwmsg::{FwEvent, FwStatus};
use userq_uapi::layout::ControlRegion;
use userq_uapi::shm::Shm;
use userq_uapi::sync;

/// The kmd transport: the control region and the events that did not fit in it yet.
#[derive(Debug)]
pub struct Transport {
    region: Shm<ControlRegion>,
    /// Events kmd-shim's ring had no room for yet, oldest first. While it is non-empty
    /// every new event joins it, so events stay in order.
    backlog: VecDeque<[u64; 8]>,
}

impl Transport {
    /// The transport over a mapped control region.
    pub fn new(region: Shm<ControlRegion>) -> Self {
        Transport {
            region,
            backlog: VecDeque::new(),
        }
    }

    /// Takes the next request's words off `to_fw` (decoded by the caller).
    pub fn next_request(&self) -> Option<[u64; 8]> {
        self.region.to_fw.pop()
    }

    /// Whether events wait for room on kmd-shim's ring.
    pub fn has_backlog(&self) -> bool {
        !self.backlog.is_empty()
    }

    /// Whether a request is waiting.
    pub fn has_request(&self) -> bool {
        self.region.to_fw.has_message()
    }

    /// Sends an event (in order after any backlog) and wakes kmd-shim.
    pub fn emit(&mut self, ev: FwEvent) {
        let w = ev.encode();
        if !self.backlog.is_empty() || !self.region.to_kmd.push(&w) {
            self.backlog.push_back(w);
        } else {
            self.wake_kmd();
        }
    }

    /// Acknowledges request `seq`.
    pub fn ack(&mut self, seq: u32, status: FwStatus) {
        self.emit(FwEvent::Ack { seq, status });
    }

    /// Reports that queue `id` stopped.
    pub fn report_fault(&mut self, id: QueueId, f: Fault) {
        self.emit(FwEvent::QueueError {
            ctx: id.ctx,
            slot: id.slot,
            code: f.code,
            packet_index: f.packet_index,
            address: f.address,
            detail: f.detail,
        });
    }

    /// Moves backlogged events onto the ring while it has room. Returns whether any moved.
    pub fn flush_backlog(&mut self) -> bool {
        let mut moved = false;
        while let Some(w) = self.backlog.front() {
            if !self.region.to_kmd.push(w) {
                break;
            }
            self.backlog.pop_front();
            moved = true;
        }
        if moved {
            self.wake_kmd();
        }
        moved
    }

    fn wake_kmd(&self) {
        let c = &*self.region;
        sync::wake_if_announced(&c.kmd_sleep.sleeping, &c.kmd_kick.word);
    }
}
