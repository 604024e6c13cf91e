//! DOC: fences: CREATE_FENCE, IMPORT_FENCE, RELEASE_FENCE, holds, and poisoning.
//!
//! Every fence is two objects, its state (value, wake word, poison, error record) and its
//! waiters (see ARCHITECTURE.md, "Objects and their access"). kmd-shim creates both, keeps
//! a mapping of each (to poison the fence itself when the firmware is lost) and registers
//! the fence with the firmware under a device-wide id that is never reused.
//!
//! Ownership: a fence is *held* through handles; each context's handle is one hold. A user
//! fence is *owned* by the context that created it; when the owner goes away while others
//! still hold the fence, the fence is poisoned with [`ErrorCode::OwnerDied`] (waits that
//! were already satisfied still succeed). When the last hold goes, kmd-shim forgets the
//! fence and tells the firmware to forget it too.
//!
//! Creating a fence is two reservations, each a guard: the registration
//! (`FenceRegistration`: dropping it makes the firmware and the table forget the fence)
//! and the creating context's hold (`FenceHold`: dropping it unbinds the handle in the
//! firmware if it was bound, then drops the hold). Once the hold is bound, the hold alone
//! keeps the fence and the registration is committed.

use crate::buffer::ObjectIdentity;
use crate::context::{ContextRecord, Hold};
use crate::device::{Device, Table};
use rustix::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use userq_uapi::error::ErrorCode;
use userq_uapi::fwmsg::{FenceId, FwRequest};
use userq_uapi::ioctl::{CreateFenceReply, ImportFenceReply};
use userq_uapi::layout::{
    FenceKind, FenceState, FenceWaiters, QueueState, WaiterSlot, WAITER_SLOTS,
};
use userq_uapi::os;
use userq_uapi::packet::FenceHandle;
use userq_uapi::shm::{Sealing, Shm};
use userq_uapi::{sync, KmdStatus};

/// The identities of a fence's state object and of its waiter object, in that order: how
/// IMPORT_FENCE recognises a fence.
pub(crate) type FenceIdentity = (ObjectIdentity, ObjectIdentity);

/// A registered fence, as kmd-shim records it.
pub(crate) struct FenceRecord {
    /// User or timeline: only a user fence may be signalled by its holders.
    kind: FenceKind,
    /// The context that created it; for a user fence, the one whose death poisons it.
    owner: u32,
    /// Handles on it, in all contexts.
    holds: usize,
    /// Its key in `Table::by_identity`.
    identity: FenceIdentity,
    /// kmd-shim's own mapping of the state object, to poison the fence when the firmware
    /// is lost.
    state: Shm<FenceState>,
    /// kmd-shim's own mapping of the waiter object, for the wake that goes with a poison
    /// and to take a departing holder's waiters off the shared count.
    waiters: Shm<FenceWaiters>,
}

impl FenceRecord {
    /// A holder lets go (or its connection closed): its waiters, as its own count says,
    /// come off the user fence's shared count, so they cost signallers nothing afterwards,
    /// and its own count goes to zero. (A timeline's waiters are only in the holders' own
    /// counts, which the firmware stops reading with the binding.)
    /// Returns how many waiters the holder still had registered.
    fn drop_holder(&self, c: &ContextRecord, at: WaiterSlot) -> u32 {
        let Some(mine) = c.waiters.as_ref() else {
            return 0;
        };
        match self.kind {
            FenceKind::User => sync::take_holder_waiters(mine, &self.waiters, at),
            FenceKind::Timeline => mine
                .counts
                .get(at.slot as usize)
                .map_or(0, |n| n.swap(0, std::sync::atomic::Ordering::SeqCst)),
        }
    }
}

/// A fence registered with the firmware and recorded in the table, not held by anyone yet.
/// Until [`FenceRegistration::commit`], dropping it has the firmware drop the fence, then
/// forgets it in the table.
pub(crate) struct FenceRegistration<'a> {
    dev: &'a Device,
    /// The fence's id.
    pub(crate) fence: FenceId,
    armed: bool,
}

impl FenceRegistration<'_> {
    /// Leaves the fence to its holds; returns its id.
    pub(crate) fn commit(mut self) -> FenceId {
        self.armed = false;
        self.fence
    }
}

impl Drop for FenceRegistration<'_> {
    fn drop(&mut self) {
        if self.armed {
            let fence = self.fence;
            let _ = self.dev.link().call(FwRequest::DropFence { fence }, &[]);
            self.dev.table().forget_fence(fence);
        }
    }
}

/// One fence counted against the limit while it is being registered; the count goes when
/// this does (the fence is then in the table, or failed).
struct Registering<'a>(&'a Device);

impl Drop for Registering<'_> {
    fn drop(&mut self) {
        self.0.table().fences_registering -= 1;
    }
}

/// A context's hold on a fence: its handle in the context's record and one count in the
/// fence's holds, bound in the firmware or not yet. Until [`FenceHold::commit`], dropping
/// it unbinds the handle in the firmware if it was bound, then drops the hold (and the
/// fence, if that was its last hold).
pub(crate) struct FenceHold<'a> {
    dev: &'a Device,
    ctx: u32,
    handle: FenceHandle,
    /// Where the context registers its waiters on the fence.
    pub(crate) waiter: WaiterSlot,
    /// The firmware knows the handle.
    bound: bool,
    armed: bool,
}

impl FenceHold<'_> {
    /// Keeps the hold: the context owns the handle from now on. Returns the handle.
    pub(crate) fn commit(mut self) -> FenceHandle {
        self.armed = false;
        self.handle
    }
}

impl Drop for FenceHold<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (ctx, handle) = (self.ctx, self.handle);
        if self.bound {
            let _ = self
                .dev
                .link()
                .call(FwRequest::UnbindFence { ctx, handle }, &[]);
        }
        self.dev.drop_hold(ctx, handle);
    }
}

impl Table {
    /// Forgets a fence nobody holds any more.
    pub(crate) fn forget_fence(&mut self, fence: FenceId) {
        if let Some(f) = self.fences.remove(&fence) {
            self.by_identity.remove(&f.identity);
        }
    }

    /// Drops one hold for each handle of a closing context, taking its waiters off the
    /// shared counts, and forgets the fences nobody holds any more; returns those, for the
    /// firmware to drop.
    pub(crate) fn release_holds(&mut self, c: &ContextRecord) -> Vec<FenceId> {
        let mut unheld = Vec::new();
        for hold in c.handles.values() {
            if let Some(f) = self.fences.get_mut(&hold.fence) {
                f.drop_holder(c, hold.waiter);
                f.holds -= 1;
                if f.holds == 0 {
                    unheld.push(hold.fence);
                }
            }
        }
        for fence in &unheld {
            self.forget_fence(*fence);
        }
        unheld
    }

    /// The user fences `ctx` created that the table still records: after
    /// [`Table::release_holds`] for `ctx`, those other contexts hold.
    pub(crate) fn user_fences_owned_by(&self, ctx: u32) -> Vec<FenceId> {
        self.fences
            .iter()
            .filter(|(_, f)| f.owner == ctx && f.kind == FenceKind::User)
            .map(|(id, _)| *id)
            .collect()
    }
}

impl Device {
    /// Creates a fence's two objects and registers it with the firmware; returns the
    /// registration and the descriptors of the state and waiter objects.
    pub(crate) fn register_fence(
        &self,
        kind: FenceKind,
        owner: u32,
        initial: u64,
    ) -> Result<(FenceRegistration<'_>, OwnedFd, OwnedFd), KmdStatus> {
        let internal = |_| KmdStatus::Internal;
        let (id, _registering) = {
            let mut t = self.table();
            if t.fences.len() + t.fences_registering >= self.limits.max_fences {
                return Err(KmdStatus::LimitExceeded);
            }
            let id = t.next_fence;
            t.next_fence += 1; // u64: does not wrap in practice
            t.fences_registering += 1;
            (id, Registering(self))
        };
        // A timeline's value side is written only by the firmware (and kmd-shim): sealed
        // read-only once the firmware has mapped it, below.
        let (name, sealing) = match kind {
            FenceKind::Timeline => ("userq-timeline", Sealing::FirmwareWritable),
            FenceKind::User => ("userq-fence", Sealing::Final),
        };
        let (state_fd, state) =
            Shm::<FenceState>::create(name, sealing, kind as u32, id).map_err(internal)?;
        state.slot.value.store(initial, Relaxed);
        let (waiters_fd, waiters) =
            Shm::<FenceWaiters>::create("userq-fence-waiters", Sealing::Final, kind as u32, id)
                .map_err(internal)?;
        let identity = (
            os::object_identity(state_fd.as_fd()).map_err(internal)?,
            os::object_identity(waiters_fd.as_fd()).map_err(internal)?,
        );
        let (state_id, waiters_id) = (self.link().new_object_id(), self.link().new_object_id());
        self.link().call(
            FwRequest::RegisterFence {
                fence: id,
                state: state_id,
                waiters: waiters_id,
            },
            &[
                (state_id, state_fd.as_fd()),
                (waiters_id, waiters_fd.as_fd()),
            ],
        )?;
        if kind == FenceKind::Timeline {
            if let Err(e) = os::seal_read_only(state_fd.as_fd()) {
                // The firmware has the fence: take it back before failing.
                let _ = self.link().call(FwRequest::DropFence { fence: id }, &[]);
                return Err(internal(e));
            }
        }
        let mut t = self.table();
        t.by_identity.insert(identity, id);
        t.fences.insert(
            id,
            FenceRecord {
                kind,
                owner,
                holds: 0,
                identity,
                state,
                waiters,
            },
        );
        drop(t);
        let registration = FenceRegistration {
            dev: self,
            fence: id,
            armed: true,
        };
        Ok((registration, state_fd, waiters_fd))
    }

    /// Records a hold of `ctx` on `fence` under a new handle; returns it (not bound yet)
    /// and whether the context may signal the fence.
    fn reserve_hold(&self, ctx: u32, fence: FenceId) -> Result<(FenceHold<'_>, bool), KmdStatus> {
        let mut t = self.table();
        let kind = t.fences.get(&fence).ok_or(KmdStatus::NotFound)?.kind;
        let c = t.contexts.get_mut(&ctx).ok_or(KmdStatus::NoContext)?;
        if c.handles.len() >= self.limits.max_fences_per_context.min(WAITER_SLOTS) {
            return Err(KmdStatus::LimitExceeded);
        }
        let handle = FenceHandle(c.next_handle);
        let next = c
            .next_handle
            .checked_add(1)
            .ok_or(KmdStatus::LimitExceeded)?;
        let slot = c.take_slot().ok_or(KmdStatus::LimitExceeded)?;
        c.next_handle = next;
        let f = t.fences.get_mut(&fence).ok_or(KmdStatus::NotFound)?;
        f.holds += 1;
        let waiter = WaiterSlot { slot };
        if let Some(c) = t.contexts.get_mut(&ctx) {
            c.by_fence.insert(fence, handle);
            c.handles.insert(
                handle,
                Hold {
                    fence,
                    waiter,
                    refs: 1,
                },
            );
        }
        drop(t);
        let hold = FenceHold {
            dev: self,
            ctx,
            handle,
            waiter,
            bound: false,
            armed: true,
        };
        Ok((hold, kind == FenceKind::User))
    }

    /// Gives `ctx` a handle on `fence`, bound in the firmware.
    pub(crate) fn bind(&self, ctx: u32, fence: FenceId) -> Result<FenceHold<'_>, KmdStatus> {
        let (mut hold, writable) = self.reserve_hold(ctx, fence)?;
        self.link().call(
            FwRequest::BindFence {
                ctx,
                handle: hold.handle,
                fence,
                writable,
                waiter_slot: hold.waiter.slot,
            },
            &[],
        )?;
        hold.bound = true;
        Ok(hold)
    }

    /// Removes a hold from the table; tells the firmware to forget a fence nobody holds.
    fn drop_hold(&self, ctx: u32, handle: FenceHandle) {
        let mut t = self.table();
        let Some(c) = t.contexts.get_mut(&ctx) else {
            return;
        };
        let Some(Hold { fence, waiter, .. }) = c.handles.remove(&handle) else {
            return;
        };
        c.by_fence.remove(&fence);
        let still_waiting = match (t.contexts.get(&ctx), t.fences.get(&fence)) {
            (Some(c), Some(f)) => f.drop_holder(c, waiter),
            _ => 0,
        };
        // A slot whose waiters were still registered stays out of use until the context
        // goes: one of them may yet unregister there, and must not take a count another
        // fence's waiter put in the same slot.
        if still_waiting == 0 {
            if let Some(c) = t.contexts.get_mut(&ctx) {
                c.give_slot(waiter.slot);
            }
        }
        let Some(f) = t.fences.get_mut(&fence) else {
            return;
        };
        f.holds -= 1;
        if f.holds == 0 {
            t.forget_fence(fence);
            drop(t);
            let _ = self.link().call(FwRequest::DropFence { fence }, &[]);
        }
    }

    /// CREATE_FENCE: the reply, and the fence's state (rw) and waiters (rw).
    pub fn create_fence(
        &self,
        ctx: u32,
        initial: u64,
    ) -> Result<(CreateFenceReply, [OwnedFd; 2]), KmdStatus> {
        if !self.table().contexts.contains_key(&ctx) {
            return Err(KmdStatus::NoContext);
        }
        let (registration, state_fd, waiters_fd) =
            self.register_fence(FenceKind::User, ctx, initial)?;
        let hold = self.bind(ctx, registration.fence)?;
        let waiter = hold.waiter;
        let reply = CreateFenceReply {
            handle: hold.commit(),
            fence: registration.commit(),
            waiter,
        };
        Ok((reply, [state_fd, waiters_fd]))
    }

    /// IMPORT_FENCE: the fds must be the state and waiter objects of one live fence.
    pub fn import_fence(&self, ctx: u32, fds: &[OwnedFd]) -> Result<ImportFenceReply, KmdStatus> {
        let [state_fd, waiters_fd] = fds else {
            return Err(KmdStatus::BadFd);
        };
        let identity = (
            os::object_identity(state_fd.as_fd()).map_err(|_| KmdStatus::BadFd)?,
            os::object_identity(waiters_fd.as_fd()).map_err(|_| KmdStatus::BadFd)?,
        );
        let (fence, kind) = {
            let mut t = self.table();
            let id = *t.by_identity.get(&identity).ok_or(KmdStatus::BadFd)?;
            let kind = t.fences.get(&id).ok_or(KmdStatus::BadFd)?.kind;
            let c = t.contexts.get_mut(&ctx).ok_or(KmdStatus::NoContext)?;
            // A fence the context holds already: the same handle once more, so repeat
            // imports cost neither a handle nor a holder the firmware scans at every
            // signal of the fence.
            let held = c.by_fence.get(&id).copied();
            if let Some((handle, hold)) = held.and_then(|h| Some((h, c.handles.get_mut(&h)?))) {
                hold.refs = hold.refs.checked_add(1).ok_or(KmdStatus::LimitExceeded)?;
                return Ok(ImportFenceReply {
                    handle,
                    fence: id,
                    kind,
                    waiter: hold.waiter,
                });
            }
            (id, kind)
        };
        let hold = self.bind(ctx, fence)?;
        let waiter = hold.waiter;
        Ok(ImportFenceReply {
            handle: hold.commit(),
            fence,
            kind,
            waiter,
        })
    }

    /// RELEASE_FENCE: takes one of the handle's references; the last one unbinds it.
    pub fn release_fence(&self, ctx: u32, handle: FenceHandle) -> Result<(), KmdStatus> {
        {
            let mut t = self.table();
            let c = t.contexts.get_mut(&ctx).ok_or(KmdStatus::NoContext)?;
            let hold = c.handles.get_mut(&handle).ok_or(KmdStatus::NotFound)?;
            if hold.refs > 1 {
                hold.refs -= 1;
                return Ok(());
            }
        }
        self.link()
            .call(FwRequest::UnbindFence { ctx, handle }, &[])?;
        self.drop_hold(ctx, handle);
        Ok(())
    }

    /// Poisons every fence with [`ErrorCode::DeviceLost`]: the firmware is gone, so
    /// kmd-shim writes the fences itself (under the table lock; no firmware call).
    pub fn poison_all(&self) {
        let t = self.table();
        for f in t.fences.values() {
            // As the firmware does when a queue stops: the record, then the queue's state
            // word (a submitter sees at once that nothing will run), then poison and wake.
            let claimed = sync::write_error_record(&f.state, ErrorCode::DeviceLost, 0, 0, 0);
            if f.kind == FenceKind::Timeline {
                let _ = f.state.queue.state.compare_exchange(
                    QueueState::Active as u32,
                    QueueState::Destroyed as u32,
                    Release,
                    Relaxed,
                );
            }
            if claimed {
                sync::publish_poison(&f.state, &f.waiters, ErrorCode::DeviceLost);
            } else if f.state.slot.poison.load(Acquire) == 0 {
                // The firmware claimed the record and died before publishing the poison:
                // publish what it recorded, so the fence's waiters wake.
                let code = ErrorCode::from_u32(f.state.record.code.load(Acquire))
                    .unwrap_or(ErrorCode::DeviceLost);
                sync::publish_poison(&f.state, &f.waiters, code);
            }
        }
    }
}
