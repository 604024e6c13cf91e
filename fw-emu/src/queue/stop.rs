//! DOC: how a queue stops: a fault or a reset (the error record, the state word, the
//! poison), its teardown, and the fence signals it will never execute.

use super::*;

impl Queue {
    /// The SIGNAL_FENCE packets the client published but the queue never executed, as
    /// (packet index, fence handle): after the queue stopped, nothing will signal those
    /// fences. Published means tagged, or below the write index in `doorbell` (clamped to
    /// one ring); each slot is copied once.
    pub fn pending_signals(&self, doorbell: &AtomicU64) -> Vec<(u64, FenceHandle)> {
        let end = self.rptr + self.ring.entries();
        // A doorbell outside what the client may publish (backwards, or past a ring: the
        // queue may have stopped for it) vouches for nothing: then only tags count, since
        // slots below it could hold packets of the previous lap that already ran.
        let d = doorbell.load(Acquire);
        let published = if d < self.doorbell_floor || d > end {
            self.rptr
        } else {
            d.max(self.rptr)
        };
        let mut out = Vec::new();
        for i in self.rptr..end {
            let tagged = (self.slot(i)[0].load(Acquire) >> 32) as u32 == sequence_tag(i);
            if !tagged && i >= published {
                break;
            }
            match Command::decode(&self.copy_packet(i)) {
                Ok(Command::SignalFence { fence, .. }) | Ok(Command::SetFence { fence, .. }) => {
                    out.push((i, fence))
                }
                _ => {}
            }
        }
        out
    }

    fn leave_parked(&mut self) {
        match &self.state {
            RunState::Parked(wait) => {
                wait.fence.waiters().line.firmware.fetch_sub(1, SeqCst);
            }
            RunState::Dispatching { job, .. } => job.cancel(),
            _ => {}
        }
    }

    /// Stops the queue: completed work is published first, then the error record, then
    /// the state word, then the poison word and the wake.
    pub(super) fn fault(&mut self, f: Fault) -> Outcome {
        self.publish();
        self.leave_parked();
        self.state = RunState::Faulted;
        let t = &self.timeline;
        let st = t.state();
        // Record, then state word, then poison word and wake.
        let claimed = sync::write_error_record(st, f.code, f.packet_index, f.address, f.detail);
        st.queue.state.store(QueueState::Error as u32, Release);
        if claimed {
            sync::publish_poison(st, t.waiters(), f.code);
        }
        Outcome::Faulted(f)
    }

    /// Stops the queue with `code` (a reset): its running dispatch is cancelled and its
    /// timeline poisoned, the error record naming the running DISPATCH (or the next
    /// packet) and `detail`. A queue already stopped stays as it is (`None`).
    pub fn fail(&mut self, code: ErrorCode, detail: u32) -> Option<Fault> {
        self.fail_at(code, 0, detail)
    }

    /// [`Queue::fail`] with an address for the error record.
    pub fn fail_at(&mut self, code: ErrorCode, address: u64, detail: u32) -> Option<Fault> {
        if self.is_faulted() {
            return None;
        }
        let packet_index = match &self.state {
            RunState::Dispatching { packet_index, .. } => *packet_index,
            _ => self.rptr,
        };
        match self.fault(Fault {
            code,
            packet_index,
            address,
            detail,
        }) {
            Outcome::Faulted(f) => Some(f),
            _ => None,
        }
    }

    /// Tears the queue down: poisons its timeline for values it never reached.
    pub fn destroy(mut self, code: ErrorCode) {
        self.publish();
        self.leave_parked();
        let t = &self.timeline;
        let st = t.state();
        let claimed = sync::write_error_record(st, code, self.rptr, 0, 0);
        if st.queue.state.load(Relaxed) != QueueState::Error as u32 {
            st.queue.state.store(QueueState::Destroyed as u32, Release);
        }
        if claimed {
            sync::publish_poison(st, t.waiters(), code);
        }
    }
}
