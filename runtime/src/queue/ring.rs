//! DOC: the producer's side of a queue's ring: back-pressure (the cached read index, and
//! the wait when the ring is full), writing a packet into its slot tag last, and the
//! doorbell (the polled fast path, else the write index, the pending bits and the wake).

use super::{Queue, QueueStatus};
use crate::error::SubmitError;
use std::sync::atomic::{compiler_fence, Ordering::*};
use std::time::{Duration, Instant};
use userq_uapi::packet::Packet;
use userq_uapi::shm::RingShm;
use userq_uapi::sync;
use userq_uapi::sync::{Backoff, BackoffStep};

impl Queue {
    /// The read index the firmware must have reached for `n` more packets to fit: their
    /// slots last held the packets before it.
    #[inline(always)]
    pub(super) fn read_index_needed(&self, n: u64) -> u64 {
        (self.wptr + n).saturating_sub(self.ring.entries())
    }

    /// Makes room for `n` packets.
    pub(super) fn reserve(&mut self, n: usize, timeout: Duration) -> Result<(), SubmitError> {
        let entries = self.ring.entries();
        if n as u64 > entries {
            return Err(SubmitError::BatchTooLarge { batch: n, entries });
        }
        let need = self.read_index_needed(n as u64);
        if self.cached_rptr >= need {
            return Ok(()); // fast path: the cached index says there is room
        }
        let deadline = Instant::now().checked_add(timeout);
        let mut backoff = Backoff::new(Duration::from_micros(20), Duration::from_micros(100));
        loop {
            if self.refresh_read_index() >= need {
                return Ok(());
            }
            match self.status() {
                QueueStatus::Faulted(f) => return Err(SubmitError::stopped(f)),
                QueueStatus::Destroyed => return Err(SubmitError::DeviceLost),
                QueueStatus::Active => {}
            }
            if self.dev.is_lost() {
                return Err(SubmitError::DeviceLost);
            }
            let left = match deadline {
                None => Duration::from_millis(100),
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(l) if !l.is_zero() => l.min(Duration::from_millis(100)),
                    _ if timeout.is_zero() => return Err(SubmitError::WouldBlock),
                    _ => return Err(SubmitError::Timeout),
                },
            };
            if backoff.step() != BackoffStep::Sleep {
                continue;
            }
            // Block on the timeline's wake word: the firmware bumps it on every completion
            // and when it parks the queue (consuming a packet without completing it), which
            // are the moments the read index can move.
            let ring = &self.ring;
            let still_full = || ring.header().read_index.value.load(Acquire) < need;
            self.timeline.sleep_until_woken(still_full, left);
            // Woken, most often because room appeared: the next turn takes it without the
            // connection check, which is a syscall (see `wait::wait_many`).
            if !still_full() {
                continue;
            }
            if self.timeline.device_gone() {
                return Err(SubmitError::DeviceLost);
            }
        }
    }

    /// Re-reads the ring's read index into the cache.
    fn refresh_read_index(&mut self) -> u64 {
        // Acquire: pairs with the firmware's release store after copying the packets out,
        // so their slots may be overwritten now.
        let r = self.ring.header().read_index.value.load(Acquire);
        // Beyond the write index only a corrupted ring (or a firmware bug) shows this.
        self.cached_rptr = r.min(self.wptr);
        self.cached_rptr
    }

    /// Writes one packet at the write index (room is reserved): its submit time into its
    /// profiling record if the queue has one, then the slot ([`Queue::write_slot`]).
    #[inline]
    pub(super) fn write(&mut self, p: Packet) {
        if let Some(prof) = &self.profile {
            use userq_uapi::layout::profile::{profile_record_offset, word};
            let at =
                profile_record_offset(self.ring.entries() as u32, self.wptr) + 8 * word::SUBMIT;
            if let Some(w) = prof.word64(at) {
                w.store(userq_uapi::layout::monotonic_ns(), Relaxed);
            }
        }
        self.write_slot(p);
    }

    /// Writes packet `p` into the next slot: the arguments first, then word 0 with the
    /// packet's sequence tag (release), so that a firmware polling the slot sees the whole
    /// packet once it sees the tag; then advances `wptr`.
    #[inline(always)]
    pub(super) fn write_slot(&mut self, p: Packet) {
        put(&self.ring, self.wptr, p);
        self.wptr += 1;
    }

    /// Rings the doorbell: on a polled queue the packets' sequence tags are the whole
    /// doorbell; otherwise publishes the write index and takes the doorbell protocol.
    #[inline(always)]
    pub(super) fn ring_doorbell(&mut self) {
        // The flag load must stay after the slot stores in the instruction stream: the
        // firmware's membarrier orders the two only as the program orders them.
        compiler_fence(SeqCst);
        // Fast path: the firmware polls this queue's next slot for its sequence tag, so the
        // tagged word-0 stores in `write_slot` are the doorbell, and the write-index line
        // is not written (the firmware reads it while idle-polling: a store would cost it
        // a miss every round trip). A stale "polled" is safe: the firmware clears the
        // flag, then makes every registered thread run a full barrier (membarrier), then
        // looks at the tags once more.
        if self.dev.fast_doorbell && self.ring.header().poll.polled.load(Relaxed) != 0 {
            return;
        }
        self.ring_doorbell_slow();
    }

    /// The doorbell protocol for a queue the firmware is not polling (see
    /// [`Queue::ring_doorbell`]): out of line, so the polled submit saves no registers.
    #[inline(never)]
    fn ring_doorbell_slow(&mut self) {
        let page = &*self.dev.doorbells;
        let slot = self.slot as usize;
        // Release: the packet stores (`write_slot` or `put`, before the call) happen-before the
        // firmware's acquire load.
        page.doorbells[slot].value.store(self.wptr, Release);
        let rung = sync::ring_doorbell(
            (&page.pending.words[slot / 64], 1 << (slot % 64)),
            sync::context_bit(&self.dev.kick.contexts, self.dev.ctx),
            (
                &self.dev.status.sleep.sleeping,
                &self.dev.status.sleep.word_before,
            ),
            &self.dev.kick.kick.word,
            &mut self.woken_sleep,
        );
        if let sync::Doorbell::Woke(woken) = rung {
            self.wakes += 1;
            // The firmware really slept: this work's completion is a wake-up away.
            if woken > 0 {
                self.timeline.inner.note_cold_submit(self.wptr);
            }
        }
    }
}

/// Writes packet `p` into slot `index` of `ring` (room is reserved): the arguments first,
/// then word 0 with the packet's sequence tag (release), so that a firmware polling the
/// slot sees the whole packet once it sees the tag.
#[inline(always)]
pub(super) fn put(ring: &RingShm, index: u64, p: Packet) {
    let slot = ring.slot(index);
    let words = p.tagged(index).to_words();
    for (w, v) in slot[1..].iter().zip(&words[1..]) {
        w.store(*v, Relaxed);
    }
    slot[0].store(words[0], Release);
}
