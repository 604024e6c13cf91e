//! DOC: contexts: OPEN_CONTEXT, and reclaim when the connection closes.
//!
//! A context is one connection's share of the device: its doorbell page, its queues, its
//! handles on fences and its buffer mappings in its own device address space. It lives
//! exactly as long as the connection. OPEN_CONTEXT reserves an id under the table lock (a
//! `ContextReservation`), has the firmware map the doorbell page, and hands the client
//! the doorbell page, a read-only descriptor of the device status and the device kick.
//!
//! When the connection closes, however the client ended, [`Device::close_context`] has the
//! firmware unmap the context (it destroys the queues, poisoning their timelines with
//! `OwnerDied`, drops the bindings and unmaps the VM), returns the context's ring and buffer
//! bytes to the budget, drops its fence holds (the firmware forgets fences nobody holds any
//! more), and poisons the user fences it owned that others still hold.

use crate::buffer::BufferRecord;
use crate::device::Device;
use crate::queue::QueueRecord;
use rustix::fd::{AsFd, OwnedFd};
use std::collections::HashMap;
use userq_uapi::error::ErrorCode;
use userq_uapi::fwmsg::{FenceId, FwRequest};
use userq_uapi::ioctl::OpenContextReply;
use userq_uapi::layout::{ContextWaiters, DoorbellPage, EventKind, WaiterSlot, WAITER_SLOTS};
use userq_uapi::packet::FenceHandle;
use userq_uapi::shm::{Sealing, Shm};
use userq_uapi::KmdStatus;

/// Requests a closing context's fences post before waiting for their acks: half the
/// `to_fw` ring, so the batch never waits for room behind itself.
const CLOSE_BATCH: usize = userq_uapi::layout::CONTROL_RING_ENTRIES / 2;

/// What a context holds, as kmd-shim records it.
#[derive(Default)]
pub(crate) struct ContextRecord {
    /// Queues by slot, reserved ones included.
    pub(crate) queues: HashMap<u32, QueueRecord>,
    /// The fences the context holds, by its handles on them.
    pub(crate) handles: HashMap<FenceHandle, Hold>,
    /// The handle on each fence it holds (one a fence): what a repeat import returns.
    pub(crate) by_fence: HashMap<FenceId, FenceHandle>,
    /// Its waiter counts ([`ContextWaiters`]), one slot per fence held: kmd-shim's mapping,
    /// to zero a slot given back.
    pub(crate) waiters: Option<Shm<ContextWaiters>>,
    /// Waiter slots given back, to reuse first.
    pub(crate) free_slots: Vec<u32>,
    /// The next never-used waiter slot.
    pub(crate) next_slot: u32,
    /// The next handle to give out: handles are never reused within a context.
    pub(crate) next_handle: u32,
    /// Buffers by device address, reserved ones included.
    pub(crate) buffers: HashMap<u64, BufferRecord>,
    /// Where the next buffer goes in the VM: from `VA_BASE` up, 64 KiB-aligned.
    pub(crate) next_va: u64,
    /// Its hangs, the resets it suffered, whether it is banned.
    pub(crate) resets: crate::reset::ResetRecord,
    /// The device generation it was opened on.
    pub(crate) generation: u64,
    /// Its row in the telemetry tables.
    pub(crate) row: u32,
    /// The process that opened it.
    pub(crate) pid: u32,
}

/// One handle of a context on a fence.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Hold {
    /// The fence.
    pub(crate) fence: FenceId,
    /// Where the context registers its waiters on it.
    pub(crate) waiter: WaiterSlot,
    /// How many times the context was given this handle: its creation or first import,
    /// plus each import of a fence it already held (one handle a fence and context, as DRM
    /// PRIME gives one GEM handle per buffer). RELEASE_FENCE takes one; the last one
    /// unbinds.
    pub(crate) refs: u32,
}

impl ContextRecord {
    /// A waiter slot for a new handle.
    pub(crate) fn take_slot(&mut self) -> Option<u32> {
        if let Some(s) = self.free_slots.pop() {
            return Some(s);
        }
        let s = self.next_slot;
        if s as usize >= WAITER_SLOTS {
            return None;
        }
        self.next_slot += 1;
        Some(s)
    }

    /// Gives a handle's waiter slot back (its count is zero: the hold's release took it).
    pub(crate) fn give_slot(&mut self, slot: u32) {
        self.free_slots.push(slot);
    }
}

/// A context id reserved in the table, with an empty record. Until
/// [`ContextReservation::commit`], dropping it removes the record.
struct ContextReservation<'a> {
    dev: &'a Device,
    ctx: u32,
    armed: bool,
}

impl ContextReservation<'_> {
    /// Keeps the context: the connection owns it from now on.
    fn commit(mut self) {
        self.armed = false;
    }
}

impl Drop for ContextReservation<'_> {
    fn drop(&mut self) {
        if self.armed {
            let mut t = self.dev.table();
            if let Some(c) = t.contexts.remove(&self.ctx) {
                t.telemetry_rows[c.row as usize] = false;
            }
        }
    }
}

impl Device {
    /// Reserves a context id and an empty record for it.
    fn reserve_context(
        &self,
        generation: u64,
        pid: u32,
    ) -> Result<ContextReservation<'_>, KmdStatus> {
        let mut t = self.table();
        if t.contexts.len() >= self.limits.max_contexts {
            return Err(KmdStatus::LimitExceeded);
        }
        let row = t
            .telemetry_rows
            .iter()
            .position(|used| !used)
            .ok_or(KmdStatus::LimitExceeded)?;
        t.telemetry_rows[row] = true;
        // Skip ids still in use (after wrapping around u32).
        let mut ctx = t.next_ctx;
        while ctx == 0 || t.contexts.contains_key(&ctx) {
            ctx = ctx.wrapping_add(1);
        }
        t.next_ctx = ctx.wrapping_add(1);
        t.contexts.insert(
            ctx,
            ContextRecord {
                next_va: userq_uapi::VA_BASE,
                generation,
                row: row as u32,
                pid,
                ..ContextRecord::default()
            },
        );
        drop(t);
        Ok(ContextReservation {
            dev: self,
            ctx,
            armed: true,
        })
    }

    /// OPEN_CONTEXT: the reply, and the doorbell page (rw), the device status (ro), the
    /// device kick (rw) and the context's waiter counts (rw).
    pub fn open_context(&self, pid: u32) -> Result<(OpenContextReply, [OwnedFd; 4]), KmdStatus> {
        // One link for the whole call: the status and kick pages and the firmware that maps
        // the context are of one generation.
        let link = self.link();
        if link.is_lost() {
            return Err(KmdStatus::DeviceLost);
        }
        let generation = link.generation();
        let context = self.reserve_context(generation, pid)?;
        let ctx = context.ctx;
        let row = self.table().contexts.get(&ctx).map_or(0, |c| c.row);
        let (doorbell_fd, _doorbell) =
            Shm::<DoorbellPage>::create("userq-doorbell", Sealing::Final, 0, ctx as u64)
                .map_err(|_| KmdStatus::Internal)?;
        let (waiters_fd, waiters) =
            Shm::<ContextWaiters>::create("userq-waiters", Sealing::Final, 0, ctx as u64)
                .map_err(|_| KmdStatus::Internal)?;
        // Everything that can fail on this side first: once the firmware has mapped the
        // context, nothing but the reply remains.
        let status = link
            .status_fd_read_only()
            .try_clone_to_owned()
            .map_err(|_| KmdStatus::Internal)?;
        let kick = link
            .kick_fd()
            .try_clone_to_owned()
            .map_err(|_| KmdStatus::Internal)?;
        let (id, waiters_id) = (link.new_object_id(), link.new_object_id());
        link.call(
            FwRequest::MapContext {
                ctx,
                doorbell: id,
                waiters: waiters_id,
                row,
            },
            &[(id, doorbell_fd.as_fd()), (waiters_id, waiters_fd.as_fd())],
        )?;
        if let Some(c) = self.table().contexts.get_mut(&ctx) {
            c.waiters = Some(waiters);
        }
        context.commit();
        // Only a context that exists gets its telemetry line (a failed open leaves none).
        self.telemetry_open(row, ctx, pid);
        self.event(EventKind::ProcessStart, ctx, u32::MAX, [pid as u64, 0, 0]);
        Ok((
            OpenContextReply { ctx, generation },
            [doorbell_fd, status, kick, waiters_fd],
        ))
    }

    /// Reclaims everything a context owned: called when its connection closes, however
    /// the client ended.
    pub fn close_context(&self, ctx: u32) {
        // A context of a lost generation has nothing in the current firmware: only its
        // bookkeeping is returned.
        let current = self.is_current(ctx);
        if current {
            // Under the pager lock, so that no fault service maps into it meanwhile; its
            // on-demand buffers' slots go back once the firmware has let go of them.
            self.close_paging(ctx, || {
                self.link()
                    .call(FwRequest::UnmapContext { ctx }, &[])
                    .is_ok()
            });
        }
        let mut t = self.table();
        let Some(c) = t.contexts.remove(&ctx) else {
            return;
        };
        // Its telemetry lines are cleared before its row can go to another context.
        self.telemetry_close(c.row);
        t.telemetry_rows[c.row as usize] = false;
        self.events.record(userq_uapi::layout::NewEvent {
            kind: EventKind::ProcessEnd,
            ctx,
            slot: u32::MAX,
            pid: c.pid,
            a: c.pid as u64,
            b: 0,
            c: 0,
        });
        for b in c.buffers.values() {
            t.release_buffer(*b);
        }
        t.memory_used -= c.queues.values().map(|q| q.ring_bytes).sum::<u64>();
        // Its waiters come off the shared counts (the firmware dropped its own counts with
        // the context); its waiter slots go with the record.
        let unheld = t.release_holds(&c);
        let orphaned = t.user_fences_owned_by(ctx);
        drop(t);
        if !current {
            return;
        }
        // Posted in batches, each waited for as one: a context that held thousands of
        // fences is closed in a few round trips with the firmware, not one per fence.
        let reqs: Vec<FwRequest> = orphaned
            .into_iter()
            .map(|fence| FwRequest::PoisonFence {
                fence,
                code: ErrorCode::OwnerDied,
            })
            .chain(
                unheld
                    .into_iter()
                    .map(|fence| FwRequest::DropFence { fence }),
            )
            .collect();
        for batch in reqs.chunks(CLOSE_BATCH) {
            let _ = self.link().call_many(batch);
        }
    }
}
