//! DOC: a context's device virtual address space (VM) and the views kernels get of it.
//!
//! kmd-shim places buffers in a context's VM and sends the firmware their memfds; the VM
//! maps each one ([`ShmBytes`]) at its device address, exactly as many bytes as the
//! client asked for, so a view of a buffer ends where the buffer does. Every device
//! access goes through [`Vm::word`] (single words for WRITE_VALUE, TIMESTAMP, argument
//! words) or a [`BufferArg`] (a kernel's view from an address to the end of its buffer);
//! an address outside every buffer is a memory violation. A buffer stays mapped while a
//! running dispatch holds a view of it, even if it is unmapped from the VM meanwhile.
//!
//! An on-demand buffer is a [`Window`] instead: its pages are resident or not, and a
//! kernel's workgroup pins the pages of its footprint before it runs (see
//! [`crate::engine`]). The command processor's own accesses ([`Vm::word`]: WRITE_VALUE,
//! TIMESTAMP, kernel argument words) cannot fault, so they are refused there
//! (`MemoryViolation`): those operands live in ordinary buffers.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, AtomicU64};
use std::sync::Arc;
use userq_uapi::error::ErrorCode;
use userq_uapi::shm::ShmBytes;

pub use crate::window::Window;

/// What a buffer's device memory is.
#[derive(Debug, Clone)]
enum Backing {
    /// An ordinary buffer: its memfd, always resident.
    Pinned(Arc<ShmBytes>),
    /// An on-demand buffer: a window onto pool slots.
    OnDemand(Arc<Window>),
}

impl Backing {
    fn atomics<W: userq_uapi::shm::AtomicInt>(&self, offset: usize, count: usize) -> Option<&[W]> {
        match self {
            Backing::Pinned(m) => m.atomics(offset, count),
            Backing::OnDemand(w) => w.atomics(offset, count),
        }
    }
}

/// A buffer mapped into a VM. Shared with running dispatches, which keep it mapped.
#[derive(Debug)]
struct VmBuffer {
    /// Bytes the VM maps: `size ≤` the backing's length.
    size: u64,
    map: Backing,
}

/// A context's device virtual address space: the buffers kmd-shim mapped, by address.
/// Buffers never overlap.
#[derive(Debug, Default)]
pub struct Vm {
    buffers: BTreeMap<u64, VmBuffer>,
}

impl Vm {
    /// Maps `size` bytes of `map` at `va`; refuses overlaps, empty and oversized ranges.
    pub fn map(&mut self, va: u64, size: u64, map: ShmBytes) -> bool {
        if (map.len() as u64) < size {
            return false;
        }
        self.insert(va, size, Backing::Pinned(Arc::new(map)))
    }

    /// Maps an on-demand buffer's window of `size` bytes at `va`.
    pub fn map_on_demand(&mut self, va: u64, size: u64, window: Arc<Window>) -> bool {
        if (window.page_count() as u64 * userq_uapi::paging::DEVICE_PAGE) < size {
            return false;
        }
        self.insert(va, size, Backing::OnDemand(window))
    }

    fn insert(&mut self, va: u64, size: u64, map: Backing) -> bool {
        let Some(end) = va.checked_add(size) else {
            return false;
        };
        if size == 0 {
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
        self.buffers.insert(va, VmBuffer { size, map });
        true
    }

    /// Unmaps the buffer at exactly `va`. Returns `None` if there is none, else the
    /// window if it was on-demand.
    pub fn unmap(&mut self, va: u64) -> Option<Option<Arc<Window>>> {
        self.buffers.remove(&va).map(|b| match b.map {
            Backing::OnDemand(w) => Some(w),
            Backing::Pinned(_) => None,
        })
    }

    /// The on-demand window holding `addr`, with `addr`'s offset in it.
    pub fn window(&self, addr: u64) -> Option<(&Arc<Window>, u64, u64)> {
        let (&base, buf) = self.buffers.range(..=addr).next_back()?;
        let off = addr - base;
        match &buf.map {
            Backing::OnDemand(w) if off < buf.size => Some((w, base, off)),
            _ => None,
        }
    }

    /// Every on-demand window, by base address.
    pub fn windows(&self) -> impl Iterator<Item = (u64, &Arc<Window>)> {
        self.buffers.iter().filter_map(|(&va, b)| match &b.map {
            Backing::OnDemand(w) => Some((va, w)),
            Backing::Pinned(_) => None,
        })
    }

    /// The buffer holding `addr`, and `addr`'s offset in it.
    fn find(&self, addr: u64) -> Option<(&VmBuffer, u64)> {
        let (&base, buf) = self.buffers.range(..=addr).next_back()?;
        let off = addr - base;
        (off < buf.size).then_some((buf, off))
    }

    /// A kernel's view of memory from `addr` (8-aligned) to the end of its buffer.
    pub fn buffer_from(&self, addr: u64) -> Option<BufferArg> {
        if addr % 8 != 0 {
            return None;
        }
        let (buf, off) = self.find(addr)?;
        Some(BufferArg {
            map: buf.map.clone(),
            offset: off as usize,
            len: (buf.size - off) as usize,
            address: addr,
        })
    }

    /// The 64-bit word at device address `addr`, or why there is none.
    pub fn word(&self, addr: u64) -> Result<&AtomicU64, ErrorCode> {
        if addr % 8 != 0 {
            return Err(ErrorCode::MisalignedAddress);
        }
        let (buf, off) = self.find(addr).ok_or(ErrorCode::MemoryViolation)?;
        if off + 8 > buf.size {
            return Err(ErrorCode::MemoryViolation);
        }
        match &buf.map {
            Backing::Pinned(m) => m.word64(off as usize).ok_or(ErrorCode::MemoryViolation),
            Backing::OnDemand(_) => Err(ErrorCode::MemoryViolation),
        }
    }
}

/// Device memory from an address to the end of its buffer, kept mapped while the dispatch
/// runs even if the buffer is freed meanwhile.
#[derive(Debug, Clone)]
pub struct BufferArg {
    map: Backing,
    /// Byte offset of the view in the mapping: `offset + len ≤ map.len()`, 8-aligned.
    offset: usize,
    len: usize,
    /// The device address it was given as.
    pub address: u64,
}

impl BufferArg {
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the view is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// For an on-demand buffer: its window and the view's byte offset in it.
    pub fn window(&self) -> Option<(&Arc<Window>, usize)> {
        match &self.map {
            Backing::OnDemand(w) => Some((w, self.offset)),
            Backing::Pinned(_) => None,
        }
    }

    /// The memory as 32-bit words (u32 or f32 bit patterns).
    pub fn words32(&self) -> &[AtomicU32] {
        self.map
            .atomics::<AtomicU32>(self.offset, self.len / 4)
            .expect("buffer view inside its mapping and 8-aligned")
    }

    /// The memory as 64-bit words.
    pub fn words64(&self) -> &[AtomicU64] {
        self.map
            .atomics::<AtomicU64>(self.offset, self.len / 8)
            .expect("buffer view inside its mapping and 8-aligned")
    }
}
