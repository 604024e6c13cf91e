//! DOC: what the firmware knows of a client context: its doorbell page, its queues, the
//! fences it may name by handle, and its device virtual address space (VM).
//!
//! Everything here is firmware-private. The only client-writable memory referenced is
//! the doorbell page and the rings, and those are read as inputs to validate.

use crate::queue::Queue;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use userq_uapi::error::ErrorCode;
use userq_uapi::fwmsg::FenceId;
use userq_uapi::layout::{FenceState, FenceWaiters};
use userq_uapi::os::Mapping;
use userq_uapi::packet::FenceHandle;

/// A fence as the firmware maps it.
#[derive(Debug)]
pub struct FenceObject {
    /// Global id.
    pub id: FenceId,
    state: Mapping,
    waiters: Mapping,
}

impl FenceObject {
    /// Wraps the two mappings; both must have passed their header checks.
    pub fn new(id: FenceId, state: Mapping, waiters: Mapping) -> Self {
        FenceObject { id, state, waiters }
    }

    /// The signalled side.
    pub fn state(&self) -> &FenceState {
        self.state.head()
    }

    /// The waiter side.
    pub fn waiters(&self) -> &FenceWaiters {
        self.waiters.head()
    }
}

/// A context's right to name a fence.
#[derive(Debug, Clone)]
pub struct Binding {
    /// The fence.
    pub fence: Arc<FenceObject>,
    /// Whether SIGNAL_FENCE may write it.
    pub writable: bool,
}

/// A buffer mapped into a VM. Shared with running dispatches, which keep it mapped.
#[derive(Debug)]
struct VmBuffer {
    size: u64,
    map: Arc<Mapping>,
}

/// A context's device virtual address space: the buffers kmd-shim mapped, by address.
#[derive(Debug, Default)]
pub struct Vm {
    buffers: BTreeMap<u64, VmBuffer>,
}

impl Vm {
    /// Maps a buffer at `va`; refuses overlaps.
    pub fn map(&mut self, va: u64, size: u64, map: Mapping) -> bool {
        let Some(end) = va.checked_add(size) else {
            return false;
        };
        if size == 0 || (map.len() as u64) < size {
            return false;
        }
        let overlaps_below = self
            .buffers
            .range(..=va)
            .next_back()
            .is_some_and(|(&b, buf)| b + buf.size > va);
        let overlaps_above = self.buffers.range(va..end).next().is_some();
        if overlaps_below || overlaps_above {
            return false;
        }
        self.buffers.insert(
            va,
            VmBuffer {
                size,
                map: Arc::new(map),
            },
        );
        true
    }

    /// A kernel's view of memory from `addr` (8-aligned) to the end of its buffer.
    pub fn buffer_from(&self, addr: u64) -> Option<crate::kernel::BufferArg> {
        if addr % 8 != 0 {
            return None;
        }
        let (&base, buf) = self.buffers.range(..=addr).next_back()?;
        let off = addr - base;
        if off >= buf.size {
            return None;
        }
        Some(crate::kernel::BufferArg::new(
            buf.map.clone(),
            off as usize,
            (buf.size - off) as usize,
            addr,
        ))
    }

    /// Unmaps the buffer at exactly `va`.
    pub fn unmap(&mut self, va: u64) -> bool {
        self.buffers.remove(&va).is_some()
    }

    /// The 64-bit word at device address `addr`, or why there is none.
    pub fn word(&self, addr: u64) -> Result<&AtomicU64, ErrorCode> {
        if addr % 8 != 0 {
            return Err(ErrorCode::MisalignedAddress);
        }
        let (&base, buf) = self
            .buffers
            .range(..=addr)
            .next_back()
            .ok_or(ErrorCode::MemoryViolation)?;
        let off = addr - base;
        if off.checked_add(8).is_none_or(|end| end > buf.size) {
            return Err(ErrorCode::MemoryViolation);
        }
        buf.map
            .get::<AtomicU64>(off as usize)
            .ok_or(ErrorCode::MemoryViolation)
    }
}

/// A client context.
#[derive(Debug)]
pub struct Context {
    /// The context id kmd-shim assigned.
    pub id: u32,
    /// The doorbell page (client-writable: every word is a hint).
    pub doorbell: Mapping,
    /// Queues by slot.
    pub queues: Vec<Option<Queue>>,
    /// Fences this context may name.
    pub bindings: HashMap<FenceHandle, Binding>,
    /// Its VM.
    pub vm: Vm,
    /// The whole context is suspended (queues created meanwhile start suspended).
    pub suspended: bool,
}

impl Context {
    /// A context with no queues, bindings or buffers.
    pub fn new(id: u32, doorbell: Mapping) -> Self {
        Context {
            id,
            doorbell,
            queues: (0..userq_uapi::layout::MAX_QUEUES_PER_CONTEXT)
                .map(|_| None)
                .collect(),
            bindings: HashMap::new(),
            vm: Vm::default(),
            suspended: false,
        }
    }
}
