//! DOC: client contexts as the firmware knows them, and the table of them.
//!
//! A context is a doorbell page, up to [`MAX_QUEUES_PER_CONTEXT`] queues by slot, the
//! fences it may name by handle, and its VM. Everything here is firmware-private; the
//! only client-writable memory referenced is the doorbell page and the rings, and those
//! are read as inputs to validate. [`Contexts`] is the one place a queue is looked up by
//! its [`QueueId`].

use crate::fence::Binding;
use crate::id::IdMap;
use crate::queue::Queue;
use crate::vm::Vm;
use crate::QueueId;
use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use userq_uapi::layout::{
    ContextWaiters, DoorbellPage, CONTEXT_SUMMARY_BITS, MAX_QUEUES_PER_CONTEXT,
};
use userq_uapi::packet::FenceHandle;
use userq_uapi::shm::Shm;

/// A client context.
#[derive(Debug)]
pub struct Context {
    /// The context id kmd-shim assigned.
    pub id: u32,
    /// The doorbell page (client-writable: every word is a hint).
    pub doorbell: Shm<DoorbellPage>,
    /// The context's waiter counts, one per fence it holds (client-writable; read when a
    /// fence it holds is signalled).
    pub waiters: Arc<Shm<ContextWaiters>>,
    /// Queues by slot; `queues.len() == MAX_QUEUES_PER_CONTEXT`.
    pub queues: Vec<Option<Queue>>,
    /// Fences this context may name.
    pub bindings: HashMap<FenceHandle, Binding>,
    /// Its VM.
    pub vm: Vm,
    /// The whole context is suspended (queues created meanwhile start suspended).
    pub suspended: bool,
    /// Its row in the telemetry tables (kmd-shim's choice).
    pub row: u32,
}

impl Context {
    /// A context with no queues, bindings or buffers.
    pub fn new(id: u32, doorbell: Shm<DoorbellPage>, waiters: Shm<ContextWaiters>) -> Self {
        Context {
            id,
            doorbell,
            waiters: Arc::new(waiters),
            queues: (0..MAX_QUEUES_PER_CONTEXT).map(|_| None).collect(),
            bindings: HashMap::new(),
            vm: Vm::default(),
            suspended: false,
            row: 0,
        }
    }

    /// The queue in `slot`, if there is one.
    pub fn queue_mut(&mut self, slot: u32) -> Option<&mut Queue> {
        self.queues.get_mut(slot as usize)?.as_mut()
    }

    /// Ids of the queues the context has.
    pub fn queue_ids(&self) -> impl Iterator<Item = QueueId> + '_ {
        self.queues.iter().flatten().map(|q| q.id)
    }
}

/// Every context the firmware serves, by id, and by their bit in the device's
/// [`userq_uapi::layout::ContextSummary`].
#[derive(Debug)]
pub struct Contexts {
    map: IdMap<u32, Context>,
    /// `buckets[b]`: the ids of the contexts whose summary bit is `b`.
    buckets: Vec<Vec<u32>>,
}

impl Default for Contexts {
    fn default() -> Self {
        Contexts {
            map: IdMap::default(),
            buckets: vec![Vec::new(); CONTEXT_SUMMARY_BITS],
        }
    }
}

impl Contexts {
    /// Whether context `ctx` exists.
    pub fn contains(&self, ctx: u32) -> bool {
        self.map.contains_key(&ctx)
    }

    /// Adds a context (its id must be new).
    pub fn insert(&mut self, c: Context) {
        self.buckets[c.id as usize % CONTEXT_SUMMARY_BITS].push(c.id);
        self.map.insert(c.id, c);
    }

    /// Removes context `ctx`.
    pub fn remove(&mut self, ctx: u32) -> Option<Context> {
        let c = self.map.remove(&ctx)?;
        self.buckets[ctx as usize % CONTEXT_SUMMARY_BITS].retain(|&id| id != ctx);
        Some(c)
    }

    /// The ids of the contexts whose summary bit is `bit`.
    pub fn bucket(&self, bit: usize) -> &[u32] {
        self.buckets.get(bit).map_or(&[], Vec::as_slice)
    }

    /// Context `ctx`.
    pub fn get_mut(&mut self, ctx: u32) -> Option<&mut Context> {
        self.map.get_mut(&ctx)
    }

    /// Queue `id`, if its context and slot exist.
    pub fn queue(&self, id: QueueId) -> Option<&Queue> {
        self.map
            .get(&id.ctx)?
            .queues
            .get(id.slot as usize)?
            .as_ref()
    }

    /// Queue `id`, if its context and slot exist.
    pub fn queue_mut(&mut self, id: QueueId) -> Option<&mut Queue> {
        self.map.get_mut(&id.ctx)?.queue_mut(id.slot)
    }

    /// Queue `id` and its doorbell (the client's published write index), if both exist.
    pub fn queue_and_doorbell(&mut self, id: QueueId) -> Option<(&mut Queue, &AtomicU64)> {
        let c = self.map.get_mut(&id.ctx)?;
        let q = c.queues.get_mut(id.slot as usize)?.as_mut()?;
        Some((q, &c.doorbell.doorbells[id.slot as usize].value))
    }

    /// Every context.
    pub fn iter(&self) -> impl Iterator<Item = &Context> {
        self.map.values()
    }

    /// Every context, mutably.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Context> {
        self.map.values_mut()
    }

    /// How many contexts there are.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}
