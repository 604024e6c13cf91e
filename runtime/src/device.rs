//! A connection to a userq device, one context: what it opens and creates (the state its
//! objects share, and the exchange on the control socket, are in `inner`).

use crate::embedded;
use crate::error::{AllocError, ControlError, FenceError, OpenError, QueueCreateError};
use crate::{Buffer, ExportedBuffer, ExportedFence, Fence, Queue, QueueBuilder};
use rustix::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use userq_uapi::ioctl::{BufferReply, CreateFenceReply, ImportFenceReply, Reply, Request};
use userq_uapi::layout::FenceKind;
use userq_uapi::shm::ShmBytes;
use userq_uapi::KmdStatus;

mod builder;
mod inner;
pub use builder::{default_socket_path, DeviceBuilder, OpenMode, DEFAULT_CONTROL_TIMEOUT};
pub(crate) use inner::DeviceInner;

/// A connection to a userq device, with its own context: its own queues, fences, buffers
/// and device address space. Cheap to clone; every clone is the same context.
///
/// Dropping the last clone (and every queue, fence and buffer made from it) closes the
/// context, and kmd-shim reclaims everything it owned.
#[derive(Clone)]
pub struct Device {
    pub(crate) inner: Arc<DeviceInner>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("context", &self.inner.ctx)
            .field("socket", &self.inner.socket)
            .field("embedded", &self.inner.embedded.is_some())
            .finish()
    }
}

impl Device {
    /// A builder for choosing the socket and how to find the device.
    pub fn builder() -> DeviceBuilder {
        DeviceBuilder::default()
    }

    /// Opens the default device: `$USERQ_DEVICE` if set (it must be running), else the
    /// default socket if a device serves it, else a new embedded device serving it.
    pub fn open_default() -> Result<Device, OpenError> {
        DeviceBuilder::default().open()
    }

    /// Connects to the device serving `socket` (with the default
    /// [`DeviceBuilder::control_timeout`]).
    pub fn connect(socket: impl AsRef<Path>) -> Result<Device, OpenError> {
        Device::attach(socket.as_ref(), None, DEFAULT_CONTROL_TIMEOUT)
    }

    fn attach(
        path: &Path,
        embedded: Option<embedded::Host>,
        timeout: std::time::Duration,
    ) -> Result<Device, OpenError> {
        Ok(Device {
            inner: Arc::new(DeviceInner::open(path, embedded, timeout)?),
        })
    }

    /// This connection's context id.
    pub fn context_id(&self) -> u32 {
        self.inner.ctx
    }

    /// The device generation this context was opened on.
    pub fn generation(&self) -> u64 {
        self.inner.generation
    }

    /// The socket this device is reached through.
    pub fn socket_path(&self) -> &Path {
        &self.inner.socket
    }

    /// Whether this process runs the device (embedded mode).
    pub fn is_embedded(&self) -> bool {
        self.inner.embedded.is_some()
    }

    /// Whether the device was lost (firmware died or the device stopped).
    pub fn is_lost(&self) -> bool {
        self.inner.is_lost()
    }

    /// The CPU the firmware's command processor last ran on, if it has said: a hint for
    /// placing threads. A thread there competes with it for the CPU: an adaptive wait there
    /// sleeps instead of spinning, a spin wait holds it off (see
    /// [`WaitMode`](crate::WaitMode)).
    pub fn firmware_cpu(&self) -> Option<u32> {
        self.inner.firmware_cpu()
    }

    /// How many jobs on this device wait for a page fault's reply from kmd-shim (any
    /// context's): the firmware's count, stored when it changes; jobs of queues reset,
    /// destroyed or unmapped meanwhile leave it after kmd-shim's request. While a job of
    /// this context waits so, this context's spinning waits give their CPU up once per
    /// burst of checks, so that kmd-shim's event and pager threads, which the fault needs,
    /// are not queued behind them.
    pub fn faults_in_service(&self) -> u32 {
        self.inner.status.health.faults_in_service.load()
    }

    /// Whether a job of this context waits for a page fault's reply from kmd-shim (or of
    /// a context sharing its bit, `id % 64`, in the device status): while it does, this
    /// context's spinning waits give their CPU up once per burst of checks.
    pub fn context_fault_in_service(&self) -> bool {
        self.inner.context_faulting()
    }

    /// How many times the firmware has announced a sleep (its NEED_WAKEUP flag) since it
    /// started. With [`Queue::firmware_wakes`](crate::Queue::firmware_wakes):
    /// a queue's doorbells wake each sleep at most once.
    pub fn firmware_sleeps(&self) -> u64 {
        self.inner.status.sleep.sleeps.load()
    }

    /// How many futex wakes of a sleeping firmware this connection's host signals
    /// ([`Fence::signal`](crate::Fence::signal), [`Fence::set`](crate::Fence::set)) made:
    /// only signals of fences that queues are parked on wake it, and a thread signalling
    /// on its own wakes each firmware sleep ([`Device::firmware_sleeps`]) at most once, as
    /// a queue's doorbells do (threads racing may each make one).
    pub fn firmware_wakes(&self) -> u64 {
        self.inner
            .signal_wakes
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A builder for a new queue.
    pub fn queue(&self) -> QueueBuilder<'_> {
        QueueBuilder::new(self)
    }

    /// Creates a queue with the default ring size and priority.
    pub fn create_queue(&self) -> Result<Queue, QueueCreateError> {
        self.queue().create()
    }

    /// Creates a user fence with an initial value. Any holder may signal it, from the host
    /// or from a queue; it can be exported to other processes.
    pub fn create_fence(&self, initial: u64) -> Result<Fence, FenceError> {
        let (v, fds) = self.inner.call(Request::CreateFence { initial }, &[])?;
        let reply =
            CreateFenceReply::decode(&v).map_err(|e| ControlError::Protocol(e.describe()))?;
        let [state, waiters] = <[OwnedFd; 2]>::try_from(fds)
            .map_err(|_| ControlError::Protocol("CREATE_FENCE returned the wrong fds"))?;
        Fence::from_parts(
            &self.inner,
            reply.handle.0,
            FenceKind::User,
            reply.waiter,
            state,
            waiters,
        )
    }

    /// Imports a fence another context exported (possibly from another process).
    pub fn import_fence(&self, exported: ExportedFence) -> Result<Fence, FenceError> {
        let (state, waiters) = exported.into_fds();
        let r = self
            .inner
            .call(Request::ImportFence, &[state.as_fd(), waiters.as_fd()]);
        let v = match r {
            Ok((v, _)) => v,
            Err(ControlError::Rejected(KmdStatus::BadFd)) => return Err(FenceError::NotAFence),
            Err(e) => return Err(e.into()),
        };
        let reply =
            ImportFenceReply::decode(&v).map_err(|e| ControlError::Protocol(e.describe()))?;
        Fence::from_parts(
            &self.inner,
            reply.handle.0,
            reply.kind,
            reply.waiter,
            state,
            waiters,
        )
    }

    /// Allocates a buffer of `len` elements of `T`, zero-filled, mapped both into this
    /// context's device address space and into this process.
    pub fn alloc<T: bytemuck::Pod>(&self, len: usize) -> Result<Buffer<T>, AllocError> {
        let bytes = len
            .checked_mul(std::mem::size_of::<T>())
            .filter(|&b| b > 0)
            .ok_or(AllocError::BadSize)?;
        self.alloc_with(len, bytes, 0)
    }

    /// Allocates an on-demand buffer of `len` elements of `T`, zero-filled: it occupies no
    /// device memory until a kernel touches it; pages fault in, and are evicted back to
    /// host memory when the device-memory budget is full (see [`Buffer`] for the host
    /// coherence rule). Its host copy is mapped into this process.
    pub fn alloc_on_demand<T: bytemuck::Pod>(&self, len: usize) -> Result<Buffer<T>, AllocError> {
        let bytes = len
            .checked_mul(std::mem::size_of::<T>())
            .filter(|&b| b > 0)
            .ok_or(AllocError::BadSize)?;
        self.alloc_with(len, bytes, userq_uapi::paging::ON_DEMAND)
    }

    /// The device's paging counters (faults, batches, pages moved, evictions, residency).
    pub fn paging_stats(&self) -> Result<userq_uapi::paging::PagingStats, ControlError> {
        let mut parts = [[0u64; 6]; 2];
        for (part, out) in parts.iter_mut().enumerate() {
            let (v, _) = self
                .inner
                .call(Request::PagingStats { part: part as u32 }, &[])?;
            *out = userq_uapi::ioctl::PagingStatsReply::decode(&v)
                .map_err(|e| ControlError::Protocol(e.describe()))?
                .0;
        }
        Ok(userq_uapi::paging::PagingStats::from_parts(parts))
    }

    fn alloc_with<T: bytemuck::Pod>(
        &self,
        len: usize,
        bytes: usize,
        flags: u64,
    ) -> Result<Buffer<T>, AllocError> {
        let r = self.inner.call(
            Request::AllocBuffer {
                size: bytes as u64,
                flags,
            },
            &[],
        );
        let (v, fds) = match r {
            Ok(x) => x,
            Err(ControlError::Rejected(KmdStatus::OutOfMemory)) => {
                return Err(AllocError::OutOfMemory)
            }
            Err(ControlError::Rejected(KmdStatus::InvalidArgument)) => {
                return Err(AllocError::BadSize)
            }
            Err(e) => return Err(e.into()),
        };
        let [fd] = <[OwnedFd; 1]>::try_from(fds)
            .map_err(|_| ControlError::Protocol("ALLOC_BUFFER returned the wrong fds"))?;
        let reply = BufferReply::decode(&v).map_err(|e| ControlError::Protocol(e.describe()))?;
        let map = ShmBytes::map(fd.as_fd(), reply.size as usize).map_err(ControlError::from)?;
        Ok(Buffer::with_kind(
            self.inner.clone(),
            reply.va,
            len,
            map,
            fd,
            flags & userq_uapi::paging::ON_DEMAND != 0,
        ))
    }

    /// Maps a buffer another context exported (possibly in another process) into this
    /// context's device address space and this process: both see the same memory. Its
    /// length is the exported size in elements of `T`. The buffer must still be mapped
    /// somewhere (by its exporter or another importer) when the import arrives; the
    /// memory lives, and stays charged to the device budget, until its last mapping goes.
    pub fn import_buffer<T: bytemuck::Pod>(
        &self,
        exported: ExportedBuffer,
    ) -> Result<Buffer<T>, AllocError> {
        let fd = exported.into_fd();
        let r = self.inner.call(Request::ImportBuffer, &[fd.as_fd()]);
        let v = match r {
            Ok((v, _)) => v,
            Err(ControlError::Rejected(KmdStatus::BadFd)) => return Err(AllocError::NotABuffer),
            Err(e) => return Err(e.into()),
        };
        let reply = BufferReply::decode(&v).map_err(|e| ControlError::Protocol(e.describe()))?;
        let size = reply.size as usize;
        let elem = std::mem::size_of::<T>().max(1);
        if size % elem != 0 {
            let _ = self.inner.call(Request::FreeBuffer { va: reply.va }, &[]);
            return Err(AllocError::BadSize);
        }
        let map = match ShmBytes::map(fd.as_fd(), size) {
            Ok(m) => m,
            Err(e) => {
                // Give the mapping back: nobody else knows its address.
                let _ = self.inner.call(Request::FreeBuffer { va: reply.va }, &[]);
                return Err(ControlError::Map(e).into());
            }
        };
        Ok(Buffer::new(
            self.inner.clone(),
            reply.va,
            size / elem,
            map,
            fd,
        ))
    }
}
