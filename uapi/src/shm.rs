//! DOC: typed handles on shared memory.
//!
//! Every shared object is a sealed memfd mapped with `memmap2::MmapRaw` (raw pointers
//! only: never `Mmap`/`MmapMut`, which hand out `&[u8]` over memory that other processes
//! write). On top of it sit four handles, each checked **once**, when the object is
//! mapped; after that an access is a pointer dereference with no bounds check and no
//! `expect`:
//!
//! - [`Shm<T>`]: one object laid out as `T` (a [`Layout`]: a `repr(C)` struct of atomics
//!   that starts with an [`ObjectHeader`]). Mapping checks the size, the magic and the ABI
//!   version; the handle derefs to `&T`. The access is part of the type: the layouts that
//!   clients map read-only ([`FenceState`], [`DeviceStatus`]) take an [`Access`] parameter,
//!   and their `ReadOnly` form is made of [`RoU32`]/[`RoU64`], which can only be loaded, so
//!   a store to read-only memory does not compile.
//! - [`RingShm`]: a queue's ring, a [`RingHeader`](crate::layout::RingHeader) followed by
//!   its packet slots; the slot index is masked, so every index is in bounds. Its memory is
//!   allocated when it is created and the client's and the firmware's mappings of it are
//!   populated, so the submit path never page-faults.
//! - [`ShmBytes`]: the untyped bytes of a buffer, viewed as slices of atomics.
//! - [`ShmBytesRo`]: the same over a read-only mapping, viewed as load-only words (what
//!   `userq trace` reads of a profiled queue's records).
//!
//! Loads from read-only mappings are `Relaxed` (with a separate fence where ordering is
//! needed): the standard library documents relaxed loads of word size as valid on
//! read-only memory, and no stronger access is ever made there.

use crate::layout::{page_round_up, DeviceStatus, FenceState, HeaderError, ObjectHeader};
use crate::os::{self, MapError};
use core::marker::PhantomData;
use core::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, AtomicU8};
use memmap2::{MmapOptions, MmapRaw};
use rustix::fd::{AsFd, BorrowedFd, OwnedFd};
use rustix::io;

mod access;
mod ring;
pub use access::{Access, ReadOnly, ReadWrite, RoU32, RoU64, Word32, Word64};
pub use ring::{PacketSlot, RingShm};

pub(crate) mod sealed {
    /// Keeps the access traits closed to other crates.
    pub trait Sealed {}
}

/// A shared object's layout: what [`Shm`] maps.
///
/// # Safety
/// The type must be `repr(C)`, made only of atomics and [`RoU32`]/[`RoU64`] (so every bit
/// pattern is valid and any process may write it at any time), aligned to at most a page,
/// and start with an [`ObjectHeader`] at offset 0. `WRITABLE` must be false whenever a
/// field is a read-only word, so that such a layout is only ever mapped read-only.
pub unsafe trait Layout: Sync + Sized {
    /// The magic in its header ([`magic`](crate::layout::magic)).
    const MAGIC: u32;
    /// Whether it is mapped read-write.
    const WRITABLE: bool;
    /// Bytes of the object: the layout rounded up to whole pages.
    const SIZE: usize = page_round_up(core::mem::size_of::<Self>());
}

/// How a memfd kmd-shim creates is sealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sealing {
    /// Size and seals final: for objects clients may write.
    Final,
    /// Size final, one more seal allowed: for objects only kmd-shim and the firmware may
    /// write. Once both hold their writable mappings, [`os::seal_read_only`] makes every
    /// further mapping read-only; only then may the fd reach a client.
    FirmwareWritable,
}

/// When a mapping's pages are entered in the page tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fill {
    /// On first touch: each page's first access faults.
    Lazy,
    /// All of them now (`MAP_POPULATE`): no access to the mapping faults later.
    Populate,
}

fn map_raw(
    fd: BorrowedFd<'_>,
    len: usize,
    writable: bool,
    fill: Fill,
) -> Result<MmapRaw, MapError> {
    if len == 0 {
        return Err(MapError::Io(io::Errno::INVAL));
    }
    let st = rustix::fs::fstat(fd)?;
    if (st.st_size as u64) < len as u64 {
        return Err(MapError::Io(io::Errno::INVAL));
    }
    let mut opts = MmapOptions::new();
    opts.len(len);
    if fill == Fill::Populate {
        opts.populate();
    }
    let map = if writable {
        opts.map_raw(&fd)
    } else {
        opts.map_raw_read_only(&fd)
    };
    map.map_err(|e| MapError::Io(io::Errno::from_io_error(&e).unwrap_or(io::Errno::IO)))
}

/// The header at offset 0 of a mapping, for its one check at map time and its one
/// initialisation at creation.
fn header(map: &MmapRaw) -> &ObjectHeader {
    // SAFETY: every mapping passed here is at least a page (a layout's size, or a ring
    // object), page-aligned, and begins with an ObjectHeader, a repr(C) struct of atomics
    // for which every bit pattern is valid. On a read-only mapping only `check` is called,
    // which makes relaxed loads only: valid on read-only memory.
    unsafe { &*map.as_ptr().cast::<ObjectHeader>() }
}

fn check_header(map: &MmapRaw, want: u32) -> Result<(), HeaderError> {
    header(map).check(want)
}

/// One shared object of layout `T`, mapped whole; checked once at map time.
pub struct Shm<T: Layout> {
    map: MmapRaw,
    _t: PhantomData<T>,
}

// SAFETY: the mapping is plain shared memory reached only as `&T`, and `T: Sync` (atomics).
unsafe impl<T: Layout> Send for Shm<T> {}
// SAFETY: as above.
unsafe impl<T: Layout> Sync for Shm<T> {}

impl<T: Layout> core::fmt::Debug for Shm<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Shm")
            .field("layout", &core::any::type_name::<T>())
            .field("len", &self.map.len())
            .finish()
    }
}

impl<T: Layout> Shm<T> {
    /// Maps the object behind `fd` (read-write or read-only as `T` says) and checks its
    /// size, magic and ABI version.
    pub fn map(fd: BorrowedFd<'_>) -> Result<Shm<T>, MapError> {
        const { assert!(core::mem::align_of::<T>() <= crate::layout::PAGE_SIZE) };
        let map = map_raw(fd, T::SIZE, T::WRITABLE, Fill::Lazy)?;
        check_header(&map, T::MAGIC)?;
        Ok(Shm {
            map,
            _t: PhantomData,
        })
    }

    /// Creates the object: a zero-filled memfd of [`Layout::SIZE`] bytes sealed as
    /// `sealing` says, mapped read-write, its header written with `param` and `id`.
    pub fn create(
        name: &str,
        sealing: Sealing,
        param: u32,
        id: u64,
    ) -> io::Result<(OwnedFd, Shm<T>)> {
        const { assert!(T::WRITABLE, "only writable layouts are created") };
        let fd = os::create_memfd(name, T::SIZE as u64, sealing)?;
        let map = map_raw(fd.as_fd(), T::SIZE, true, Fill::Lazy).map_err(|_| io::Errno::NOMEM)?;
        header(&map).init(T::MAGIC, param, id);
        Ok((
            fd,
            Shm {
                map,
                _t: PhantomData,
            },
        ))
    }
}

impl<T: Layout> core::ops::Deref for Shm<T> {
    type Target = T;

    #[inline]
    fn deref(&self) -> &T {
        // SAFETY: the mapping is `T::SIZE >= size_of::<T>()` bytes, page-aligned (T's
        // alignment is at most a page, asserted in `map`), and T is a `Layout`: atomics
        // only, every bit pattern valid, so a shared reference is sound while other
        // processes write the memory. A read-only mapping is only ever a `T` whose fields
        // can only be loaded (`Layout::WRITABLE`). The reference borrows `self`, so it
        // cannot outlive the mapping.
        unsafe { &*self.map.as_ptr().cast::<T>() }
    }
}

macro_rules! read_only_view {
    ($ty:ident) => {
        impl $ty<ReadWrite> {
            /// The same object seen read-only: what a client that may not write it sees.
            #[inline]
            pub fn read_only(&self) -> &$ty<ReadOnly> {
                // SAFETY: `$ty<ReadOnly>` has the layout of `$ty<ReadWrite>` (RoU32/RoU64 are
                // repr(transparent) over the atomics; asserted in layout.rs), and a view that
                // can only load is weaker than the writable one it borrows from.
                unsafe { &*(self as *const Self).cast::<$ty<ReadOnly>>() }
            }
        }
    };
}

read_only_view!(FenceState);
read_only_view!(DeviceStatus);

/// An atomic integer a byte range can be viewed as ([`ShmBytes::atomics`]). Sealed.
pub trait AtomicInt: sealed::Sealed + Sync + Sized {}
impl sealed::Sealed for AtomicU8 {}
impl sealed::Sealed for AtomicU16 {}
impl AtomicInt for AtomicU8 {}
impl AtomicInt for AtomicU16 {}
impl AtomicInt for AtomicU32 {}
impl AtomicInt for AtomicU64 {}

/// The untyped bytes of a buffer, mapped read-write, seen only as atomics.
pub struct ShmBytes {
    map: MmapRaw,
}

// SAFETY: shared memory reached only through atomics.
unsafe impl Send for ShmBytes {}
// SAFETY: as above.
unsafe impl Sync for ShmBytes {}

impl core::fmt::Debug for ShmBytes {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ShmBytes")
            .field("len", &self.map.len())
            .finish()
    }
}

impl ShmBytes {
    /// Maps the first `len` bytes of `fd` read-write (the object must be at least that
    /// long; a sealed memfd cannot shrink afterwards).
    pub fn map(fd: BorrowedFd<'_>, len: usize) -> Result<ShmBytes, MapError> {
        Ok(ShmBytes {
            map: map_raw(fd, len, true, Fill::Lazy)?,
        })
    }

    /// [`ShmBytes::map`] with every page entered in the page tables now (`MAP_POPULATE`),
    /// for an object written on every packet (a queue's profile records) whose memory
    /// its creator committed ([`os::commit`]): no access to it faults later.
    pub fn map_resident(fd: BorrowedFd<'_>, len: usize) -> Result<ShmBytes, MapError> {
        Ok(ShmBytes {
            map: map_raw(fd, len, true, Fill::Populate)?,
        })
    }

    /// Length in bytes.
    #[inline]
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether it is empty (never: empty mappings are refused).
    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }

    /// `count` atomics of type `W` from byte `offset`, if they fit and are aligned.
    #[inline]
    pub fn atomics<W: AtomicInt>(&self, offset: usize, count: usize) -> Option<&[W]> {
        let bytes = core::mem::size_of::<W>().checked_mul(count)?;
        let end = offset.checked_add(bytes)?;
        if end > self.map.len() || offset % core::mem::align_of::<W>() != 0 {
            return None;
        }
        // SAFETY: in bounds and aligned (checked above; the base is page-aligned). `W` is
        // an atomic integer: every bit pattern valid, shared access sound while others
        // write. The slice borrows `self`, so it cannot outlive the mapping.
        Some(unsafe {
            core::slice::from_raw_parts(self.map.as_ptr().add(offset).cast::<W>(), count)
        })
    }

    /// The 32-bit word at byte `offset`, if it fits and is aligned.
    #[inline]
    pub fn word32(&self, offset: usize) -> Option<&AtomicU32> {
        self.atomics::<AtomicU32>(offset, 1).map(|s| &s[0])
    }

    /// The 64-bit word at byte `offset`, if it fits and is aligned.
    #[inline]
    pub fn word64(&self, offset: usize) -> Option<&AtomicU64> {
        self.atomics::<AtomicU64>(offset, 1).map(|s| &s[0])
    }
}

/// Bytes of shared memory this side may only read (another process's object, mapped
/// `PROT_READ`): its words are load-only ([`RoU32`]/[`RoU64`]), so a store does not
/// compile.
pub struct ShmBytesRo {
    map: MmapRaw,
}

impl core::fmt::Debug for ShmBytesRo {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ShmBytesRo")
            .field("len", &self.map.len())
            .finish()
    }
}

impl ShmBytesRo {
    /// Maps the first `len` bytes of `fd` read-only.
    pub fn map(fd: BorrowedFd<'_>, len: usize) -> Result<ShmBytesRo, MapError> {
        Ok(ShmBytesRo {
            map: map_raw(fd, len, false, Fill::Lazy)?,
        })
    }

    /// `count` 64-bit words from byte `offset`, if they fit and are aligned.
    pub fn words64(&self, offset: usize, count: usize) -> Option<&[RoU64]> {
        let end = offset.checked_add(count.checked_mul(8)?)?;
        if end > self.map.len() || offset % 8 != 0 {
            return None;
        }
        // SAFETY: in bounds and aligned (checked; the base is page-aligned). `RoU64` is a
        // transparent `AtomicU64` with loads only, valid on read-only memory; the slice
        // borrows `self`.
        Some(unsafe {
            core::slice::from_raw_parts(self.map.as_ptr().add(offset).cast::<RoU64>(), count)
        })
    }

    /// The 32-bit word at byte `offset`, if it fits and is aligned.
    pub fn word32(&self, offset: usize) -> Option<&RoU32> {
        if offset.checked_add(4)? > self.map.len() || offset % 4 != 0 {
            return None;
        }
        // SAFETY: as in `words64`, for one `RoU32`.
        Some(unsafe { &*self.map.as_ptr().add(offset).cast::<RoU32>() })
    }
}

/// Checks that a layout's read-only form is its writable form with loads only.
macro_rules! same_layout {
    ($($ty:ident),*) => {
        const _: () = {
            $(
                assert!(core::mem::size_of::<$ty<ReadOnly>>() == core::mem::size_of::<$ty<ReadWrite>>());
                assert!(core::mem::align_of::<$ty<ReadOnly>>() == core::mem::align_of::<$ty<ReadWrite>>());
            )*
        };
    };
}

same_layout!(FenceState, DeviceStatus);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{DeviceKick, FenceWaiters, ABI_VERSION};
    use core::sync::atomic::Ordering;

    #[test]
    fn typed_objects_check_magic_abi_and_size_once() {
        let (fd, kick) = Shm::<DeviceKick>::create("t", Sealing::Final, 0, 7).unwrap();
        kick.kick.word.store(5, Ordering::Relaxed);
        let again = Shm::<DeviceKick>::map(fd.as_fd()).unwrap();
        assert_eq!(again.kick.word.load(Ordering::Relaxed), 5);
        assert!(matches!(
            Shm::<FenceWaiters>::map(fd.as_fd()),
            Err(MapError::Header(HeaderError::BadMagic { .. }))
        ));
        header(&kick.map)
            .abi_version
            .store(ABI_VERSION + 1, Ordering::Relaxed);
        assert!(matches!(
            Shm::<DeviceKick>::map(fd.as_fd()),
            Err(MapError::Header(HeaderError::AbiMismatch { .. }))
        ));
    }

    #[test]
    fn read_only_views_see_the_writer() {
        let (fd, st) = Shm::<FenceState>::create("t", Sealing::FirmwareWritable, 2, 1).unwrap();
        os::seal_read_only(fd.as_fd()).unwrap();
        let ro = Shm::<FenceState<ReadOnly>>::map(fd.as_fd()).unwrap();
        assert!(
            Shm::<FenceState>::map(fd.as_fd()).is_err(),
            "sealed read-only"
        );
        st.slot.value.store(9, Ordering::Release);
        assert_eq!(ro.slot.value.load_acquire(), 9);
        assert_eq!(st.read_only().slot.value.load(), 9);
    }
}
