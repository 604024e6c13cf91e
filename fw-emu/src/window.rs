//! DOC: device memory of on-demand buffers: the pool, and each buffer's device window.
//!
//! kmd-shim owns the device-memory pool (one memfd, the budget's size, sent at boot) and
//! decides which pool slot holds which page. The firmware gives each on-demand buffer a
//! *window*: a reserved range of its address space, one [`DEVICE_PAGE`] per page, in which
//! a resident page is the pool slot mapped in place (`MAP_FIXED | MAP_SHARED` of the pool
//! memfd, as a GPU's page table points a virtual page at VRAM) and any other page is
//! private scratch memory. So a kernel sees a flat buffer, and data moves only where
//! kmd-shim copies it: into a slot before [`Window::map`], out of it after
//! [`Window::unmap`] has been acknowledged.
//!
//! A page that is not resident is never touched by a correct kernel (its workgroup
//! faults before it starts, see [`crate::engine`]); the scratch backing is for the cases
//! the firmware cannot stop in time: a workgroup wedged past a reset, or a buffer freed
//! under a running kernel. Their stray accesses land in scratch, never in a pool slot
//! that may by then hold another VM's data: replacing a mapping is atomic for every
//! thread (the kernel shoots down the old translation before `mmap` returns).
//!
//! Each page has a [`PageEntry`]: its state and its pin count. Engines (and the command
//! processor, for a dispatch it runs itself, between its loop's other work) pin a page
//! before a workgroup touches it and unpin it after; an invalidation first marks the page, then
//! waits for its pins to drain (the two sides are a Dekker pair through SeqCst fences,
//! modelled in `uapi/tests/loom.rs`).

use rustix::fd::{AsFd, OwnedFd};
use rustix::mm::{MapFlags, ProtFlags};
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering::*};
use std::sync::Arc;
use userq_uapi::paging::DEVICE_PAGE;
use userq_uapi::shm::{AtomicInt, ShmBytes};

/// The device-memory pool as the firmware sees it: the memfd to map slots from, and the
/// use clock kmd-shim reads to find the least recently used slots.
#[derive(Debug)]
pub struct Pool {
    fd: OwnedFd,
    slots: u32,
    /// One `u64` per slot: [`Pool::clock`] at the slot's last pin.
    uses: ShmBytes,
    /// Advanced once per workgroup that pins pages.
    clock: AtomicU64,
}

impl Pool {
    /// The pool memfd and its use table, both from kmd-shim at boot.
    pub fn new(fd: OwnedFd, uses: OwnedFd) -> std::io::Result<Pool> {
        let st = rustix::fs::fstat(&fd)?;
        let slots = u32::try_from(st.st_size as u64 / DEVICE_PAGE)
            .map_err(|_| std::io::Error::other("pool too large"))?;
        let uses = ShmBytes::map(uses.as_fd(), (slots.max(1) as usize) * 8)
            .map_err(|e| std::io::Error::other(format!("pool use table: {e:?}")))?;
        Ok(Pool {
            fd,
            slots,
            uses,
            clock: AtomicU64::new(1),
        })
    }

    /// Slots in the pool.
    pub fn slots(&self) -> u32 {
        self.slots
    }

    /// A new tick of the use clock, for one workgroup's pins.
    pub fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Relaxed)
    }

    /// Records that `slot` was used at `now`.
    pub fn touch(&self, slot: u32, now: u64) {
        if let Some(w) = self.uses.word64(slot as usize * 8) {
            w.store(now, Relaxed);
        }
    }
}

/// A page's residency.
pub mod state {
    /// Not resident: a workgroup that needs it faults.
    pub const ABSENT: u32 = 0;
    /// Resident in the slot its entry names.
    pub const RESIDENT: u32 = 1;
    /// Being taken away: no new pin; the invalidation waits for the old ones.
    pub const INVALIDATING: u32 = 2;
    /// Its buffer was freed.
    pub const FREED: u32 = 3;
}

/// One page of a window.
#[derive(Debug, Default)]
pub struct PageEntry {
    state: AtomicU32,
    /// Pins, low 32 bits; a generation, high 32 bits. An invalidation that gives up on a
    /// wedged workgroup's pins bumps the generation, and that workgroup's late unpin (of
    /// the old generation) then changes nothing.
    pins: AtomicU64,
    /// The pool slot while resident.
    slot: AtomicU32,
}

impl PageEntry {
    /// Pins the page if it is resident: returns the generation to unpin with and the
    /// slot. The pin, a SeqCst fence, then the state: paired with
    /// [`PageEntry::begin_invalidate`] and [`PageEntry::unpinned`] (mark, fence, pins),
    /// either this sees the invalidation, or the invalidation sees this pin (modelled in
    /// `uapi/tests/loom.rs`).
    pub fn pin(&self) -> Option<(u32, u32)> {
        let gen = (self.pins.fetch_add(1, Relaxed) >> 32) as u32;
        fence(SeqCst);
        if self.state.load(Acquire) == state::RESIDENT {
            // Acquire: the slot was stored before the state became RESIDENT (Release).
            Some((gen, self.slot.load(Acquire)))
        } else {
            self.unpin(gen);
            None
        }
    }

    /// Undoes a [`PageEntry::pin`] of generation `gen`. Release: the invalidator that sees
    /// the pins drop (acquire) sees the workgroup's writes to the page.
    pub fn unpin(&self, gen: u32) {
        let _ = self.pins.fetch_update(Release, Relaxed, |v| {
            ((v >> 32) as u32 == gen && v as u32 > 0).then(|| v - 1)
        });
    }

    /// The page's state.
    pub fn state(&self) -> u32 {
        self.state.load(Acquire)
    }

    /// Marks a resident page as going away; returns whether it was resident. Check
    /// [`PageEntry::unpinned`] after it.
    pub fn begin_invalidate(&self) -> bool {
        self.state
            .compare_exchange(state::RESIDENT, state::INVALIDATING, Relaxed, Relaxed)
            .is_ok()
    }

    /// Whether no workgroup pins the page: a SeqCst fence (the other half of the pair
    /// with [`PageEntry::pin`]), then the pins (acquire, paired with the unpin's release).
    pub fn unpinned(&self) -> bool {
        fence(SeqCst);
        self.pins.load(Acquire) as u32 == 0
    }

    /// Forgets the pins of workgroups that will not give them back in time (their
    /// queues were reset). The page is `INVALIDATING`, so no new pin holds.
    pub fn forgive_pins(&self) {
        let _ = self
            .pins
            .fetch_update(AcqRel, Relaxed, |v| Some(((v >> 32) + 1) << 32));
    }
}

/// An on-demand buffer's device window.
#[derive(Debug)]
pub struct Window {
    base: NonNull<u8>,
    /// Bytes reserved: whole device pages.
    len: usize,
    pages: Box<[PageEntry]>,
    pool: Arc<Pool>,
}

// SAFETY: the window is a range of this process's address space that lives as long as
// the `Window`; every access to its memory goes through atomics (`atomics`), and its
// mappings change only through `&self` methods that replace whole pages with `mmap`,
// which is atomic for every thread.
unsafe impl Send for Window {}
// SAFETY: as above.
unsafe impl Sync for Window {}

impl Window {
    /// Reserves a window of `size` bytes (whole device pages), every page scratch.
    pub fn new(size: u64, pool: Arc<Pool>) -> std::io::Result<Window> {
        let pages = size.div_ceil(DEVICE_PAGE);
        let len = usize::try_from(pages * DEVICE_PAGE)
            .map_err(|_| std::io::Error::other("window too large"))?;
        if len == 0 {
            return Err(std::io::Error::other("empty window"));
        }
        // SAFETY: a fresh anonymous mapping at an address the kernel picks: it aliases
        // nothing.
        let base = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::PRIVATE | MapFlags::NORESERVE,
            )?
        };
        let base = NonNull::new(base.cast::<u8>()).ok_or(std::io::Error::other("mmap null"))?;
        Ok(Window {
            base,
            len,
            pages: (0..pages).map(|_| PageEntry::default()).collect(),
            pool,
        })
    }

    /// Pages in the window.
    pub fn page_count(&self) -> usize {
        self.pages.len()
    }

    /// Page `i`'s entry.
    pub fn entry(&self, i: usize) -> Option<&PageEntry> {
        self.pages.get(i)
    }

    /// The pool its pages live in.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Maps pool slots `slot..slot + count` at pages `first..first + count` and marks them
    /// resident. Refused (false) for pages out of range or not absent, or slots outside
    /// the pool. Only the command processor calls it.
    pub fn map(&self, first: usize, slot: u32, count: usize) -> bool {
        let Some(end) = first.checked_add(count) else {
            return false;
        };
        if count == 0
            || end > self.pages.len()
            || (slot as u64 + count as u64) > self.pool.slots as u64
            || self.pages[first..end]
                .iter()
                .any(|p| p.state() != state::ABSENT)
        {
            return false;
        }
        // SAFETY: the target range is inside this window (checked), which this process
        // reserved and owns; MAP_FIXED replaces exactly those pages. No page there is
        // RESIDENT (all ABSENT), so no pool slot the firmware tracks is replaced; a
        // workgroup that pinned one for a moment (a pin is counted before its state is read)
        // reads only through atomics, and the range stays mapped throughout.
        let mapped = unsafe {
            rustix::mm::mmap(
                self.base.as_ptr().add(first * DEVICE_PAGE as usize).cast(),
                count * DEVICE_PAGE as usize,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED | MapFlags::FIXED,
                &self.pool.fd,
                slot as u64 * DEVICE_PAGE,
            )
        };
        if mapped.is_err() {
            return false;
        }
        for (i, p) in self.pages[first..end].iter().enumerate() {
            p.slot.store(slot + i as u32, Relaxed);
            p.state.store(state::RESIDENT, Release);
        }
        true
    }

    /// Points pages `first..first + count` back at scratch memory and marks them `to`
    /// ([`state::ABSENT`] or [`state::FREED`]). After it returns true no thread can
    /// reach the pool slots through this window. False: the kernel refused the mapping
    /// (ENOMEM), the pages still map their slots, and the caller must not let them go.
    /// Only the command processor calls it, for pages whose pins have drained or were
    /// forgiven.
    #[must_use]
    pub fn unmap(&self, first: usize, count: usize, to: u32) -> bool {
        let end = first.saturating_add(count).min(self.pages.len());
        if first >= end {
            return true;
        }
        // SAFETY: inside this window (clipped above); replaces those pages with fresh
        // private anonymous memory. A workgroup still touching them (wedged past a
        // reset, or using a freed buffer) sees scratch from now on.
        let r = unsafe {
            rustix::mm::mmap_anonymous(
                self.base.as_ptr().add(first * DEVICE_PAGE as usize).cast(),
                (end - first) * DEVICE_PAGE as usize,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::PRIVATE | MapFlags::NORESERVE | MapFlags::FIXED,
            )
        };
        // Only ENOMEM can fail a fixed anonymous mapping over our own range; the old
        // mapping then stays, so the pages must stay accounted as they were.
        if r.is_err() {
            return false;
        }
        for p in &self.pages[first..end] {
            p.state.store(to, Release);
        }
        true
    }

    /// `count` atomics of type `W` from byte `offset`, if they fit and are aligned.
    pub fn atomics<W: AtomicInt>(&self, offset: usize, count: usize) -> Option<&[W]> {
        let bytes = std::mem::size_of::<W>().checked_mul(count)?;
        let end = offset.checked_add(bytes)?;
        if end > self.len || offset % std::mem::align_of::<W>() != 0 {
            return None;
        }
        // SAFETY: in bounds and aligned (checked; the base is page-aligned). The range is
        // always mapped (pool slot or scratch) while the window lives, and `W` is an
        // atomic integer: any bit pattern is valid and concurrent access is sound. The
        // slice borrows `self`.
        Some(unsafe {
            std::slice::from_raw_parts(self.base.as_ptr().add(offset).cast::<W>(), count)
        })
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        // SAFETY: the whole reservation, which nothing borrows any more (`atomics` slices
        // borrow the window).
        let _ = unsafe { rustix::mm::munmap(self.base.as_ptr().cast(), self.len) };
    }
}
