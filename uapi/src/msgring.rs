//! DOC: the kmd↔firmware message rings' protocol (the layout is
//! [`crate::layout::MsgRing`]).
//!
//! Each ring has one producer and one consumer, each a single thread of one party. The
//! producer copies a 64-byte message into the slot at `tail` and then publishes `tail + 1`
//! (release); the consumer reads `tail` (acquire), copies the message out once, and then
//! publishes `head + 1` (release), which gives the slot back. A consumer that sees `tail`
//! more than a ring ahead of `head` (a corrupted peer) treats the ring as empty rather than
//! reading garbage.

use crate::layout::{MsgRing, CONTROL_RING_ENTRIES};

impl MsgRing {
    /// Producer side: copies `msg` into the next slot and publishes it (release). Returns
    /// `false` if the ring is full. Only one thread of one party may produce.
    #[inline]
    pub fn push(&self, msg: &[u64; 8]) -> bool {
        use core::sync::atomic::Ordering::{Acquire, Relaxed, Release};
        let tail = self.tail.value.load(Relaxed);
        let head = self.head.value.load(Acquire);
        if tail.wrapping_sub(head) >= CONTROL_RING_ENTRIES as u64 {
            return false;
        }
        let slot = &self.slots[tail as usize % CONTROL_RING_ENTRIES];
        for (w, v) in slot.iter().zip(msg) {
            w.store(*v, Relaxed);
        }
        self.tail.value.store(tail + 1, Release);
        true
    }

    /// Consumer side: copies the oldest message out once and frees its slot. Only one
    /// thread of one party may consume.
    #[inline]
    pub fn pop(&self) -> Option<[u64; 8]> {
        use core::sync::atomic::Ordering::{Acquire, Relaxed, Release};
        let head = self.head.value.load(Relaxed);
        let tail = self.tail.value.load(Acquire);
        if tail == head || tail.wrapping_sub(head) > CONTROL_RING_ENTRIES as u64 {
            return None;
        }
        let slot = &self.slots[head as usize % CONTROL_RING_ENTRIES];
        let mut out = [0u64; 8];
        for (o, w) in out.iter_mut().zip(slot) {
            *o = w.load(Relaxed);
        }
        self.head.value.store(head + 1, Release);
        Some(out)
    }

    /// Whether a message is waiting (consumer side, acquire).
    #[inline]
    pub fn has_message(&self) -> bool {
        use core::sync::atomic::Ordering::{Acquire, Relaxed};
        self.tail.value.load(Acquire) != self.head.value.load(Relaxed)
    }
}
