//! A connection to a userq device: one context, its doorbell page, and the control socket.

use crate::embedded;
use crate::error::{AllocError, ControlError, FenceError, OpenError, QueueCreateError};
use crate::{Buffer, ExportedBuffer, ExportedFence, Fence, Queue, QueueBuilder};
use rustix::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use userq_uapi::ioctl::{
    BufferReply, CreateFenceReply, ImportFenceReply, OpenContextReply, RawReply, Reply, Request,
    MESSAGE_SIZE,
};
use userq_uapi::layout::ContextWaiters;
use userq_uapi::layout::{DeviceKick, DeviceState, DeviceStatus, DoorbellPage, FenceKind};
use userq_uapi::os;
use userq_uapi::shm::{ReadOnly, Shm, ShmBytes};
use userq_uapi::{KmdStatus, ABI_VERSION};

mod builder;
pub use builder::{default_socket_path, DeviceBuilder, OpenMode};

/// How long after a host signal woke the sleeping firmware an adaptive wait for a queue
/// timeline of the device sleeps at once instead of spinning: an adaptive wait's own
/// spin-and-yield horizon. The woken firmware is often queued on the signaller's vCPU,
/// and a waiter spinning or yielding there holds it off (yields do not hand the CPU over
/// under EEVDF).
pub(crate) const COLD_SIGNAL_WINDOW_NS: u64 = crate::wait::ADAPTIVE_YIELD_UNTIL.as_nanos() as u64;

/// The state every object of one connection shares.
pub(crate) struct DeviceInner {
    control: Mutex<OwnedFd>,
    pub(crate) ctx: u32,
    generation: u64,
    pub(crate) doorbells: Shm<DoorbellPage>,
    /// Written only by the firmware and kmd-shim: mapped read-only.
    pub(crate) status: Shm<DeviceStatus<ReadOnly>>,
    pub(crate) kick: Shm<DeviceKick>,
    /// This context's waiter counts, one per fence it holds (see `Fence` waits).
    pub(crate) waiters: Shm<ContextWaiters>,
    /// This process is registered for the firmware's membarrier, so its queues may use the
    /// doorbell fast path (see `userq_uapi::layout::RingPoll`).
    pub(crate) fast_doorbell: bool,
    /// The control socket hung up: whoever served the device is gone.
    gone: std::sync::atomic::AtomicBool,
    /// When (monotonic ns) a host signal from this connection last woke the sleeping
    /// firmware for queues parked on the fence; 0: not within [`COLD_SIGNAL_WINDOW_NS`].
    signal_woke_ns: std::sync::atomic::AtomicU64,
    /// The number of the firmware sleep a host signal of this connection last woke (see
    /// [`DeviceInner::wake_firmware_for_parked_queues`]).
    woken_sleep: std::sync::atomic::AtomicU64,
    /// Futex wakes of the firmware made by this connection's host signals.
    signal_wakes: std::sync::atomic::AtomicU64,
    socket: PathBuf,
    /// Keeps an embedded device alive while this process uses it. Declared last: it is
    /// dropped after the control socket closes, so the device reclaims this context first.
    embedded: Option<embedded::Host>,
}

impl DeviceInner {
    /// One request/reply exchange on the control socket.
    pub(crate) fn call(
        &self,
        req: Request,
        fds: &[BorrowedFd<'_>],
    ) -> Result<([u64; 7], Vec<OwnedFd>), ControlError> {
        let sock = self.control.lock().unwrap_or_else(|e| e.into_inner());
        exchange(&sock, req, fds)
    }

    /// After a host signal of a fence queues are parked on: wakes the firmware if it
    /// announced its sleep, so that it looks, and if the wake found it asleep, notes the
    /// time: those queues' completions are a wake-up away
    /// ([`DeviceInner::signal_woke_firmware_recently`]).
    ///
    /// Once per firmware sleep, as a queue's doorbell does (`sync::ring_doorbell`): a
    /// stream of signals while the woken firmware has not run yet makes one wake, not one
    /// each (threads racing may each make one).
    pub(crate) fn wake_firmware_for_parked_queues(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        let sleep = &self.status.sleep;
        let seen = self.woken_sleep.load(Relaxed);
        let mut woken = seen;
        let rung = userq_uapi::sync::wake_once_if_announced(
            (&sleep.sleeping, &sleep.word_before),
            &self.kick.kick.word,
            &mut woken,
        );
        // Threads racing here at most each make a wake: the memory only saves syscalls.
        // Written only when it changed: no shared store per signal while nothing sleeps.
        if woken != seen {
            self.woken_sleep.store(woken, Relaxed);
        }
        let userq_uapi::sync::Doorbell::Woke(n) = rung else {
            return;
        };
        self.signal_wakes.fetch_add(1, Relaxed);
        if n == 0 {
            return;
        }
        let now = userq_uapi::layout::monotonic_ns().max(1);
        // A max: a signaller preempted between its clock read and here cannot move a
        // later mark back.
        self.signal_woke_ns
            .fetch_max(now, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether a host signal woke the sleeping firmware less than
    /// [`COLD_SIGNAL_WINDOW_NS`] ago. One relaxed load when none did; a clock read only
    /// after one (and the mark is dropped once it is older than the window).
    pub(crate) fn signal_woke_firmware_recently(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let at = self.signal_woke_ns.load(Relaxed);
        if at == 0 {
            return false;
        }
        let recent = userq_uapi::layout::monotonic_ns().saturating_sub(at) < COLD_SIGNAL_WINDOW_NS;
        if !recent {
            let _ = self
                .signal_woke_ns
                .compare_exchange(at, 0, Relaxed, Relaxed);
        }
        recent
    }

    /// The raw mark [`DeviceInner::wake_firmware_for_parked_queues`] leaves (0: none), for
    /// tests.
    #[cfg(all(test, feature = "embedded"))]
    pub(crate) fn signal_woke_mark(&self) -> u64 {
        self.signal_woke_ns
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(crate) fn is_lost(&self) -> bool {
        self.status.health.state.load_acquire() == DeviceState::Lost as u32
            || self.gone.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The CPU the firmware's command processor last ran on, if it said.
    pub(crate) fn firmware_cpu(&self) -> Option<u32> {
        let cpu = self.status.health.cp_cpu.load();
        (cpu != userq_uapi::layout::CPU_UNKNOWN).then_some(cpu)
    }

    /// Whether a job of this context (or of one sharing its bit) waits for a page fault's
    /// reply ([`DeviceHealth::faulting_contexts`](userq_uapi::layout::DeviceHealth)).
    pub(crate) fn context_faulting(&self) -> bool {
        self.status.health.faulting_contexts.load() & (1 << (self.ctx % 64)) != 0
    }

    /// Whether the calling thread runs on the CPU where the firmware's command processor
    /// runs, awake (vDSO `getcpu`, about 2.5 ns, and loads from two lines that change
    /// rarely). A sleeping command processor competes for no CPU, and may be woken on any.
    /// The hint is as fresh as the command processor's last look: one woken onto a
    /// spinning thread's CPU cannot say so until it runs (adaptive waits for work whose
    /// doorbell woke it sleep anyway: `FenceInner::cold`).
    pub(crate) fn on_firmware_cpu(&self) -> bool {
        self.status.sleep.sleeping.load() == 0
            && self.firmware_cpu() == Some(rustix::thread::sched_getcpu() as u32)
    }

    /// [`DeviceInner::is_lost`], plus a check that kmd-shim still holds the other end of the
    /// control socket: if the process serving the device was killed, nobody is left to
    /// mark the device lost. A syscall: for the blocking phases of waits only.
    pub(crate) fn is_lost_or_gone(&self) -> bool {
        if self.is_lost() {
            return true;
        }
        // A call in progress holds the socket; it will notice a hang-up itself.
        let Ok(sock) = self.control.try_lock() else {
            return false;
        };
        let mut fds = [rustix::event::PollFd::new(
            &*sock,
            rustix::event::PollFlags::RDHUP,
        )];
        let zero = rustix::time::Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        let hung_up = matches!(rustix::event::poll(&mut fds, Some(&zero)), Ok(n) if n > 0)
            && fds[0].revents().intersects(
                rustix::event::PollFlags::HUP
                    | rustix::event::PollFlags::RDHUP
                    | rustix::event::PollFlags::ERR,
            );
        if hung_up {
            self.gone.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        hung_up
    }
}

fn exchange(
    sock: &OwnedFd,
    req: Request,
    fds: &[BorrowedFd<'_>],
) -> Result<([u64; 7], Vec<OwnedFd>), ControlError> {
    use rustix::io::Errno;
    let raw = req.encode();
    // A server that turns a connection away (`PermissionDenied`, `LimitExceeded`) sends its
    // reason and closes. The close may come before this request goes out (the send then
    // fails: the peer is gone, so the receive below cannot block) or with it unread (the
    // receive then reports a reset first, and the reason after it). Either way the reason
    // is what the caller gets.
    let sent = os::send_with_fds(sock.as_fd(), bytemuck::bytes_of(&raw), fds);
    if let Err(e) = sent {
        if e != Errno::PIPE && e != Errno::CONNRESET {
            return Err(ControlError::Disconnected);
        }
    }
    let mut buf = [0u8; 2 * MESSAGE_SIZE];
    let mut reset = false;
    let got = loop {
        match os::recv_with_fds(sock.as_fd(), &mut buf) {
            Err(Errno::INTR) => continue,
            Err(Errno::CONNRESET) if !reset => reset = true,
            Err(_) => return Err(ControlError::Disconnected),
            Ok(g) => break g,
        }
    };
    if got.len == 0 && got.fds.is_empty() {
        return Err(ControlError::Disconnected);
    }
    if got.len != MESSAGE_SIZE || got.truncated {
        return Err(ControlError::Protocol("reply of the wrong size"));
    }
    let reply =
        RawReply::decode(&buf[..got.len]).map_err(|_| ControlError::Protocol("bad reply"))?;
    match KmdStatus::from_u32(reply.status) {
        // An answer to a request that never went out can only be a refusal.
        KmdStatus::Ok if sent.is_err() => Err(ControlError::Disconnected),
        KmdStatus::Ok => Ok((reply.values, got.fds)),
        s => Err(ControlError::Rejected(s)),
    }
}

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

    /// Connects to the device serving `socket`.
    pub fn connect(socket: impl AsRef<Path>) -> Result<Device, OpenError> {
        Device::attach(socket.as_ref(), None)
    }

    fn attach(path: &Path, embedded: Option<embedded::Host>) -> Result<Device, OpenError> {
        let sock = userq_uapi::socket::connect(path).map_err(|source| OpenError::Connect {
            path: path.to_owned(),
            source,
        })?;
        let (values, fds) = exchange(
            &sock,
            Request::OpenContext {
                abi_version: ABI_VERSION,
            },
            &[],
        )?;
        let reply =
            OpenContextReply::decode(&values).map_err(|e| ControlError::Protocol(e.describe()))?;
        let [db, status, kick, waiters] = <[OwnedFd; 4]>::try_from(fds)
            .map_err(|_| ControlError::Protocol("OPEN_CONTEXT returned the wrong fds"))?;
        let doorbells = Shm::map(db.as_fd()).map_err(ControlError::from)?;
        let status = Shm::map(status.as_fd()).map_err(ControlError::from)?;
        let kick = Shm::map(kick.as_fd()).map_err(ControlError::from)?;
        let waiters = Shm::map(waiters.as_fd()).map_err(ControlError::from)?;
        Ok(Device {
            inner: Arc::new(DeviceInner {
                control: Mutex::new(sock),
                ctx: reply.ctx,
                generation: reply.generation,
                doorbells,
                status,
                kick,
                waiters,
                fast_doorbell: userq_uapi::sync::register_for_firmware_barrier(),
                gone: std::sync::atomic::AtomicBool::new(false),
                signal_woke_ns: std::sync::atomic::AtomicU64::new(0),
                woken_sleep: std::sync::atomic::AtomicU64::new(0),
                signal_wakes: std::sync::atomic::AtomicU64::new(0),
                socket: path.to_owned(),
                embedded,
            }),
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
