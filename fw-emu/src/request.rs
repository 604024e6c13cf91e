//! DOC: kmd-shim's requests, one method each.
//!
//! [`Firmware::process_requests`] drains the `to_fw` ring: each request is decoded once and
//! applied, and acknowledged with its status, at once. The exception is a suspend whose
//! workgroups are still on the engines: its ack waits (a bounded time, see
//! [`crate::suspend`]) until they have left. Objects a request names were sent on the
//! object channel before the request; a refused request still takes its objects off the
//! channel, so none is left behind.

use crate::context::Context;
use crate::fence::{Binding, FenceObject};
use crate::queue::Queue;
use crate::{Firmware, QueueId};
use rustix::fd::AsFd;
use std::rc::Rc;
use std::sync::atomic::Ordering::*;
use std::time::Duration;
use userq_uapi::error::ErrorCode;
use userq_uapi::fwmsg::{FenceId, FwRequest, FwStatus, ObjectId};
use userq_uapi::ioctl::Priority;
use userq_uapi::layout::{
    ContextWaiters, DoorbellPage, FenceKind, FenceState, FenceWaiters, MAX_QUEUES_PER_CONTEXT,
    MAX_RING_ENTRIES, MIN_RING_ENTRIES, WAITER_SLOTS,
};
use userq_uapi::packet::FenceHandle;
use userq_uapi::shm::{Layout, RingShm, Shm, ShmBytes};
use userq_uapi::sync;

impl Firmware {
    /// Applies every waiting request. Returns whether there was one.
    pub(crate) fn process_requests(&mut self) -> bool {
        let mut any = false;
        while let Some(w) = self.control.next_request() {
            any = true;
            let (seq, status) = match FwRequest::decode(&w) {
                Ok((seq, FwRequest::Suspend { ctx, slot })) => match self.suspend(seq, ctx, slot) {
                    Some(status) => (seq, status),
                    None => continue, // acknowledged once its workgroups have left
                },
                Ok((seq, FwRequest::Resume { ctx, slot })) => (seq, self.resume(ctx, slot)),
                Ok((seq, FwRequest::Invalidate { ctx, va, count })) => {
                    match self.invalidate(seq, ctx, va, count) {
                        Some(status) => (seq, status),
                        None => continue, // acknowledged once the pins have drained
                    }
                }
                Ok((
                    seq,
                    FwRequest::WaitJobs {
                        ctx,
                        va,
                        timeout_ms,
                    },
                )) => match self.wait_jobs(seq, ctx, va, timeout_ms) {
                    Some(status) => (seq, status),
                    None => continue, // acknowledged once the jobs finished, or timed out
                },
                Ok((seq, req)) => (seq, self.apply(req)),
                Err(e) => ((w[0] >> 32) as u32, e),
            };
            self.control.ack(seq, status);
            if self.shutdown {
                break;
            }
        }
        if any {
            // A reset, a destroy or an unmap may have ended a job that waited for a fault's
            // reply: the published count goes down now, not at the next tick.
            self.prune_faults();
        }
        any
    }

    fn apply(&mut self, req: FwRequest) -> FwStatus {
        match req {
            FwRequest::MapContext {
                ctx,
                doorbell,
                waiters,
                row,
            } => self.map_context(ctx, doorbell, waiters, row),
            FwRequest::UnmapContext { ctx } => self.unmap_context(ctx),
            FwRequest::MapQueue {
                ctx,
                slot,
                ring,
                entries,
                priority,
                timeline,
                time_slice_us,
            } => self.map_queue(
                QueueId { ctx, slot },
                ring,
                entries,
                priority,
                timeline,
                time_slice_us,
            ),
            FwRequest::UnmapQueue { ctx, slot } => self.unmap_queue(QueueId { ctx, slot }),
            FwRequest::RegisterFence {
                fence,
                state,
                waiters,
            } => self.register_fence(fence, state, waiters),
            FwRequest::BindFence {
                ctx,
                handle,
                fence,
                writable,
                waiter_slot,
            } => self.bind_fence(ctx, handle, fence, writable, waiter_slot),
            FwRequest::UnbindFence { ctx, handle } => {
                match self
                    .contexts
                    .get_mut(ctx)
                    .map(|c| c.bindings.remove(&handle))
                {
                    Some(Some(b)) => {
                        b.fence.remove_holder(ctx, b.waiter_slot);
                        FwStatus::Ok
                    }
                    _ => FwStatus::NotFound,
                }
            }
            FwRequest::PoisonFence { fence, code } => match self.fences.get(&fence) {
                Some(f) => {
                    sync::poison_fence(f.state(), f.waiters(), code, 0, 0, 0);
                    FwStatus::Ok
                }
                None => FwStatus::NotFound,
            },
            // Parked queues and bindings hold their own references; the mapping goes when
            // the last one does.
            FwRequest::DropFence { fence } => match self.fences.remove(&fence) {
                Some(_) => FwStatus::Ok,
                None => FwStatus::NotFound,
            },
            FwRequest::MapBuffer {
                ctx,
                va,
                size,
                object,
            } => self.map_buffer(ctx, va, size, object),
            FwRequest::UnmapBuffer { ctx, va } => self.unmap_buffer(ctx, va),
            FwRequest::MapProfile { ctx, slot, object } => self.map_profile(ctx, slot, object),
            FwRequest::MapOnDemand { ctx, va, size } => self.map_on_demand(ctx, va, size),
            FwRequest::MapPages {
                ctx,
                va,
                slot,
                count,
            } => self.map_pages(ctx, va, slot, count),
            FwRequest::FaultReply {
                ctx,
                slot,
                job,
                code,
                address,
            } => self.fault_reply(QueueId { ctx, slot }, job, code, address),
            FwRequest::Shutdown => {
                self.shutdown = true;
                FwStatus::Ok
            }
            FwRequest::SetWatchdog {
                ctx,
                slot,
                watchdog,
            } => self.set_watchdog(QueueId { ctx, slot }, watchdog),
            FwRequest::ResetQueue {
                ctx,
                slot,
                code,
                detail,
                job,
                ..
            } => self.reset_queue(QueueId { ctx, slot }, code, detail, job),
            FwRequest::BanContext { ctx } => self.ban_context(ctx),
            FwRequest::Sync => FwStatus::Ok,
            // Handled in `process_requests` (their ack may be deferred).
            FwRequest::Suspend { .. }
            | FwRequest::Resume { .. }
            | FwRequest::Invalidate { .. }
            | FwRequest::WaitJobs { .. } => FwStatus::Malformed,
        }
    }

    /// Takes object `id` off the channel and maps it as a `T`.
    fn map_object<T: Layout>(&mut self, id: ObjectId) -> Result<Shm<T>, FwStatus> {
        let fd = self.channel.take(id, false).ok_or(FwStatus::BadObject)?;
        Shm::map(fd.as_fd()).map_err(|_| FwStatus::BadObject)
    }

    fn map_context(
        &mut self,
        ctx: u32,
        doorbell: ObjectId,
        waiters: ObjectId,
        row: u32,
    ) -> FwStatus {
        if self.contexts.contains(ctx) || row as usize >= userq_uapi::layout::TELEMETRY_CONTEXTS {
            self.channel.discard(doorbell);
            self.channel.discard(waiters);
            return FwStatus::Exists;
        }
        let page = self.map_object::<DoorbellPage>(doorbell);
        let counts = self.map_object::<ContextWaiters>(waiters);
        match (page, counts) {
            (Ok(page), Ok(counts)) => {
                let mut c = Context::new(ctx, page, counts);
                c.row = row;
                self.contexts.insert(c);
                FwStatus::Ok
            }
            (Err(e), _) | (_, Err(e)) => e,
        }
    }

    fn unmap_context(&mut self, ctx: u32) -> FwStatus {
        let ids: Vec<QueueId> = match self.contexts.get_mut(ctx) {
            Some(c) => c.queue_ids().collect(),
            None => return FwStatus::NotFound,
        };
        for id in ids {
            self.poison_pending_signals(id, ErrorCode::OwnerDied);
        }
        let Some(mut c) = self.contexts.remove(ctx) else {
            return FwStatus::NotFound;
        };
        // Cancelled workgroups may still be on engines: from the ack on, kmd-shim reuses
        // the context's pool slots, so its windows point at scratch first.
        let mut scratch = true;
        for (_, w) in c.vm.windows() {
            scratch &= w.unmap(0, w.page_count(), crate::window::state::FREED);
        }
        for q in c.queues.iter_mut().filter_map(Option::take) {
            q.destroy(ErrorCode::OwnerDied);
        }
        // Its waiters are gone: signals no longer look at its counts.
        for b in c.bindings.values() {
            b.fence.remove_holder(ctx, b.waiter_slot);
        }
        self.sched.forget(ctx, None);
        self.destroyed_ns.remove(&ctx);
        // The context is gone either way; an unmap the kernel refused leaves its pool
        // slots mapped, which kmd-shim must hear so that it keeps them.
        if scratch {
            FwStatus::Ok
        } else {
            FwStatus::BadObject
        }
    }

    fn map_queue(
        &mut self,
        id: QueueId,
        ring: ObjectId,
        entries: u32,
        priority: Priority,
        timeline: FenceId,
        time_slice_us: u32,
    ) -> FwStatus {
        let valid = entries.is_power_of_two()
            && (MIN_RING_ENTRIES..=MAX_RING_ENTRIES).contains(&entries)
            && (id.slot as usize) < MAX_QUEUES_PER_CONTEXT;
        let (Some(c), Some(t), true) = (
            self.contexts.get_mut(id.ctx),
            self.fences.get(&timeline),
            valid,
        ) else {
            self.channel.discard(ring);
            return FwStatus::NotFound;
        };
        if c.queues[id.slot as usize].is_some() {
            self.channel.discard(ring);
            return FwStatus::Exists;
        }
        let Some(fd) = self.channel.take(ring, false) else {
            return FwStatus::BadObject;
        };
        // Checks the entry count in the ring's header too.
        let Ok(map) = RingShm::map(fd.as_fd(), entries) else {
            return FwStatus::BadObject;
        };
        // A slot may have served an earlier queue: its doorbell and pending bit start clean
        // (the client gets the queue only after this request's ack).
        let page = &*c.doorbell;
        page.doorbells[id.slot as usize].value.store(0, Relaxed);
        page.pending.words[id.slot as usize / 64].fetch_and(!(1u64 << (id.slot % 64)), Relaxed);
        let mut q = Queue::new(
            id,
            map,
            priority,
            (time_slice_us > 0).then(|| Duration::from_micros(time_slice_us as u64)),
            t.clone(),
        );
        if c.suspended {
            q.set_suspended(true);
        }
        c.queues[id.slot as usize] = Some(q);
        FwStatus::Ok
    }

    fn unmap_queue(&mut self, id: QueueId) -> FwStatus {
        self.poison_pending_signals(id, ErrorCode::QueueDestroyed);
        let q = self
            .contexts
            .get_mut(id.ctx)
            .and_then(|c| c.queues.get_mut(id.slot as usize))
            .and_then(Option::take);
        match q {
            Some(q) => {
                *self.destroyed_ns.entry(id.ctx).or_default() += q.figures().engine_ns;
                q.destroy(ErrorCode::QueueDestroyed);
                self.sched.forget(id.ctx, Some(id.slot));
                FwStatus::Ok
            }
            None => FwStatus::NotFound,
        }
    }

    fn register_fence(&mut self, fence: FenceId, state: ObjectId, waiters: ObjectId) -> FwStatus {
        if self.fences.contains_key(&fence) {
            self.channel.discard(state);
            self.channel.discard(waiters);
            return FwStatus::Exists;
        }
        let s = self.map_object::<FenceState>(state);
        let w = self.map_object::<FenceWaiters>(waiters);
        let (Ok(s), Ok(w)) = (s, w) else {
            return FwStatus::BadObject;
        };
        let kind = s.header.param.load(Relaxed);
        if FenceKind::from_u32(kind).is_none() {
            return FwStatus::BadObject;
        }
        self.fences
            .insert(fence, Rc::new(FenceObject::new(fence, s, w)));
        FwStatus::Ok
    }

    fn bind_fence(
        &mut self,
        ctx: u32,
        handle: FenceHandle,
        fence: FenceId,
        writable: bool,
        waiter_slot: u32,
    ) -> FwStatus {
        let (Some(c), Some(f)) = (self.contexts.get_mut(ctx), self.fences.get(&fence)) else {
            return FwStatus::NotFound;
        };
        if c.bindings.contains_key(&handle) {
            return FwStatus::Exists;
        }
        if waiter_slot as usize >= WAITER_SLOTS {
            return FwStatus::Malformed;
        }
        f.add_holder(ctx, waiter_slot, c.waiters.clone());
        c.bindings.insert(
            handle,
            Binding {
                fence: f.clone(),
                writable,
                waiter_slot,
            },
        );
        FwStatus::Ok
    }

    fn map_profile(&mut self, ctx: u32, slot: u32, object: ObjectId) -> FwStatus {
        let Some(fd) = self.channel.take(object, false) else {
            return FwStatus::BadObject;
        };
        let Some(q) = self.contexts.queue_mut(QueueId { ctx, slot }) else {
            return FwStatus::NotFound;
        };
        let size = userq_uapi::layout::profile::profile_object_size(q.entries() as u32);
        match ShmBytes::map_resident(fd.as_fd(), size) {
            Ok(p) => {
                q.set_profile(p);
                FwStatus::Ok
            }
            Err(_) => FwStatus::BadObject,
        }
    }

    fn map_buffer(&mut self, ctx: u32, va: u64, size: u64, object: ObjectId) -> FwStatus {
        let Some(c) = self.contexts.get_mut(ctx) else {
            self.channel.discard(object);
            return FwStatus::NotFound;
        };
        let Some(fd) = self.channel.take(object, false) else {
            return FwStatus::BadObject;
        };
        let Ok(len) = usize::try_from(size) else {
            return FwStatus::BadObject;
        };
        match ShmBytes::map(fd.as_fd(), len) {
            Ok(map) => {
                if c.vm.map(va, size, map) {
                    FwStatus::Ok
                } else {
                    FwStatus::Exists
                }
            }
            Err(_) => FwStatus::BadObject,
        }
    }
}
