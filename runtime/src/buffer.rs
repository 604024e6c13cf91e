//! Buffers: memory in a context's device address space, also mapped into this process.

use crate::device::DeviceInner;
use rustix::fd::{AsFd, OwnedFd};
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::Arc;
use userq_uapi::ioctl::Request;
use userq_uapi::shm::{AtomicInt, ShmBytes};

/// A buffer of `len` elements of `T`, visible to the device at
/// [`Buffer::device_address`] and to the host through the accessors.
///
/// The device (an engine thread, in this process or another) may write the buffer at any
/// time while work that names it runs, so every host access is atomic: an element is
/// copied with relaxed atomic loads or stores of the widest integer its alignment allows
/// (as the firmware's kernels access it: 32- and 64-bit words), never through references
/// that another writer could change underneath. Ordering with the device comes from the
/// fences: waiting for a fence point acquires what the packets before it wrote.
///
/// **On-demand buffers** ([`crate::Device::alloc_on_demand`]) have no device memory until a
/// kernel touches them: each device page is faulted in when a workgroup needs it and may
/// be evicted back to host memory under pressure. What is mapped here is the host copy.
/// The coherence rule, as for CUDA/HIP managed memory: every host access ([`Buffer::read`],
/// [`Buffer::write`], [`Buffer::to_vec`], [`Buffer::copy_from_slice`]) first migrates the
/// pages it touches back to host memory ([`Buffer::migrate_to_host`]), so the host never
/// reads stale data; [`Buffer::prefetch`] moves pages to the device ahead of a kernel. Do
/// not access a range from the host while a kernel that uses it runs (wait for its fence
/// first): the device would keep computing on its own copy.
///
/// Commands built from a buffer (the launchers of [`crate::kernels`], or
/// [`crate::Command::holding`]) hold its memory: dropping the `Buffer` while such a command
/// is pending frees the memory only once the command's packet has completed.
pub struct Buffer<T> {
    memory: Arc<BufferMemory>,
    len: usize,
    _t: PhantomData<T>,
}

/// A buffer's memory in the device and in this process: freed (FREE_BUFFER) when the
/// [`Buffer`] and every command holding it are gone.
pub(crate) struct BufferMemory {
    dev: Arc<DeviceInner>,
    va: u64,
    map: ShmBytes,
    fd: OwnedFd,
    /// An on-demand buffer: `map` is its host copy, and device pages come and go.
    on_demand: bool,
}

impl std::fmt::Debug for BufferMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BufferMemory")
            .field("device_address", &format_args!("{:#x}", self.va))
            .field("bytes", &self.map.len())
            .finish()
    }
}

impl Drop for BufferMemory {
    fn drop(&mut self) {
        let _ = self.dev.call(Request::FreeBuffer { va: self.va }, &[]);
    }
}

impl<T> std::fmt::Debug for Buffer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Buffer")
            .field("device_address", &format_args!("{:#x}", self.memory.va))
            .field("len", &self.len)
            .finish()
    }
}

impl<T: bytemuck::Pod> Buffer<T> {
    pub(crate) fn new(
        dev: Arc<DeviceInner>,
        va: u64,
        len: usize,
        map: ShmBytes,
        fd: OwnedFd,
    ) -> Self {
        Self::with_kind(dev, va, len, map, fd, false)
    }

    pub(crate) fn with_kind(
        dev: Arc<DeviceInner>,
        va: u64,
        len: usize,
        map: ShmBytes,
        fd: OwnedFd,
        on_demand: bool,
    ) -> Self {
        debug_assert!(map.len() >= len * std::mem::size_of::<T>());
        Buffer {
            memory: Arc::new(BufferMemory {
                dev,
                va,
                map,
                fd,
                on_demand,
            }),
            len,
            _t: PhantomData,
        }
    }

    /// Whether this is an on-demand buffer.
    pub fn is_on_demand(&self) -> bool {
        self.memory.on_demand
    }

    /// Moves elements `range` of an on-demand buffer to host memory: their device pages
    /// are invalidated (running workgroups leave them at their next checkpoint), copied
    /// back and released. Nothing to do for an ordinary buffer.
    pub fn migrate_to_host(
        &self,
        range: std::ops::Range<usize>,
    ) -> Result<(), crate::error::ControlError> {
        self.migrate(range, userq_uapi::paging::MigrateTo::Host)
    }

    /// Moves elements `range` of an on-demand buffer into device memory now (a
    /// prefetch), so that kernels do not fault on them (until they are evicted).
    pub fn prefetch(
        &self,
        range: std::ops::Range<usize>,
    ) -> Result<(), crate::error::ControlError> {
        self.migrate(range, userq_uapi::paging::MigrateTo::Device)
    }

    fn migrate(
        &self,
        range: std::ops::Range<usize>,
        to: userq_uapi::paging::MigrateTo,
    ) -> Result<(), crate::error::ControlError> {
        let size = std::mem::size_of::<T>() as u64;
        let end = range.end.min(self.len);
        if !self.memory.on_demand || range.start >= end {
            return Ok(());
        }
        self.memory
            .dev
            .call(
                Request::Migrate {
                    va: self.memory.va + range.start as u64 * size,
                    len: (end - range.start) as u64 * size,
                    to,
                },
                &[],
            )
            .map(|_| ())
    }

    /// The host copy of an on-demand buffer is made current for `range` before a host
    /// access. If the device is gone, the host copy is all there is.
    fn host_access(&self, range: std::ops::Range<usize>) {
        if self.memory.on_demand {
            let _ = self.migrate_to_host(range);
        }
    }

    /// Duplicates the buffer's descriptor for another process (or context) to
    /// [`crate::Device::import_buffer`]: both then map the same memory.
    pub fn export(&self) -> std::io::Result<ExportedBuffer> {
        Ok(ExportedBuffer {
            fd: self.memory.fd.try_clone()?,
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
        self.memory.va
    }

    /// Device address of element `index`, or `None` past the end.
    pub fn address_of(&self, index: usize) -> Option<u64> {
        (index < self.len).then(|| self.memory.va + (index * std::mem::size_of::<T>()) as u64)
    }

    fn check_index(&self, index: usize) {
        assert!(
            index < self.len,
            "index {index} out of bounds for buffer of {}",
            self.len
        );
    }

    /// Reads element `index` (atomically, word by word; see the type's docs).
    pub fn read(&self, index: usize) -> T {
        self.check_index(index);
        self.host_access(index..index + 1);
        self.read_host(index)
    }

    fn read_host(&self, index: usize) -> T {
        let mut out = T::zeroed();
        let bytes = bytemuck::bytes_of_mut(&mut out);
        let offset = index * std::mem::size_of::<T>();
        match chunk_of::<T>() {
            8 => load_into::<AtomicU64, 8>(&self.memory.map, offset, bytes, |a| {
                a.load(Relaxed).to_ne_bytes()
            }),
            4 => load_into::<AtomicU32, 4>(&self.memory.map, offset, bytes, |a| {
                a.load(Relaxed).to_ne_bytes()
            }),
            2 => load_into::<AtomicU16, 2>(&self.memory.map, offset, bytes, |a| {
                a.load(Relaxed).to_ne_bytes()
            }),
            _ => load_into::<AtomicU8, 1>(&self.memory.map, offset, bytes, |a| {
                a.load(Relaxed).to_ne_bytes()
            }),
        }
        out
    }

    /// Writes element `index` (atomically, word by word). Takes `&mut self`: the host side
    /// of a buffer has one writer at a time.
    pub fn write(&mut self, index: usize, value: T) {
        self.check_index(index);
        self.host_access(index..index + 1);
        self.write_host(index, value);
    }

    fn write_host(&mut self, index: usize, value: T) {
        let bytes = bytemuck::bytes_of(&value);
        let offset = index * std::mem::size_of::<T>();
        match chunk_of::<T>() {
            8 => store_from::<AtomicU64, 8>(&self.memory.map, offset, bytes, |a, b| {
                a.store(u64::from_ne_bytes(b), Relaxed)
            }),
            4 => store_from::<AtomicU32, 4>(&self.memory.map, offset, bytes, |a, b| {
                a.store(u32::from_ne_bytes(b), Relaxed)
            }),
            2 => store_from::<AtomicU16, 2>(&self.memory.map, offset, bytes, |a, b| {
                a.store(u16::from_ne_bytes(b), Relaxed)
            }),
            _ => store_from::<AtomicU8, 1>(&self.memory.map, offset, bytes, |a, b| {
                a.store(u8::from_ne_bytes(b), Relaxed)
            }),
        }
    }

    /// Copies the whole buffer out.
    pub fn to_vec(&self) -> Vec<T> {
        self.host_access(0..self.len);
        (0..self.len).map(|i| self.read_host(i)).collect()
    }

    /// Copies `src` into the start of the buffer.
    pub fn copy_from_slice(&mut self, src: &[T]) {
        assert!(src.len() <= self.len, "source longer than the buffer");
        self.host_access(0..src.len());
        for (i, v) in src.iter().enumerate() {
            self.write_host(i, *v);
        }
    }
}

impl Buffer<u64> {
    /// Element `index` as an atomic, for values the device writes while the host polls.
    /// Ordinary buffers only: an on-demand buffer's device copy is elsewhere (panics).
    pub fn atomic(&self, index: usize) -> &AtomicU64 {
        assert!(
            !self.memory.on_demand,
            "Buffer::atomic on an on-demand buffer"
        );
        assert!(
            index < self.len,
            "index {index} out of bounds for buffer of {}",
            self.len
        );
        self.memory
            .map
            .word64(index * 8)
            .expect("in bounds (asserted) and aligned (page-aligned base)")
    }
}

/// The width in bytes of the atomics one element of `T` is copied with: the widest integer
/// (up to 8 bytes) that divides both its size and its alignment, so every element starts
/// on a chunk boundary.
fn chunk_of<T>() -> usize {
    let (size, align) = (std::mem::size_of::<T>(), std::mem::align_of::<T>());
    [8, 4, 2]
        .into_iter()
        .find(|&w| size % w == 0 && align % w == 0)
        .unwrap_or(1)
}

/// Copies the element at byte `offset` out of `map` into `out`, one `W` (of `N` bytes) at a
/// time.
fn load_into<W: AtomicInt, const N: usize>(
    map: &ShmBytes,
    offset: usize,
    out: &mut [u8],
    load: impl Fn(&W) -> [u8; N],
) {
    let words = map
        .atomics::<W>(offset, out.len() / N)
        .expect("element inside the mapping and aligned to its chunk");
    for (chunk, w) in out.chunks_exact_mut(N).zip(words) {
        chunk.copy_from_slice(&load(w));
    }
}

/// Copies `src` into the element at byte `offset` of `map`, one `W` at a time.
fn store_from<W: AtomicInt, const N: usize>(
    map: &ShmBytes,
    offset: usize,
    src: &[u8],
    store: impl Fn(&W, [u8; N]),
) {
    let words = map
        .atomics::<W>(offset, src.len() / N)
        .expect("element inside the mapping and aligned to its chunk");
    for (chunk, w) in src.chunks_exact(N).zip(words) {
        store(w, chunk.try_into().expect("chunks_exact gives N bytes"));
    }
}

impl<T> Buffer<T> {
    /// A hold on the buffer's memory, for a command that names it.
    pub(crate) fn hold(&self) -> Arc<BufferMemory> {
        self.memory.clone()
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
