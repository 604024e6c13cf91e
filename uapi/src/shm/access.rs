//! How a layout is mapped ([`Access`]: [`ReadWrite`] or [`ReadOnly`]) and the words a
//! read-only mapping is made of ([`RoU32`], [`RoU64`]: load-only), with the sealed traits
//! ([`Word32`], [`Word64`]) that let the wait/wake protocols read either kind.

use super::sealed;
use core::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

/// How a layout is mapped: [`ReadWrite`] or [`ReadOnly`]. Sealed.
pub trait Access: sealed::Sealed + core::fmt::Debug + Send + Sync + 'static {
    /// Whether the mapping is writable.
    const WRITABLE: bool;
    /// A 32-bit field: [`AtomicU32`] when writable, [`RoU32`] when read-only.
    type U32: Word32 + core::fmt::Debug;
    /// A 64-bit field: [`AtomicU64`] when writable, [`RoU64`] when read-only.
    type U64: Word64 + core::fmt::Debug;
}

/// Mapped read-write: fields are atomics.
#[derive(Debug)]
pub enum ReadWrite {}

/// Mapped read-only: fields can only be loaded (relaxed).
#[derive(Debug)]
pub enum ReadOnly {}

impl sealed::Sealed for ReadWrite {}
impl sealed::Sealed for ReadOnly {}

impl Access for ReadWrite {
    const WRITABLE: bool = true;
    type U32 = AtomicU32;
    type U64 = AtomicU64;
}

impl Access for ReadOnly {
    const WRITABLE: bool = false;
    type U32 = RoU32;
    type U64 = RoU64;
}

/// A 32-bit word in shared memory that this side may only read.
#[repr(transparent)]
#[derive(Debug)]
pub struct RoU32(AtomicU32);

/// A 64-bit word in shared memory that this side may only read.
#[repr(transparent)]
#[derive(Debug)]
pub struct RoU64(AtomicU64);

impl RoU32 {
    /// Relaxed load (valid on read-only memory).
    #[inline]
    pub fn load(&self) -> u32 {
        self.0.load(Ordering::Relaxed)
    }

    /// Relaxed load followed by an acquire fence: what an acquire load would give, made of
    /// accesses that are valid on read-only memory.
    #[inline]
    pub fn load_acquire(&self) -> u32 {
        let v = self.0.load(Ordering::Relaxed);
        fence(Ordering::Acquire);
        v
    }
}

impl RoU64 {
    /// Relaxed load (valid on read-only memory).
    #[inline]
    pub fn load(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    /// Relaxed load followed by an acquire fence (see [`RoU32::load_acquire`]).
    #[inline]
    pub fn load_acquire(&self) -> u64 {
        let v = self.0.load(Ordering::Relaxed);
        fence(Ordering::Acquire);
        v
    }
}

/// A 32-bit shared word, writable ([`AtomicU32`]) or not ([`RoU32`]): what the wait/wake
/// protocols of [`crate::sync`] read. Sealed.
pub trait Word32: sealed::Sealed + Sync {
    /// Relaxed load.
    fn relaxed(&self) -> u32;
    /// The word as the futex syscalls take it. The syscalls only read it.
    #[doc(hidden)]
    fn futex(&self) -> &AtomicU32;
}

/// A 64-bit shared word, writable ([`AtomicU64`]) or not ([`RoU64`]). Sealed.
pub trait Word64: sealed::Sealed + Sync {
    /// Relaxed load.
    fn relaxed(&self) -> u64;
}

impl sealed::Sealed for AtomicU32 {}
impl sealed::Sealed for RoU32 {}
impl sealed::Sealed for AtomicU64 {}
impl sealed::Sealed for RoU64 {}

impl Word32 for AtomicU32 {
    #[inline]
    fn relaxed(&self) -> u32 {
        self.load(Ordering::Relaxed)
    }
    fn futex(&self) -> &AtomicU32 {
        self
    }
}

impl Word32 for RoU32 {
    #[inline]
    fn relaxed(&self) -> u32 {
        self.load()
    }
    fn futex(&self) -> &AtomicU32 {
        &self.0
    }
}

impl Word64 for AtomicU64 {
    #[inline]
    fn relaxed(&self) -> u64 {
        self.load(Ordering::Relaxed)
    }
}

impl Word64 for RoU64 {
    #[inline]
    fn relaxed(&self) -> u64 {
        self.load()
    }
}
