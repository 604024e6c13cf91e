//! DOC: queues: CREATE_QUEUE, DESTROY_QUEUE, suspend and resume.
//!
//! A queue is a ring in a context's slot plus a timeline fence only the firmware signals.
//! CREATE_QUEUE reserves, in this order, a slot and its ring bytes in the budget (a
//! `QueueSlotReservation`), a timeline fence registered with the firmware, and the
//! context's hold on it (bound in the firmware), then creates the ring and has the firmware
//! map the queue. Should a step fail, the steps before it are undone latest first: unbind
//! and drop the hold (the firmware forgets the fence with it), free the slot and its bytes.
//!
//! DESTROY_QUEUE unmaps the queue in the firmware (which poisons its timeline for the values
//! it never reached) and returns the ring bytes; the timeline stays held by its handle until
//! the client releases it.

use crate::device::Device;
use rustix::fd::{AsFd, OwnedFd};
use userq_uapi::fwmsg::FwRequest;
use userq_uapi::ioctl::{CreateQueueReply, Priority, MAX_TIME_SLICE_US};
use userq_uapi::layout::EventKind;
use userq_uapi::layout::{
    ring_object_size, FenceKind, MAX_QUEUES_PER_CONTEXT, MAX_RING_ENTRIES, MIN_RING_ENTRIES,
};
use userq_uapi::os;
use userq_uapi::shm::RingShm;
use userq_uapi::watchdog::Watchdog;
use userq_uapi::KmdStatus;

/// A queue of a context, as kmd-shim records it.
#[derive(Debug, Clone)]
pub(crate) struct QueueRecord {
    /// Bytes of its ring (and profile object) charged to the budget.
    pub(crate) ring_bytes: u64,
    /// Its profile object, if profiling is on: kept to hand to tracers (PROFILE_FD).
    pub(crate) profile: Option<std::sync::Arc<OwnedFd>>,
}

/// A queue slot of a context and its ring bytes, reserved in the table. Until
/// [`QueueSlotReservation::commit`], dropping it frees the slot and returns the bytes.
struct QueueSlotReservation<'a> {
    dev: &'a Device,
    ctx: u32,
    slot: u32,
    ring_bytes: u64,
    armed: bool,
}

impl QueueSlotReservation<'_> {
    /// Keeps the slot: the queue exists now.
    fn commit(mut self) {
        self.armed = false;
    }
}

impl Drop for QueueSlotReservation<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut t = self.dev.table();
        t.memory_used -= self.ring_bytes;
        if let Some(c) = t.contexts.get_mut(&self.ctx) {
            c.queues.remove(&self.slot);
        }
    }
}

impl Device {
    /// Reserves the lowest free slot of `ctx` and `ring_bytes` of the budget.
    fn reserve_queue_slot(
        &self,
        ctx: u32,
        ring_bytes: u64,
    ) -> Result<QueueSlotReservation<'_>, KmdStatus> {
        let mut t = self.table();
        if t.memory_used + ring_bytes > self.limits.memory_budget {
            return Err(KmdStatus::OutOfMemory);
        }
        let c = t.contexts.get_mut(&ctx).ok_or(KmdStatus::NoContext)?;
        if c.queues.len() >= self.limits.max_queues_per_context {
            return Err(KmdStatus::LimitExceeded);
        }
        let slot = (0..MAX_QUEUES_PER_CONTEXT as u32)
            .find(|s| !c.queues.contains_key(s))
            .ok_or(KmdStatus::LimitExceeded)?;
        c.queues.insert(
            slot,
            QueueRecord {
                ring_bytes,
                profile: None,
            },
        );
        t.memory_used += ring_bytes;
        drop(t);
        Ok(QueueSlotReservation {
            dev: self,
            ctx,
            slot,
            ring_bytes,
            armed: true,
        })
    }

    /// CREATE_QUEUE: the reply, and the ring (rw), the timeline's state (ro) and its
    /// waiters (rw).
    pub fn create_queue(
        &self,
        ctx: u32,
        entries: u32,
        priority: Priority,
        time_slice_us: u32,
        watchdog: Watchdog,
        profile: bool,
    ) -> Result<(CreateQueueReply, Vec<OwnedFd>), KmdStatus> {
        if !entries.is_power_of_two()
            || !(MIN_RING_ENTRIES..=MAX_RING_ENTRIES).contains(&entries)
            || time_slice_us > MAX_TIME_SLICE_US
            || !watchdog.is_valid()
        {
            return Err(KmdStatus::InvalidArgument);
        }
        let profile_size = if profile {
            userq_uapi::layout::profile::profile_object_size(entries)
        } else {
            0
        };
        let ring_size = ring_object_size(entries) + profile_size;
        let queue_slot = self.reserve_queue_slot(ctx, ring_size as u64)?;
        let slot = queue_slot.slot;
        let (timeline, state_fd, waiters_fd) = self.register_fence(FenceKind::Timeline, ctx, 0)?;
        let hold = self.bind(ctx, timeline.fence)?;
        // From here on the hold keeps the fence: undoing it drops the fence too.
        let fence = timeline.commit();
        // Everything that can fail on this side first: once the firmware has mapped the
        // queue, only the commits remain.
        // The ring's memory is allocated here, all of it: a ring that does not fit is
        // refused now rather than faulting a process later.
        let (ring_fd, _ring) = RingShm::create(entries, slot).map_err(allocation_error)?;
        let state_ro = os::reopen_read_only(state_fd.as_fd()).map_err(|_| KmdStatus::Internal)?;
        let ring_id = self.link().new_object_id();
        self.link().call(
            FwRequest::MapQueue {
                ctx,
                slot,
                ring: ring_id,
                entries,
                priority,
                timeline: fence,
                time_slice_us,
            },
            &[(ring_id, ring_fd.as_fd())],
        )?;
        if watchdog != Watchdog::default() {
            let set = FwRequest::SetWatchdog {
                ctx,
                slot,
                watchdog,
            };
            if let Err(e) = self.link().call(set, &[]) {
                let _ = self.link().call(FwRequest::UnmapQueue { ctx, slot }, &[]);
                return Err(e);
            }
        }
        let profile_fd = if profile {
            match self.map_profile(ctx, slot, entries) {
                Ok(fd) => Some(fd),
                Err(e) => {
                    let _ = self.link().call(FwRequest::UnmapQueue { ctx, slot }, &[]);
                    return Err(e);
                }
            }
        } else {
            None
        };
        let waiter = hold.waiter;
        let handle = hold.commit();
        queue_slot.commit();
        let mut fds = vec![ring_fd, state_ro, waiters_fd];
        let kept = match profile_fd {
            Some(fd) => {
                let ours = fd.try_clone().ok().map(std::sync::Arc::new);
                fds.push(fd);
                ours
            }
            None => None,
        };
        let row = {
            let mut t = self.table();
            let c = t.contexts.get_mut(&ctx);
            let row = c.as_ref().map(|c| c.row);
            if let Some(q) = c.and_then(|c| c.queues.get_mut(&slot)) {
                q.profile = kept;
            }
            row
        };
        if let Some(row) = row {
            self.telemetry_queue(row, slot, true, priority as u32, profile);
        }
        self.event(EventKind::QueueCreated, ctx, slot, [priority as u64, 0, 0]);
        Ok((
            CreateQueueReply {
                slot,
                timeline: handle,
                fence,
                waiter,
            },
            fds,
        ))
    }

    /// Creates a queue's profile object and has the firmware write into it; returns the
    /// client's descriptor.
    fn map_profile(&self, ctx: u32, slot: u32, entries: u32) -> Result<OwnedFd, KmdStatus> {
        use userq_uapi::layout::profile::profile_object_size;
        let size = profile_object_size(entries);
        let fd = os::create_memfd(
            "userq-profile",
            size as u64,
            userq_uapi::shm::Sealing::Final,
        )
        .map_err(allocation_error)?;
        // Written on every packet by both sides while profiling is on: resident from now,
        // as the ring is (uapi's shm/ring.rs).
        os::commit(fd.as_fd(), size as u64).map_err(allocation_error)?;
        let map =
            userq_uapi::shm::ShmBytes::map(fd.as_fd(), size).map_err(|_| KmdStatus::Internal)?;
        // The header, as every object has one: magic, ABI, entries.
        let header = [
            userq_uapi::layout::magic::PROFILE,
            userq_uapi::ABI_VERSION,
            entries,
        ];
        for (i, v) in header.into_iter().enumerate() {
            if let Some(w) = map.word32(4 * i) {
                w.store(v, std::sync::atomic::Ordering::Relaxed);
            }
        }
        let id = self.link().new_object_id();
        self.link().call(
            FwRequest::MapProfile {
                ctx,
                slot,
                object: id,
            },
            &[(id, fd.as_fd())],
        )?;
        Ok(fd)
    }

    /// PROFILE_FD: a read-only descriptor of a queue's profile object.
    pub fn profile_fd(&self, ctx: u32, slot: u32) -> Result<OwnedFd, KmdStatus> {
        let fd = {
            let t = self.table();
            let q = t
                .contexts
                .get(&ctx)
                .and_then(|c| c.queues.get(&slot))
                .ok_or(KmdStatus::NotFound)?;
            q.profile.clone().ok_or(KmdStatus::NotFound)?
        };
        os::reopen_read_only(fd.as_fd()).map_err(|_| KmdStatus::Internal)
    }

    /// DESTROY_QUEUE. The timeline fence stays held by its handle until released.
    pub fn destroy_queue(&self, ctx: u32, slot: u32) -> Result<(), KmdStatus> {
        {
            let t = self.table();
            let c = t.contexts.get(&ctx).ok_or(KmdStatus::NoContext)?;
            if !c.queues.contains_key(&slot) {
                return Err(KmdStatus::NotFound);
            }
        }
        self.link().call(FwRequest::UnmapQueue { ctx, slot }, &[])?;
        let mut t = self.table();
        let row = t.contexts.get(&ctx).map(|c| c.row);
        if let Some(q) = t
            .contexts
            .get_mut(&ctx)
            .and_then(|c| c.queues.remove(&slot))
        {
            t.memory_used -= q.ring_bytes;
        }
        drop(t);
        if let Some(row) = row {
            self.telemetry_queue(row, slot, false, 0, false);
        }
        self.event(EventKind::QueueDestroyed, ctx, slot, [0; 3]);
        Ok(())
    }

    /// Suspends one queue (`slot`) or every queue of a context: when this returns, none of
    /// its packets runs and no workgroup of its dispatches is on an engine (the firmware
    /// acknowledges once running workgroups have yielded). The memory stays mapped.
    pub fn suspend(&self, ctx: u32, slot: Option<u32>) -> Result<(), KmdStatus> {
        self.link().call(FwRequest::Suspend { ctx, slot }, &[])
    }

    /// Undoes [`Device::suspend`].
    pub fn resume(&self, ctx: u32, slot: Option<u32>) -> Result<(), KmdStatus> {
        self.link().call(FwRequest::Resume { ctx, slot }, &[])
    }
}

/// What a failure to create or commit a shared object says to the client: out of memory
/// when the kernel had none to give, an internal error otherwise.
fn allocation_error(e: rustix::io::Errno) -> KmdStatus {
    match e {
        rustix::io::Errno::NOMEM | rustix::io::Errno::NOSPC => KmdStatus::OutOfMemory,
        _ => KmdStatus::Internal,
    }
}
