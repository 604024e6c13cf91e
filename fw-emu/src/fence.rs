//! DOC: fences as the firmware holds them, and a context's right to name one.
//!
//! kmd-shim registers every fence with the firmware once ([`FenceObject`]: its value side
//! and its waiter side, both mapped writable here) and binds it into each context that
//! holds a handle on it ([`Binding`]). Queues signal fences with SIGNAL_FENCE (only where
//! the binding is writable) and park on them with WAIT_FENCE; [`FenceObject::wait_status`]
//! is the one place a wait condition is evaluated.

use userq_uapi::fwmsg::FenceId;
use userq_uapi::layout::{FenceState, FenceWaiters};
use userq_uapi::packet::WaitCondition;
use userq_uapi::shm::Shm;

/// A fence as the firmware maps it.
#[derive(Debug)]
pub struct FenceObject {
    /// Global id.
    pub id: FenceId,
    state: Shm<FenceState>,
    waiters: Shm<FenceWaiters>,
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
        FenceObject { id, state, waiters }
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
            code => WaitStatus::Poisoned(code),
        }
    }
}

/// A context's right to name a fence.
#[derive(Debug, Clone)]
pub struct Binding {
    /// The fence.
    pub fence: std::sync::Arc<FenceObject>,
    /// Whether SIGNAL_FENCE may write it.
    pub writable: bool,
}
