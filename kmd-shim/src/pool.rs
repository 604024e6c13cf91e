//! DOC: the device-memory pool ("VRAM"): one memfd of the budget's size, cut into
//! [`DEVICE_PAGE`] slots.
//!
//! A slot holds one resident page of an on-demand buffer. Its memory exists only while it
//! does: a released slot is punched out of the memfd (`fallocate(PUNCH_HOLE)`), so the
//! pool's resident memory, as the OS counts it (the memfd's allocated blocks, which any
//! observer reads from `/proc/<pid>/fd`), is the resident pages and never more than the
//! budget.
//! The firmware maps slots into buffer windows; kmd-shim maps the whole pool to copy data
//! in and out, always through 64-bit atomics (the firmware's engines write the same
//! memory).
//!
//! The *use table* (a second memfd, one `u64` per slot) is where the firmware's engines
//! stamp a slot each time a workgroup pins it; eviction takes the smallest stamps: least
//! recently used, across every context.

use rustix::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering::*};
use userq_uapi::os;
use userq_uapi::paging::DEVICE_PAGE;
use userq_uapi::shm::{Sealing, ShmBytes};

/// The pool and its use table.
pub struct DevicePool {
    fd: OwnedFd,
    map: ShmBytes,
    uses_fd: OwnedFd,
    uses: ShmBytes,
    slots: u32,
}

impl std::fmt::Debug for DevicePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevicePool")
            .field("slots", &self.slots)
            .finish()
    }
}

/// Words in a page.
const PAGE_WORDS: usize = (DEVICE_PAGE / 8) as usize;

impl DevicePool {
    /// A pool of `budget` bytes (whole device pages; at least one).
    pub fn create(budget: u64) -> rustix::io::Result<DevicePool> {
        let slots = u32::try_from(budget / DEVICE_PAGE).map_err(|_| rustix::io::Errno::INVAL)?;
        if slots == 0 {
            return Err(rustix::io::Errno::INVAL);
        }
        let bytes = slots as u64 * DEVICE_PAGE;
        let fd = os::create_memfd("userq-pool", bytes, Sealing::Final)?;
        let map = ShmBytes::map(fd.as_fd(), bytes as usize).map_err(map_err)?;
        let uses_fd = os::create_memfd("userq-pool-use", slots as u64 * 8, Sealing::Final)?;
        let uses = ShmBytes::map(uses_fd.as_fd(), slots as usize * 8).map_err(map_err)?;
        Ok(DevicePool {
            fd,
            map,
            uses_fd,
            uses,
            slots,
        })
    }

    /// Slots in the pool.
    pub fn slots(&self) -> u32 {
        self.slots
    }

    /// The pool memfd, for the firmware.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The use table memfd, for the firmware.
    pub fn uses_fd(&self) -> BorrowedFd<'_> {
        self.uses_fd.as_fd()
    }

    /// When the firmware last pinned `slot` (its clock; 0: never).
    pub fn last_use(&self, slot: u32) -> u64 {
        self.uses
            .word64(slot as usize * 8)
            .map_or(0, |w| w.load(Relaxed))
    }

    /// The newest stamp in the use table: what a slot just filled is stamped with, so
    /// that it does not look least recently used before its workgroup has even run.
    pub fn newest(&self) -> u64 {
        (0..self.slots).map(|s| self.last_use(s)).max().unwrap_or(0)
    }

    /// Stamps `slot` as used at `when`.
    pub fn stamp(&self, slot: u32, when: u64) {
        if let Some(w) = self.uses.word64(slot as usize * 8) {
            w.store(when, Relaxed);
        }
    }

    /// Slot `slot`'s words.
    pub fn slot_words(&self, slot: u32) -> &[AtomicU64] {
        self.map
            .atomics(slot as usize * DEVICE_PAGE as usize, PAGE_WORDS)
            .expect("slot inside the pool")
    }

    /// Gives slot `slot`'s memory back to the OS (it reads as zeros from now on) and
    /// clears its use stamp.
    pub fn release(&self, slot: u32) {
        let _ = rustix::fs::fallocate(
            &self.fd,
            rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
            slot as u64 * DEVICE_PAGE,
            DEVICE_PAGE,
        );
        if let Some(w) = self.uses.word64(slot as usize * 8) {
            w.store(0, Relaxed);
        }
    }
}

/// Copies `src` into `dst` (the shorter length), word by word with relaxed atomics: both
/// sides may be memory another process writes.
pub fn copy_words(dst: &[AtomicU64], src: &[AtomicU64]) {
    for (d, s) in dst.iter().zip(src) {
        d.store(s.load(Relaxed), Relaxed);
    }
}

fn map_err(e: os::MapError) -> rustix::io::Errno {
    match e {
        os::MapError::Io(e) => e,
        _ => rustix::io::Errno::INVAL,
    }
}
