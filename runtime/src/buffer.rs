//! Buffers: memory in a context's device address space, also mapped into this process.

use crate::device::DeviceInner;
use rustix::fd::{AsFd, OwnedFd};
use std::marker::PhantomData;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use userq_uapi::ioctl::Request;
use userq_uapi::os::Mapping;

/// A buffer of `len` elements of `T`, visible to the device at
/// [`Buffer::device_address`] and to the host through the accessors.
///
/// The device may write the buffer at any time while work that names it runs, so host
/// access goes through single volatile copies ([`Buffer::read`], [`Buffer::to_vec`]) or
/// atomics ([`Buffer::atomic`] for `u64` words), never through references that another
/// writer could change underneath.
pub struct Buffer<T> {
    dev: Arc<DeviceInner>,
    va: u64,
    len: usize,
    map: Mapping,
    fd: OwnedFd,
    _t: PhantomData<T>,
}

impl<T> std::fmt::Debug for Buffer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Buffer")
            .field("device_address", &format_args!("{:#x}", self.va))
            .field("len", &self.len)
            .finish()
    }
}

impl<T: bytemuck::Pod> Buffer<T> {
    pub(crate) fn new(
        dev: Arc<DeviceInner>,
        va: u64,
        len: usize,
        map: Mapping,
        fd: OwnedFd,
    ) -> Self {
        debug_assert!(map.len() >= len * std::mem::size_of::<T>());
        Buffer {
            dev,
            va,
            len,
            map,
            fd,
            _t: PhantomData,
        }
    }

    /// Duplicates the buffer's descriptor for another process (or context) to
    /// [`crate::Device::import_buffer`]: both then map the same memory.
    pub fn export(&self) -> std::io::Result<ExportedBuffer> {
        Ok(ExportedBuffer {
            fd: self.fd.try_clone()?,
        })
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer has no elements (never: empty buffers are refused).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Device address of element 0.
    pub fn device_address(&self) -> u64 {
        self.va
    }

    /// Device address of element `index`, or `None` past the end.
    pub fn address_of(&self, index: usize) -> Option<u64> {
        (index < self.len).then(|| self.va + (index * std::mem::size_of::<T>()) as u64)
    }

    fn ptr(&self, index: usize) -> *mut T {
        assert!(
            index < self.len,
            "index {index} out of bounds for buffer of {}",
            self.len
        );
        // In bounds (asserted): the mapping holds at least `len` elements.
        self.map.as_ptr().cast::<T>().wrapping_add(index)
    }

    /// Reads element `index` with one volatile copy.
    pub fn read(&self, index: usize) -> T {
        let p = self.ptr(index);
        // SAFETY: `p` is in bounds and aligned (the mapping is page-aligned and `T: Pod`
        // sits at multiples of its size); every bit pattern is a valid `T: Pod`. Volatile:
        // the device may write this memory concurrently, so the compiler must copy it once.
        unsafe { p.read_volatile() }
    }

    /// Writes element `index` with one volatile store. Takes `&mut self`: two host threads
    /// writing one buffer at once would be a data race.
    pub fn write(&mut self, index: usize, value: T) {
        let p = self.ptr(index);
        // SAFETY: as in `read`; the mapping is writable and owned by this buffer.
        unsafe { p.write_volatile(value) }
    }

    /// Copies the whole buffer out.
    pub fn to_vec(&self) -> Vec<T> {
        (0..self.len).map(|i| self.read(i)).collect()
    }

    /// Copies `src` into the start of the buffer.
    pub fn copy_from_slice(&mut self, src: &[T]) {
        assert!(src.len() <= self.len, "source longer than the buffer");
        for (i, v) in src.iter().enumerate() {
            self.write(i, *v);
        }
    }
}

impl Buffer<u64> {
    /// Element `index` as an atomic, for values the device writes while the host polls.
    pub fn atomic(&self, index: usize) -> &AtomicU64 {
        assert!(
            index < self.len,
            "index {index} out of bounds for buffer of {}",
            self.len
        );
        self.map
            .get::<AtomicU64>(index * 8)
            .expect("in bounds and aligned")
    }
}

impl<T> Drop for Buffer<T> {
    fn drop(&mut self) {
        let _ = self.dev.call(Request::FreeBuffer { va: self.va }, &[]);
    }
}

/// A buffer in transit between contexts or processes: its memory object.
#[derive(Debug)]
pub struct ExportedBuffer {
    fd: OwnedFd,
}

impl ExportedBuffer {
    /// Rebuilds an exported buffer from a descriptor received from another process; the
    /// device checks at import that it really is one of its buffers.
    pub fn from_fd(fd: OwnedFd) -> Self {
        ExportedBuffer { fd }
    }

    /// The descriptor.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    /// Sends the buffer over a connected Unix socket (SCM_RIGHTS).
    pub fn send(&self, socket: impl AsFd) -> std::io::Result<()> {
        userq_uapi::os::send_with_fds(socket.as_fd(), b"userq-buffer", &[self.fd.as_fd()])
            .map_err(std::io::Error::from)
    }

    /// Receives a buffer sent with [`ExportedBuffer::send`].
    pub fn recv(socket: impl AsFd) -> std::io::Result<ExportedBuffer> {
        let mut buf = [0u8; 32];
        let got = userq_uapi::os::recv_with_fds(socket.as_fd(), &mut buf)
            .map_err(std::io::Error::from)?;
        let bad = || {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "not a userq buffer message",
            )
        };
        if &buf[..got.len] != b"userq-buffer" || got.truncated {
            return Err(bad());
        }
        let [fd] = <[OwnedFd; 1]>::try_from(got.fds).map_err(|_| bad())?;
        Ok(ExportedBuffer { fd })
    }
}
