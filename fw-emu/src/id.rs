//! DOC: how the firmware names a queue.
//!
//! Contexts are numbered by kmd-shim; a queue is its context and its doorbell slot there.
//! Every list, job and report in the firmware names a queue by its [`QueueId`], and
//! [`crate::context::Contexts::queue_mut`] is the one lookup from the name to the queue.

/// A queue: its context and its doorbell slot there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct QueueId {
    /// The context id kmd-shim assigned.
    pub ctx: u32,
    /// The queue's doorbell slot in its context (`< MAX_QUEUES_PER_CONTEXT`).
    pub slot: u32,
}

/// A hasher for ids kmd-shim assigns (context ids): one multiplication (Fibonacci hashing).
/// The ids are small integers no client chooses, so the DoS-resistant default hash, which
/// costs tens of nanoseconds per lookup on the per-packet path, buys nothing here.
#[derive(Debug, Default, Clone, Copy)]
pub struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0.wrapping_mul(0x9e37_79b9_7f4a_7c15)
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }

    fn write_u32(&mut self, v: u32) {
        self.0 = (self.0 << 32) ^ u64::from(v);
    }

    fn write_u64(&mut self, v: u64) {
        self.0 ^= v;
    }
}

/// A map keyed by kmd-assigned ids.
pub type IdMap<K, V> = std::collections::HashMap<K, V, std::hash::BuildHasherDefault<IdHasher>>;
