//! DOC: a queue's figures for the telemetry ([`QueueFigures`]) and its per-packet
//! profiling records (`uapi::layout::profile`): what it tells observers, apart from
//! running packets.

use super::{Queue, RunState};
use crate::exec::Resources;
use std::sync::atomic::{AtomicU64, Ordering::*};
use userq_uapi::packet::{Command, Packet};

/// A queue's figures for the telemetry.
#[derive(Debug, Clone, Copy)]
pub struct QueueFigures {
    /// Its state.
    pub state: userq_uapi::layout::QueueRunState,
    /// The error code that stopped it (0 if none).
    pub error: u32,
    /// Packets published (the client's write index, as last validated).
    pub submitted: u64,
    /// Packets taken.
    pub consumed: u64,
    /// Last completed value.
    pub completed: u64,
    /// Engine time, ns.
    pub engine_ns: u64,
    /// Page faults.
    pub faults: u64,
}

impl Queue {
    /// Turns on per-packet profiling into `p` (a checked profile object of this ring's
    /// entries).
    pub fn set_profile(&mut self, p: userq_uapi::shm::ShmBytes) {
        self.profile = Some(p);
    }

    /// The words of packet `index`'s profile record.
    fn profile_words(&self, index: u64) -> Option<&[AtomicU64]> {
        use userq_uapi::layout::profile::{profile_record_offset, word};
        let p = self.profile.as_ref()?;
        let entries = self.ring.entries() as u32;
        p.atomics(profile_record_offset(entries, index), word::COUNT)
    }

    /// Profiling: packet `index` was taken at `start` (and completed at `end`, if it
    /// already has): opcode, fence and value, times; the sequence number last.
    pub(super) fn profile_packet(
        &self,
        index: u64,
        packet: &Packet,
        res: &Resources<'_>,
        start: u64,
        end: Option<u64>,
    ) {
        use userq_uapi::layout::profile::word;
        let Some(w) = self.profile_words(index) else {
            return;
        };
        let op = packet.header & 0xff;
        let (aux, fence, value) = match Command::decode(packet) {
            Ok(Command::SignalFence { fence, value })
            | Ok(Command::SetFence { fence, value })
            | Ok(Command::WaitFence { fence, value, .. }) => {
                (0, res.bindings.get(&fence).map_or(0, |b| b.fence.id), value)
            }
            Ok(Command::Dispatch(d)) => (d.kernel as u64, 0, 0),
            _ => (0, 0, 0),
        };
        w[word::SEQ].store(0, Relaxed);
        // Release: a reader that sees any field below also sees SEQ = 0 when it checks
        // again, so it never takes a record mixing two packets.
        std::sync::atomic::fence(Release);
        // The client's submit time, copied into the firmware's own word while the record
        // is closed: the client may overwrite its word for the next lap at any time.
        w[word::SUBMITTED].store(w[word::SUBMIT].load(Relaxed), Relaxed);
        w[word::OP].store(op | aux << 32, Relaxed);
        w[word::START].store(start, Relaxed);
        w[word::FENCE].store(fence, Relaxed);
        w[word::VALUE].store(value, Relaxed);
        match end {
            Some(end) => {
                w[word::END].store(end, Relaxed);
                w[word::SEQ].store(index + 1, Release);
            }
            None => w[word::END].store(0, Relaxed),
        }
    }

    /// Profiling: packet `index`, taken earlier, completed now.
    pub(super) fn profile_end(&self, index: u64) {
        use userq_uapi::layout::profile::word;
        if let Some(w) = self.profile_words(index) {
            w[word::END].store(userq_uapi::layout::monotonic_ns(), Relaxed);
            w[word::SEQ].store(index + 1, Release);
        }
    }

    /// Its figures now, for the telemetry.
    pub fn figures(&self) -> QueueFigures {
        use userq_uapi::layout::QueueRunState as S;
        let (mut engine_ns, mut faults) = (self.engine_ns_done, self.faults_done);
        if let Some(j) = &self.last_job {
            engine_ns += j.engine_ns();
            faults += j.faults();
        }
        let state = match &self.state {
            RunState::Faulted => S::Faulted,
            _ if self.suspended => S::Suspended,
            RunState::Parked(_) => S::Parked,
            RunState::Dispatching { job, .. } => {
                engine_ns += job.engine_ns();
                faults += job.faults();
                if job.is_faulted() {
                    S::PageFault
                } else {
                    S::Running
                }
            }
            RunState::Active if self.rptr < self.doorbell_floor => S::Running,
            RunState::Active => S::Idle,
        };
        let error = match state {
            S::Faulted => self.timeline.state().record.code.load(Relaxed),
            _ => 0,
        };
        QueueFigures {
            state,
            error,
            submitted: self.doorbell_floor.max(self.rptr),
            consumed: self.rptr,
            completed: self.completed,
            engine_ns,
            faults,
        }
    }
}
