//! DOC: the platform layer: memfds, shared mappings, typed views, fd passing.
//!
//! Every shared object is a sealed memfd (it can neither shrink nor grow, so no mapper can
//! be made to fault by another process truncating it). A [`Mapping`] hands out typed
//! references only to [`Shared`] types: types made only of atomics, for which every bit
//! pattern is valid and any other process may write at any time.

use core::ptr::NonNull;
use core::sync::atomic::AtomicU64;
use rustix::fd::{AsFd, BorrowedFd, OwnedFd};
use rustix::fs::{MemfdFlags, SealFlags};
use rustix::io;
use rustix::mm::{MapFlags, ProtFlags};
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;

/// Marker for layouts that may be viewed in shared memory.
///
/// # Safety
/// The type must be `repr(C)`, contain only atomics (or arrays and structs of them), accept
/// every bit pattern, and have an alignment no larger than a page.
pub unsafe trait Shared: Sync {}

// SAFETY: each of these is repr(C) and made only of atomics (see layout.rs); the
// compile-time assertions there pin their sizes, and none is aligned beyond a page.
unsafe impl Shared for crate::layout::DoorbellPage {}
// SAFETY: as above.
unsafe impl Shared for crate::layout::RingHeader {}
// SAFETY: as above.
unsafe impl Shared for crate::layout::FenceState {}
// SAFETY: as above.
unsafe impl Shared for crate::layout::FenceWaiters {}
// SAFETY: as above.
unsafe impl Shared for crate::layout::DeviceStatus {}
// SAFETY: as above.
unsafe impl Shared for crate::layout::DeviceKick {}
// SAFETY: as above.
unsafe impl Shared for crate::layout::ControlRegion {}
// SAFETY: as above.
unsafe impl Shared for crate::layout::ObjectHeader {}
// SAFETY: a single atomic.
unsafe impl Shared for AtomicU64 {}
// SAFETY: a single atomic.
unsafe impl Shared for core::sync::atomic::AtomicU32 {}
// SAFETY: an array of atomics.
unsafe impl Shared for [AtomicU64; 8] {}

/// A shared mapping of a whole memfd, unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; all access goes through `Shared` types,
// which are made of atomics, so sharing the pointer across threads is sound.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `fd` from offset 0, shared, read-only or read-write.
    pub fn map(fd: BorrowedFd<'_>, len: usize, writable: bool) -> io::Result<Mapping> {
        if len == 0 {
            return Err(io::Errno::INVAL);
        }
        let st = rustix::fs::fstat(fd)?;
        if (st.st_size as u64) < len as u64 {
            return Err(io::Errno::INVAL);
        }
        let prot = if writable {
            ProtFlags::READ | ProtFlags::WRITE
        } else {
            ProtFlags::READ
        };
        // SAFETY: a fresh mapping at an address the kernel picks; it aliases no Rust
        // object. The file is at least `len` bytes and sealed against shrinking (or owned by
        // a trusted creator), so every byte of the mapping stays backed.
        let ptr =
            unsafe { rustix::mm::mmap(core::ptr::null_mut(), len, prot, MapFlags::SHARED, fd, 0)? };
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or(io::Errno::NOMEM)?;
        Ok(Mapping { ptr, len })
    }

    /// Maps the whole file.
    pub fn map_all(fd: BorrowedFd<'_>, writable: bool) -> io::Result<Mapping> {
        let st = rustix::fs::fstat(fd)?;
        Self::map(fd, st.st_size as usize, writable)
    }

    /// Length in bytes.
    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never: zero-length mappings are refused).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Base address, for byte copies that go through volatile or atomic accesses.
    #[inline]
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// A typed view of the object at `offset`, if it fits and is aligned.
    #[inline]
    pub fn get<T: Shared>(&self, offset: usize) -> Option<&T> {
        let end = offset.checked_add(core::mem::size_of::<T>())?;
        if end > self.len || offset % core::mem::align_of::<T>() != 0 {
            return None;
        }
        // SAFETY: in bounds and aligned (checked above; the base is page-aligned and T's
        // alignment is at most a page). T is `Shared`: only atomics, every bit pattern
        // valid, so a shared reference is sound while other processes write the memory.
        // The reference borrows `self`, so it cannot outlive the mapping.
        Some(unsafe { &*self.ptr.as_ptr().add(offset).cast::<T>() })
    }

    /// A typed slice of `count` objects starting at `offset`, if it fits and is aligned.
    #[inline]
    pub fn get_slice<T: Shared>(&self, offset: usize, count: usize) -> Option<&[T]> {
        let bytes = core::mem::size_of::<T>().checked_mul(count)?;
        let end = offset.checked_add(bytes)?;
        if end > self.len || offset % core::mem::align_of::<T>() != 0 {
            return None;
        }
        // SAFETY: as in `get`, for `count` consecutive objects.
        Some(unsafe {
            core::slice::from_raw_parts(self.ptr.as_ptr().add(offset).cast::<T>(), count)
        })
    }

    /// The object at offset 0. Panics if the mapping is too small, which the callers rule
    /// out by mapping at least the layout's size.
    #[inline]
    pub fn head<T: Shared>(&self) -> &T {
        self.get::<T>(0).expect("mapping smaller than its layout")
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` came from a successful mmap and are unmapped exactly once;
        // every reference into the mapping borrows `self`, so none outlives this.
        unsafe {
            let _ = rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// Why a shared object could not be mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    /// fstat or mmap failed, or the object is smaller than asked.
    #[error("cannot map object: {0}")]
    Io(#[from] io::Errno),
    /// The object is not of the expected kind or ABI version.
    #[error(transparent)]
    Header(#[from] crate::layout::HeaderError),
}

/// Maps `len` bytes of an object and checks its [`crate::layout::ObjectHeader`] against
/// `magic` and [`crate::ABI_VERSION`].
pub fn map_object(
    fd: BorrowedFd<'_>,
    len: usize,
    writable: bool,
    magic: u32,
) -> Result<Mapping, MapError> {
    let map = Mapping::map(fd, len, writable)?;
    map.head::<crate::layout::ObjectHeader>().check(magic)?;
    Ok(map)
}

/// Creates a memfd of `size` bytes (zero-filled), sealed against shrinking and growing,
/// and, with [`crate::shm::Sealing::Final`], against further seals.
pub fn create_memfd(name: &str, size: u64, sealing: crate::shm::Sealing) -> io::Result<OwnedFd> {
    let fd = rustix::fs::memfd_create(name, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)?;
    rustix::fs::ftruncate(&fd, size)?;
    let mut seals = SealFlags::SHRINK | SealFlags::GROW;
    if sealing == crate::shm::Sealing::Final {
        seals |= SealFlags::SEAL;
    }
    rustix::fs::fcntl_add_seals(&fd, seals)?;
    Ok(fd)
}

/// Creates a memfd of `size` bytes (zero-filled), sealed against shrinking, growing and
/// further seals, and maps it read-write. For objects clients may write.
pub fn create_object(name: &str, size: usize) -> io::Result<(OwnedFd, Mapping)> {
    let (fd, map) = create_firmware_object(name, size)?;
    rustix::fs::fcntl_add_seals(&fd, SealFlags::SEAL)?;
    Ok((fd, map))
}

/// Creates a memfd like [`create_object`] but leaves it open to one more seal: for objects
/// only kmd-shim and the firmware may write. Once both hold their writable mappings, call
/// [`seal_read_only`]; only then may the fd reach a client.
pub fn create_firmware_object(name: &str, size: usize) -> io::Result<(OwnedFd, Mapping)> {
    let fd = rustix::fs::memfd_create(name, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)?;
    rustix::fs::ftruncate(&fd, size as u64)?;
    rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW)?;
    let map = Mapping::map(fd.as_fd(), size, true)?;
    Ok((fd, map))
}

/// Forbids every *new* writable mapping of the object and every `write(2)`
/// (`F_SEAL_FUTURE_WRITE`), whatever descriptor or `/proc/self/fd` re-open is used;
/// existing writable mappings (kmd-shim's, the firmware's) keep working. Then seals the
/// seals.
pub fn seal_read_only(fd: BorrowedFd<'_>) -> io::Result<()> {
    rustix::fs::fcntl_add_seals(fd, SealFlags::FUTURE_WRITE | SealFlags::SEAL)
}

/// A new read-only open file description of the same object: whoever holds only this fd
/// cannot map the object writable.
pub fn reopen_read_only(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    use rustix::fd::AsRawFd;
    let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
    rustix::fs::open(
        path.as_str(),
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
}

/// Identity of the object behind an fd: (device, inode).
pub fn object_identity(fd: BorrowedFd<'_>) -> io::Result<(u64, u64)> {
    let st = rustix::fs::fstat(fd)?;
    Ok((st.st_dev, st.st_ino))
}

/// Sends one message with file descriptors attached.
pub fn send_with_fds(sock: BorrowedFd<'_>, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(4))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Errno::INVAL);
    }
    let iov = [IoSlice::new(bytes)];
    let n = rustix::net::sendmsg(sock, &iov, &mut control, SendFlags::NOSIGNAL)?;
    if n != bytes.len() {
        return Err(io::Errno::MSGSIZE);
    }
    Ok(())
}

/// One message received with [`recv_with_fds`].
#[derive(Debug)]
pub struct Received {
    /// Bytes of payload (0 with no fds means the peer closed the connection).
    pub len: usize,
    /// Descriptors attached (close-on-exec).
    pub fds: Vec<OwnedFd>,
    /// The payload or the descriptors did not fit and were cut.
    pub truncated: bool,
}

/// Receives one message and any descriptors attached to it (up to 4).
pub fn recv_with_fds(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Received> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(4))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = rustix::net::recvmsg(sock, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC)?;
    let mut fds = Vec::new();
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(it) = m {
            fds.extend(it);
        }
    }
    let truncated = msg
        .flags
        .intersects(ReturnFlags::TRUNC | ReturnFlags::CTRUNC);
    Ok(Received {
        len: msg.bytes,
        fds,
        truncated,
    })
}
