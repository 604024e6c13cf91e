//! DOC: how a queue's packets are taken and run: by sequence tag or by doorbell, the
//! polled look's inline path, and where each completion is published.

use super::*;

impl Queue {
    /// Whether the client published packets the firmware has not copied yet, by its
    /// doorbell or by the next slot's sequence tag (or moved its doorbell backwards, which
    /// `service` reports).
    pub fn has_unread(&self, doorbell: &AtomicU64) -> bool {
        // The tag first: while the client streams tagged packets the doorbell's line is not
        // read at all, so the client's next doorbell store finds it still owned.
        self.next_tagged() || self.doorbell_moved(doorbell)
    }

    /// Whether the client's doorbell says there are packets the firmware has not copied
    /// (or moved backwards, which `service` reports).
    #[inline]
    pub fn doorbell_moved(&self, doorbell: &AtomicU64) -> bool {
        let d = doorbell.load(Relaxed);
        d > self.rptr || d < self.doorbell_floor
    }

    /// Whether the next slot holds the packet the firmware expects (its sequence tag).
    /// Acquire: pairs with the producer's release store of word 0, written last.
    fn next_tagged(&self) -> bool {
        (self.slot(self.rptr)[0].load(Acquire) >> 32) as u32 == sequence_tag(self.rptr)
    }

    /// Consecutive tagged packets from `rptr`, at most `budget` and a ring.
    fn tagged_run(&self, budget: u64) -> u64 {
        let limit = budget.min(self.ring.entries());
        let mut n = 0;
        while n < limit {
            let i = self.rptr + n;
            if (self.slot(i)[0].load(Acquire) >> 32) as u32 != sequence_tag(i) {
                break;
            }
            n += 1;
        }
        n
    }

    /// Runs up to `budget` packets. `doorbell` is the client's write index for this queue.
    pub fn service(&mut self, doorbell: &AtomicU64, res: &Resources<'_>, budget: u32) -> Outcome {
        if !self.is_active() {
            return if self.is_parked() && !self.suspended {
                Outcome::Parked
            } else {
                Outcome::Idle
            };
        }
        if self.next_tagged() {
            return self.service_by_tag(res, budget);
        }
        // Acquire: pairs with the client's release store of its write index, so the packet
        // words it wrote before are visible to the loads below.
        let wptr = doorbell.load(Acquire);
        if wptr < self.doorbell_floor || wptr > self.rptr + self.ring.entries() {
            return self.fault(Fault {
                code: ErrorCode::BadWriteIndex,
                packet_index: self.rptr,
                address: wptr,
                detail: 0,
            });
        }
        self.doorbell_floor = wptr;
        // A doorbell may lag packets already taken by their tags.
        let ahead = wptr.saturating_sub(self.rptr);
        let n = ahead.min(budget as u64);
        let before = self.rptr;
        let outcome = self.run_packets(n, res).unwrap_or(if ahead > n {
            Outcome::More
        } else {
            Outcome::Idle
        });
        self.publish();
        self.ran |= self.rptr != before;
        outcome
    }

    /// Runs up to `budget` packets by their sequence tags, for a caller that found the
    /// queue active and the next slot tagged ([`Queue::tagged_now`], or [`Queue::service`]'s
    /// own checks). Inlined into a polled look, so that the path from the tag's load to
    /// the completion's store is one straight line, with no second look at the state or
    /// the tag.
    #[inline(always)]
    pub fn service_by_tag(&mut self, res: &Resources<'_>, budget: u32) -> Outcome {
        // The client spins on the timeline's line: ask for it now, so the completion's
        // store does not wait for the transfer after the packet's work (`prefetch`).
        crate::prefetch::for_write(&self.timeline.state().slot.value);
        let before = self.rptr;
        let outcome = self.service_tagged(res, budget as u64);
        self.publish();
        self.ran |= self.rptr != before;
        outcome
    }

    /// Whether the queue runs and the next slot holds its packet (by sequence tag): a
    /// polled look's check before [`Queue::service_by_tag`].
    #[inline(always)]
    pub fn tagged_now(&self) -> bool {
        self.is_active() && self.next_tagged()
    }

    /// Packets published by sequence tag (the next slot's is there): the tag and the
    /// packet share a line, so the firmware learns of the packet and reads it in one
    /// transfer. The packets known to be tagged run and their completion is published
    /// *before* the slots after them are looked at: those lines were last written by the
    /// client a ring ago, and a load that misses there would hold back the completion's
    /// store (stores leave in program order). A batch costs one more publish than before.
    ///
    /// The first packet runs inline (it is the round trip's) and its completion is stored
    /// before any call; the packets after it run out of line.
    #[inline(always)]
    fn service_tagged(&mut self, res: &Resources<'_>, budget: u64) -> Outcome {
        match self.run_one(res) {
            Some(stopped) => stopped,
            None => {
                self.publish();
                self.service_tagged_rest(res, budget)
            }
        }
    }

    /// [`Queue::service_tagged`] after its first packet, which is published.
    #[inline(never)]
    fn service_tagged_rest(&mut self, res: &Resources<'_>, budget: u64) -> Outcome {
        let mut taken = 1;
        loop {
            if taken >= budget {
                return Outcome::More;
            }
            let known = self.tagged_run(budget - taken);
            if known == 0 {
                return Outcome::Idle;
            }
            if let Some(stopped) = self.run_packets(known, res) {
                return stopped;
            }
            taken += known;
            self.publish();
        }
    }

    /// Copies out and runs `n` packets from `rptr` (they are published). `Some` when the
    /// queue stopped running before the last one: a dispatch went to the engines, a wait
    /// parked, or a fault stopped the queue.
    fn run_packets(&mut self, n: u64, res: &Resources<'_>) -> Option<Outcome> {
        for _ in 0..n {
            if let Some(stopped) = self.run_one(res) {
                return Some(stopped);
            }
        }
        None
    }

    /// Copies out and runs the packet at `rptr` (it is published). `Some` when the queue
    /// stopped running: a dispatch went to the engines, a wait parked, or a fault stopped
    /// the queue.
    #[inline(always)]
    fn run_one(&mut self, res: &Resources<'_>) -> Option<Outcome> {
        let index = self.rptr;
        let packet = self.copy_packet(index);
        self.rptr += 1;
        // Profiling off: one test per packet.
        let t0 = self
            .profile
            .is_some()
            .then(userq_uapi::layout::monotonic_ns);
        let step = execute(&packet, index, res, self.id, self.priority, self.time_slice);
        if let (Some(t0), Ok(s)) = (t0, &step) {
            let end = matches!(s, Step::Done).then(userq_uapi::layout::monotonic_ns);
            self.profile_packet(index, &packet, res, t0, end);
        }
        match step {
            Ok(Step::Done) => self.completed = index + 1,
            Ok(Step::Dispatch(job)) => {
                self.state = RunState::Dispatching {
                    job: job.clone(),
                    packet_index: index,
                };
                return Some(Outcome::Dispatched(job));
            }
            Ok(Step::Park(wait)) => {
                wait.fence.waiters().line.firmware.fetch_add(1, SeqCst);
                self.state = RunState::Parked(wait);
                self.publish();
                // The condition may have become true between the check and the
                // registration above: look once more now that host signallers will
                // see the registration.
                return Some(self.try_unpark().unwrap_or(Outcome::Parked));
            }
            Err(f) => return Some(self.fault(f)),
        }
        None
    }
}
