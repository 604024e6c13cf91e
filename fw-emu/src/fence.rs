//! DOC: fences as the firmware holds them, and a context's right to name one.
//!
//! kmd-shim registers every fence with the firmware once ([`FenceObject`]: its value side
//! and its waiter side, both mapped writable here) and binds it into each context that
//! holds a handle on it ([`Binding`]). Queues signal fences with SIGNAL_FENCE (only where
//! the binding is writable) and park on them with WAIT_FENCE; [`FenceObject::wait_status`]
//! is the one place a wait condition is evaluated.
//!
//! Each binding is also a holder whose host waiters the firmware must wake: the fence
//! keeps every holder's waiter count (in that context's own `ContextWaiters`), and a
//! signal by the firmware wakes when one of them is non-zero
//! ([`FenceObject::host_waiting`]). A holder can only write its own count, so no holder can
//! keep another's waiters from being woken; when a holder lets go (or dies), its count is
//! no longer looked at.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use userq_uapi::fwmsg::FenceId;
use userq_uapi::layout::{ContextWaiters, FenceState, FenceWaiters};
use userq_uapi::packet::WaitCondition;
use userq_uapi::shm::Shm;

/// One holder's waiter count for a fence.
#[derive(Debug)]
struct Holder {
    ctx: u32,
    slot: u32,
    counts: Arc<Shm<ContextWaiters>>,
}

/// A fence as the firmware maps it. Used only on the command processor's thread (the
/// holder list is a `RefCell`).
#[derive(Debug)]
pub struct FenceObject {
    /// Global id.
    pub id: FenceId,
    state: Shm<FenceState>,
    waiters: Shm<FenceWaiters>,
    holders: RefCell<Vec<Holder>>,
}

/// Where a wait on a fence stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitStatus {
    /// The condition holds.
    Satisfied,
    /// Not yet.
    Pending,
    /// The fence was poisoned with this code before the condition held.
    Poisoned(u32),
}

impl FenceObject {
    /// Wraps the two mappings (checked when mapped).
    pub fn new(id: FenceId, state: Shm<FenceState>, waiters: Shm<FenceWaiters>) -> Self {
        FenceObject {
            id,
            state,
            waiters,
            holders: RefCell::new(Vec::new()),
        }
    }

    /// Adds a holder: context `ctx` registers its waiters at `slot` of `counts`.
    pub fn add_holder(&self, ctx: u32, slot: u32, counts: Arc<Shm<ContextWaiters>>) {
        self.holders.borrow_mut().push(Holder { ctx, slot, counts });
    }

    /// Removes context `ctx`'s holder at `slot`.
    pub fn remove_holder(&self, ctx: u32, slot: u32) {
        self.holders
            .borrow_mut()
            .retain(|h| !(h.ctx == ctx && h.slot == slot));
    }

    /// Whether a holder has host threads waiting (after the signaller's SeqCst fence:
    /// relaxed loads). One load per holder; a fence usually has one or two.
    #[inline]
    pub fn host_waiting(&self) -> bool {
        self.holders.borrow().iter().any(|h| {
            h.counts
                .counts
                .get(h.slot as usize)
                .is_some_and(|c| c.load(Relaxed) != 0)
        })
    }

    /// The signalled side.
    pub fn state(&self) -> &FenceState {
        &self.state
    }

    /// The waiter side.
    pub fn waiters(&self) -> &FenceWaiters {
        &self.waiters
    }

    /// Whether `fence & mask` compares with `value & mask` as `condition` says, or the
    /// fence was poisoned. The value is checked first, so a wait satisfied before a poison
    /// still succeeds.
    pub fn wait_status(&self, value: u64, mask: u64, condition: WaitCondition) -> WaitStatus {
        use std::sync::atomic::Ordering::Acquire;
        // Acquire: pairs with the signaller's release store, so what it wrote before
        // signalling is visible to the packets after this wait.
        let current = self.state.slot.value.load(Acquire);
        if condition.holds(current, value, mask) {
            return WaitStatus::Satisfied;
        }
        match self.state.slot.poison.load(Acquire) {
            0 => WaitStatus::Pending,
            // A fence poisoned because its own signaller failed on a dependency: name the
            // root cause (the record's detail), so it travels along a chain of any length.
            // Acquire on the poison word: the record written before it is visible.
            code if code == userq_uapi::ErrorCode::DependencyFailed as u32 => {
                match self.state.record.detail.load(Acquire) {
                    0 => WaitStatus::Poisoned(code),
                    root => WaitStatus::Poisoned(root),
                }
            }
            code => WaitStatus::Poisoned(code),
        }
    }
}

/// A context's right to name a fence.
#[derive(Debug, Clone)]
pub struct Binding {
    /// The fence.
    pub fence: Rc<FenceObject>,
    /// Whether SIGNAL_FENCE may write it.
    pub writable: bool,
    /// The context's waiter count for it.
    pub waiter_slot: u32,
}
