//! DOC: the command processor's scheduler: which queues it looks at, and in what order.
//!
//! Three lists, owned here and changed nowhere else:
//!
//! - the **run list**: queues with (possibly) work, serviced round robin, a bounded number
//!   of packets per turn ([`Scheduler::run`]); a queue is on it at most once (the list
//!   keeps the set of its members beside the order);
//! - the **parked** list: queues stopped on a WAIT_FENCE, re-checked every loop turn and
//!   costing nothing else ([`Scheduler::check_parked`]);
//! - the **polled** list: queues whose next slot (and write index) the firmware polls on
//!   its own and runs at once (the doorbell fast path, [`Scheduler::run_polled`]), handed
//!   back to the doorbell protocol once idle for a tick (10 ms) or before the firmware
//!   sleeps ([`Scheduler::stop_polling`]).
//!
//! Queues get onto the run list from their doorbells' pending bits
//! ([`Scheduler::collect_doorbells`]), from polling, from an ended wait, from a completed
//! dispatch ([`Scheduler::complete`]) and on resume. What a service ends with (a fault, a
//! dispatch for the engines) goes back to the caller.

use crate::context::{Context, Contexts};
use crate::job::Job;
use crate::kernels::KernelLibrary;
use crate::queue::{Outcome, Queue, Resources};
use crate::QueueId;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering::*};
use std::sync::Arc;
use userq_uapi::layout::ContextSummary;
use userq_uapi::sync;

/// The run, parked and polled lists.
#[derive(Debug)]
pub struct Scheduler {
    run_list: RunList,
    parked: Vec<QueueId>,
    polled: Vec<QueueId>,
    /// Whether `membarrier(GLOBAL_EXPEDITED)` works here; without it no queue is polled.
    can_poll: bool,
}

impl Scheduler {
    /// Empty lists; polling only if the kernel has the membarrier it needs.
    pub fn new() -> Self {
        Scheduler {
            run_list: RunList::default(),
            parked: Vec::new(),
            polled: Vec::new(),
            can_poll: sync::firmware_barrier_available(),
        }
    }

    /// Puts a queue on the run list unless it is on it already; returns whether it was
    /// added.
    pub fn schedule(&mut self, q: &mut Queue) -> bool {
        self.run_list.push(q)
    }

    /// Whether a queue waits for its turn.
    pub fn has_runnable(&self) -> bool {
        !self.run_list.is_empty()
    }

    /// Drops every list entry of context `ctx` (or only of its queue `slot`).
    pub fn forget(&mut self, ctx: u32, slot: Option<u32>) {
        let gone = |id: &QueueId| id.ctx == ctx && slot.is_none_or(|s| s == id.slot);
        self.run_list.remove_where(gone);
        self.parked.retain(|id| !gone(id));
        self.polled.retain(|id| !gone(id));
    }

    /// Takes the device summary's set bits (swapping each non-zero word to zero), and for
    /// each, the pending-doorbell words of the contexts behind it; schedules the rung queues
    /// that can run. Idle contexts are never looked at. Returns whether any was scheduled.
    pub fn collect_doorbells(&mut self, contexts: &mut Contexts, summary: &ContextSummary) -> bool {
        let mut any = false;
        for (wi, word) in summary.words.iter().enumerate() {
            if word.load(Relaxed) == 0 {
                continue;
            }
            // Acquire: pairs with the client's fetch_or of this bit, which comes after its
            // queue's bit in its own page, so the loads below see that bit.
            let mut bits = word.swap(0, Acquire);
            while bits != 0 {
                let bit = wi * 64 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                for i in 0..contexts.bucket(bit).len() {
                    let ctx = contexts.bucket(bit)[i];
                    if let Some(c) = contexts.get_mut(ctx) {
                        any |= self.collect_context(c);
                    }
                }
            }
        }
        any
    }

    /// Takes every context's pending-doorbell words, whatever the device summary says, and
    /// schedules the rung queues that can run. Every client can write the summary (it
    /// shares the kick word's page), so one can clear another's bit before the firmware
    /// takes it; the pending words are each context's own. Run at every tick (every 10 ms
    /// awake) and after every wake-up that finds no work (the heartbeat's among them), and
    /// with [`Scheduler::doorbell_pending_anywhere`] in the last look before a sleep, this
    /// bounds how long an erased summary bit hides a doorbell. Returns whether any queue
    /// was scheduled.
    pub fn sweep_doorbells(&mut self, contexts: &mut Contexts) -> bool {
        let mut any = false;
        for c in contexts.iter_mut() {
            any |= self.collect_context(c);
        }
        any
    }

    /// Swaps a context's non-zero pending-doorbell words to zero and schedules the rung
    /// queues that can run.
    fn collect_context(&mut self, c: &mut Context) -> bool {
        let mut any = false;
        {
            let page = &*c.doorbell;
            for (wi, word) in page.pending.words.iter().enumerate() {
                if word.load(Relaxed) == 0 {
                    continue;
                }
                // Acquire: pairs with the client's release fetch_or after its doorbell.
                let mut bits = word.swap(0, Acquire);
                while bits != 0 {
                    let slot = wi * 64 + bits.trailing_zeros() as usize;
                    bits &= bits - 1;
                    match c.queues[slot].as_mut() {
                        Some(q) if q.is_active() => {
                            self.schedule(q);
                            any = true;
                        }
                        // Parked, stopped or no queue at all: the doorbell is a hint only.
                        _ => {}
                    }
                }
            }
        }
        any
    }

    /// Whether a context has a pending-doorbell bit set.
    pub fn doorbell_pending(summary: &ContextSummary) -> bool {
        summary.words.iter().any(|w| w.load(Relaxed) != 0)
    }

    /// Whether any context's own pending-doorbell words have a bit set, whatever the
    /// device summary says: the firmware's last look before it sleeps. A client sets its
    /// queue's bit before its fence and its look at the sleep flag, as it does the summary
    /// bit, so this look pairs with that fence the same way; and unlike the summary, no
    /// other client can clear it. One line per context.
    pub fn doorbell_pending_anywhere(contexts: &Contexts) -> bool {
        contexts.iter().any(|c| {
            c.doorbell
                .pending
                .words
                .iter()
                .any(|w| w.load(Relaxed) != 0)
        })
    }

    /// Runs each polled queue with unread packets at once, in place: one lookup, no trip
    /// through the run list, since this is the round trip's critical path. A queue that is
    /// on the run list already waits for its turn there, so no queue runs twice in a turn
    /// of the run list. A queue whose next slot is tagged runs through
    /// [`Queue::service_by_tag`], inlined here: no second look at its state or tag, and no
    /// call between the tag's load and the completion's store (ARCHITECTURE, "Where a
    /// round trip's time goes"). One whose doorbell moved runs through [`Queue::service`].
    /// Outcomes go to `out` as in [`Scheduler::run`]. Returns whether a queue ran.
    pub fn run_polled(
        &mut self,
        contexts: &mut Contexts,
        kernels: &KernelLibrary,
        budget: u32,
        mut out: impl FnMut(QueueId, &Outcome) -> bool,
    ) -> bool {
        let mut any = false;
        for i in 0..self.polled.len() {
            let id = self.polled[i];
            // A queue that is gone is skipped here; `stop_polling` drops its entry.
            let Some((q, db, res)) = lookup(contexts, id, kernels) else {
                continue;
            };
            if q.on_run_list {
                continue;
            }
            let outcome = if q.tagged_now() {
                q.service_by_tag(&res, budget)
            } else if q.is_active() && q.doorbell_moved(db) {
                q.service(db, &res, budget)
            } else {
                continue;
            };
            any = true;
            self.after_service(q, outcome, &mut out);
        }
        any
    }

    /// What a service ended with: more packets put the queue back on the run list, a
    /// wait parks it, faults and dispatches go to `out`. `out` returns whether it already
    /// ran the dispatch to completion (inline); then the packet completes here.
    fn after_service(
        &mut self,
        q: &mut Queue,
        outcome: Outcome,
        out: &mut impl FnMut(QueueId, &Outcome) -> bool,
    ) {
        match outcome {
            Outcome::Idle => {}
            Outcome::More => {
                self.schedule(q);
            }
            Outcome::Parked => self.park(q.id),
            Outcome::Faulted(_) => {
                out(q.id, &outcome);
            }
            Outcome::Dispatched(ref job) => {
                // Run already (by the command processor itself): the packet completes now,
                // and the queue takes its next turn on the run list.
                if out(q.id, &outcome) && q.finish_dispatch(job) {
                    self.schedule(q);
                }
            }
        }
    }

    /// Whether any queue is polled.
    pub fn polls_any(&self) -> bool {
        !self.polled.is_empty()
    }

    /// How many queues are polled.
    pub fn polled_count(&self) -> usize {
        self.polled.len()
    }

    /// Stops polling queues that ran nothing since the last call (or all of them; the
    /// firmware calls it every tick, 10 ms): clear their flags,
    /// barrier every registered client (membarrier), then look at each write index once
    /// more. Returns whether one of them had work.
    pub fn stop_polling(&mut self, contexts: &mut Contexts, all: bool) -> bool {
        let mut cooled = Vec::new();
        self.polled.retain(|&id| match contexts.queue_mut(id) {
            Some(q) => {
                let cool = all || q.went_idle();
                if cool {
                    q.set_polled(false);
                    cooled.push(id);
                }
                !cool
            }
            None => false,
        });
        if cooled.is_empty() {
            return false;
        }
        if !sync::barrier_on_registered_clients() {
            // Without the barrier no queue may stay polled.
            self.can_poll = false;
            for id in std::mem::take(&mut self.polled) {
                if let Some(q) = contexts.queue_mut(id) {
                    q.set_polled(false);
                    cooled.push(id);
                }
            }
        }
        let mut any = false;
        for id in cooled {
            if let Some((q, db)) = contexts.queue_and_doorbell(id) {
                if q.is_active() && q.has_unread(db) {
                    any |= self.schedule(q);
                }
            }
        }
        any
    }

    /// Continues the queues whose dispatches the engines completed.
    pub fn complete(&mut self, contexts: &mut Contexts, jobs: Vec<Arc<Job>>) -> bool {
        let any = !jobs.is_empty();
        for job in jobs {
            // The queue may have gone away meanwhile.
            if let Some(q) = contexts.queue_mut(job.queue) {
                if q.finish_dispatch(&job) {
                    self.schedule(q);
                }
            }
        }
        any
    }

    /// Puts a queue on the parked list (once).
    fn park(&mut self, id: QueueId) {
        if !self.parked.contains(&id) {
            self.parked.push(id);
        }
    }

    /// Re-checks parked queues: a satisfied wait puts its queue back on the run list; a
    /// poisoned one goes to `out` as a fault. Returns whether a wait ended.
    pub fn check_parked(
        &mut self,
        contexts: &mut Contexts,
        mut out: impl FnMut(QueueId, &Outcome),
    ) -> bool {
        let mut any = false;
        let mut i = 0;
        while i < self.parked.len() {
            let id = self.parked[i];
            let Some(q) = contexts.queue_mut(id) else {
                self.parked.swap_remove(i);
                continue;
            };
            match q.try_unpark() {
                None if q.is_parked() => i += 1,
                None => {
                    self.parked.swap_remove(i);
                }
                Some(outcome) => {
                    self.parked.swap_remove(i);
                    any = true;
                    match outcome {
                        Outcome::Faulted(_) => out(id, &outcome),
                        _ => {
                            self.schedule(q);
                        }
                    }
                }
            }
        }
        any
    }

    /// Whether a parked queue's wait can end now.
    pub fn parked_ready(&self, contexts: &Contexts) -> bool {
        self.parked
            .iter()
            .any(|&id| contexts.queue(id).is_some_and(Queue::parked_ready))
    }

    /// Gives each queue on the run list one turn of up to `budget` packets. Faults and
    /// dispatches go to `out`, which returns whether it ran the dispatch to completion
    /// itself (inline: then the packet completes at once). Returns whether a queue ran.
    pub fn run(
        &mut self,
        contexts: &mut Contexts,
        kernels: &KernelLibrary,
        budget: u32,
        mut out: impl FnMut(QueueId, &Outcome) -> bool,
    ) -> bool {
        let turns = self.run_list.len();
        let mut any = false;
        let mut newly_polled = Vec::new();
        for _ in 0..turns {
            let Some(id) = self.run_list.pop() else {
                break;
            };
            let Some((q, db, res)) = lookup(contexts, id, kernels) else {
                continue;
            };
            q.on_run_list = false;
            let outcome = q.service(db, &res, budget);
            any = true;
            if self.can_poll && !q.is_polled() && matches!(outcome, Outcome::Idle | Outcome::More) {
                q.set_polled(true);
                newly_polled.push(id);
            }
            self.after_service(q, outcome, &mut out);
        }
        self.polled.extend(newly_polled);
        any
    }
}

/// Queue `id`, its doorbell (the client's published write index) and what its packets run
/// with, in one lookup. `None`: the queue is gone.
#[inline(always)]
fn lookup<'c>(
    contexts: &'c mut Contexts,
    id: QueueId,
    kernels: &'c KernelLibrary,
) -> Option<(&'c mut Queue, &'c AtomicU64, Resources<'c>)> {
    let c = contexts.get_mut(id.ctx)?;
    let q = c.queues[id.slot as usize].as_mut()?;
    let db = &c.doorbell.doorbells[id.slot as usize].value;
    let res = Resources {
        bindings: &c.bindings,
        vm: &c.vm,
        kernels,
    };
    Some((q, db, res))
}

/// Queues with work, in turn order, each at most once (each queue's `on_run_list` says
/// whether it is here).
#[derive(Debug, Default)]
struct RunList {
    order: VecDeque<QueueId>,
}

impl RunList {
    /// Appends `q` unless it is listed already; returns whether it was added.
    #[inline]
    fn push(&mut self, q: &mut Queue) -> bool {
        if q.on_run_list {
            return false;
        }
        q.on_run_list = true;
        self.order.push_back(q.id);
        true
    }

    /// Takes the queue whose turn it is; the caller clears its `on_run_list`.
    #[inline]
    fn pop(&mut self) -> Option<QueueId> {
        self.order.pop_front()
    }

    fn len(&self) -> usize {
        self.order.len()
    }

    fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Drops entries of queues that are gone (their `on_run_list` goes with them).
    fn remove_where(&mut self, gone: impl Fn(&QueueId) -> bool) {
        self.order.retain(|id| !gone(id));
    }
}

impl Default for Scheduler {
    fn default() -> Self {
        Self::new()
    }
}
