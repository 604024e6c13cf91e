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
