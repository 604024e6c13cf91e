//! Fences: 64-bit values in shared memory that the firmware (or a host thread) signals and
//! anyone holding them can wait on.
//!
//! Every queue has a *timeline* fence: packet `N` of the queue (counting from 1) completes
//! by setting it to `N`, so a [`FencePoint`] (a fence and a value) names "this packet and
//! everything before it on its queue". User fences ([`crate::Device::create_fence`]) are
//! set by whoever holds them, from the host or from a queue's SIGNAL_FENCE.
//!
//! Waiting spins for a bounded budget, then registers in the fence's waiter count and sleeps
//! on the fence's shared futex word (the protocol in [`userq_uapi::sync`]). The firmware
//! makes a futex wake only while a waiter is registered.

use crate::device::DeviceInner;
use crate::error::{ControlError, FenceError, FenceFault, SignalError, WaitError};
use crate::wait::{wait_many, Registered, Target, WaitMode};
use rustix::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;
use userq_uapi::error::ErrorCode;
use userq_uapi::ioctl::Request;
use userq_uapi::layout::{FenceKind, FenceState, FenceWaiters, WaiterSlot};
use userq_uapi::os;
use userq_uapi::packet::FenceHandle;
use userq_uapi::shm::{ReadOnly, RoU32, Shm};
use userq_uapi::sync;

/// A fence's value side as this process may map it: read-only for a queue's timeline
/// (only the firmware writes it), writable for a user fence (any holder signals it).
enum StateMap {
    ReadOnly(Shm<FenceState<ReadOnly>>),
    Writable(Shm<FenceState>),
}

impl StateMap {
    /// The state as every reader sees it: loads only.
    #[inline]
    fn view(&self) -> &FenceState<ReadOnly> {
        match self {
            StateMap::ReadOnly(s) => s,
            StateMap::Writable(s) => s.read_only(),
        }
    }

    /// The state for a signaller, if this process may write it.
    fn writable(&self) -> Option<&FenceState> {
        match self {
            StateMap::ReadOnly(_) => None,
            StateMap::Writable(s) => Some(s),
        }
    }
}

pub(crate) struct FenceInner {
    dev: Arc<DeviceInner>,
    pub(crate) handle: FenceHandle,
    kind: FenceKind,
    /// Where this context registers its waiters on the fence.
    waiter: WaiterSlot,
    state: StateMap,
    waiters: Shm<FenceWaiters>,
    state_fd: OwnedFd,
    waiters_fd: OwnedFd,
    /// The highest value whose submit had to wake a sleeping firmware (a queue's timeline
    /// only; 0: none). This process's own note, never shared.
    cold_until: AtomicU64,
}

impl FenceInner {
    /// Whether the device is lost or its serving process gone (a syscall: see
    /// [`DeviceInner::is_lost_or_gone`]).
    pub(crate) fn device_gone(&self) -> bool {
        self.dev.is_lost_or_gone()
    }

    /// Notes that the doorbell for packets up to `value` of this timeline's queue found
    /// the firmware asleep and woke it (the wake syscall reported a woken thread). Only
    /// submits through this process's `Queue` mark; a high-water mark, so it also covers
    /// earlier packets still in flight, which are no nearer to completing.
    pub(crate) fn note_cold_submit(&self, value: u64) {
        self.cold_until.fetch_max(value, Relaxed);
    }

    /// Whether `target` waits on work whose doorbell had to wake the firmware, or is a
    /// queue timeline's value on a device whose sleeping firmware a host signal of this
    /// connection woke just now (for queues parked on the fence it signalled): the
    /// completion is at least one wake-up away (10-80 us here), longer than an adaptive
    /// wait's spin, so spinning for it only holds a vCPU the firmware may be queued on.
    /// A user fence is never marked: another host thread may signal it at any time.
    pub(crate) fn cold(&self, target: u64) -> bool {
        target <= self.cold_until.load(Relaxed)
            || (self.kind == FenceKind::Timeline && self.dev.signal_woke_firmware_recently())
    }

    /// Whether a job of the waiting context has a page fault in service (see
    /// [`Device::faults_in_service`]).
    ///
    /// [`Device::faults_in_service`]: crate::Device::faults_in_service
    pub(crate) fn context_faulting(&self) -> bool {
        self.dev.context_faulting()
    }

    /// Whether only the firmware advances this fence (a queue timeline) and the calling
    /// thread shares the CPU its command processor last ran on: a spin for it then holds
    /// off the work it waits for. A user fence does not count: a host thread elsewhere may
    /// signal it.
    pub(crate) fn on_firmware_cpu(&self) -> bool {
        self.kind == FenceKind::Timeline && self.dev.on_firmware_cpu()
    }

    #[inline]
    pub(crate) fn state(&self) -> &FenceState<ReadOnly> {
        self.state.view()
    }

    fn waiters(&self) -> &FenceWaiters {
        &self.waiters
    }

    /// Registers this thread as a host waiter: its context's own count for the fence
    /// (read by the firmware), and for a user fence the shared count (read by host
    /// signallers).
    pub(crate) fn register(&self) {
        let user = self.kind == FenceKind::User;
        sync::register_waiter(&self.dev.waiters, &self.waiters, self.waiter, user);
    }

    /// Undoes [`FenceInner::register`].
    pub(crate) fn unregister(&self) {
        let user = self.kind == FenceKind::User;
        sync::unregister_waiter(&self.dev.waiters, &self.waiters, self.waiter, user);
    }

    fn fault(&self) -> Option<FenceFault> {
        let st = self.state();
        // Acquire (a relaxed load and a fence: the page may be read-only): pairs with the
        // poisoner's release store, so the record written before it is visible.
        if st.slot.poison.load_acquire() == 0 {
            return None;
        }
        let r = &st.record;
        Some(FenceFault {
            code: ErrorCode::from_u32(r.code.load()),
            packet_index: r.packet_index.load(),
            address: r.address.load(),
            detail: r.detail.load(),
            last_completed: r.last_completed.load(),
        })
    }

    /// Whether the value has reached `target`: the one load a spinning wait repeats.
    #[inline]
    pub(crate) fn reached(&self, target: u64) -> bool {
        // Acquire: as in `check`.
        self.state().slot.value.load_acquire() >= target
    }

    /// `Some` once a wait for `target` is decided. In the blocking phase the caller's
    /// SeqCst fence after its waiter registration orders these loads after it (see
    /// `userq_uapi::sync::sleep_unless`).
    pub(crate) fn check(&self, target: u64) -> Option<Result<(), WaitError>> {
        // Acquire: pairs with the signaller's release store of the value, so what it wrote
        // before signalling is visible to the waiter.
        if self.state().slot.value.load_acquire() >= target {
            return Some(Ok(()));
        }
        if let Some(f) = self.fault() {
            return Some(Err(if f.code == Some(ErrorCode::DeviceLost) {
                WaitError::DeviceLost
            } else {
                WaitError::Faulted(f)
            }));
        }
        if self.dev.is_lost() {
            return Some(Err(WaitError::DeviceLost));
        }
        None
    }
}

impl Drop for FenceInner {
    fn drop(&mut self) {
        let _ = self.dev.call(
            Request::ReleaseFence {
                handle: self.handle,
            },
            &[],
        );
    }
}

/// A fence. Cheap to clone; the device's handle on it is released when the last clone
/// (and every [`FencePoint`] on it) is dropped.
#[derive(Clone)]
pub struct Fence {
    pub(crate) inner: Arc<FenceInner>,
}

impl std::fmt::Debug for Fence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fence")
            .field("handle", &self.inner.handle.0)
            .field("kind", &self.inner.kind)
            .field("value", &self.value())
            .finish()
    }
}

impl Fence {
    pub(crate) fn from_parts(
        dev: &Arc<DeviceInner>,
        handle: u32,
        kind: FenceKind,
        waiter: WaiterSlot,
        state_fd: OwnedFd,
        waiters_fd: OwnedFd,
    ) -> Result<Fence, FenceError> {
        let state = match kind {
            FenceKind::User => {
                StateMap::Writable(Shm::map(state_fd.as_fd()).map_err(ControlError::from)?)
            }
            FenceKind::Timeline => {
                StateMap::ReadOnly(Shm::map(state_fd.as_fd()).map_err(ControlError::from)?)
            }
        };
        let waiters = Shm::map(waiters_fd.as_fd()).map_err(ControlError::from)?;
        Ok(Fence {
            inner: Arc::new(FenceInner {
                dev: dev.clone(),
                handle: FenceHandle(handle),
                kind,
                waiter,
                state,
                waiters,
                state_fd,
                waiters_fd,
                cold_until: AtomicU64::new(0),
            }),
        })
    }

    /// The current value.
    pub fn value(&self) -> u64 {
        self.inner.state().slot.value.load_acquire()
    }

    /// The state word of the queue whose timeline this is (see `QueueState`); relaxed.
    pub(crate) fn queue_state(&self) -> u32 {
        self.inner.state().queue.state.load()
    }

    /// Whether this is a queue's timeline fence (signalled only by the firmware).
    pub fn is_timeline(&self) -> bool {
        self.inner.kind == FenceKind::Timeline
    }

    /// Why the fence was poisoned, if it was.
    pub fn fault(&self) -> Option<FenceFault> {
        self.inner.fault()
    }

    /// The point at which this fence reaches `value`.
    pub fn point(&self, value: u64) -> FencePoint {
        FencePoint {
            fence: self.clone(),
            value,
        }
    }

    /// Advances a user fence to `value` from the host and wakes its waiters, in any
    /// process, and any queue parked on it. Fences never go backwards, as Vulkan's
    /// timeline semaphores: a value below the current one is refused
    /// ([`SignalError::Backwards`]) and changes nothing; signalling the current value
    /// again is allowed and changes nothing. For a flag word, see [`Fence::set`].
    pub fn signal(&self, value: u64) -> Result<(), SignalError> {
        let (i, state) = (&self.inner, self.signallable()?);
        let waiters = i.waiters();
        match sync::advance_fence(state, waiters, value, || sync::host_waiting(waiters)) {
            Ok(parked) => {
                if parked {
                    i.dev.wake_firmware_for_parked_queues();
                }
                Ok(())
            }
            Err(current) => Err(SignalError::Backwards {
                current,
                requested: value,
            }),
        }
    }

    /// The state a host signaller writes: a user fence that is not poisoned.
    fn signallable(&self) -> Result<&FenceState, SignalError> {
        let i = &self.inner;
        let state = i.state.writable().ok_or(SignalError::ReadOnly)?;
        match i.fault() {
            Some(f) => Err(SignalError::Poisoned(f)),
            None => Ok(state),
        }
    }

    /// Stores `value` into a user fence used as a flag word (waited on with masked
    /// `Equal`/`NotEqual` conditions): unlike [`Fence::signal`] it may go down. Do not use
    /// it on a fence others wait on with `≥` (a [`FencePoint`]): their waits assume the
    /// value only grows.
    pub fn set(&self, value: u64) -> Result<(), SignalError> {
        let (i, state) = (&self.inner, self.signallable()?);
        let waiters = i.waiters();
        if sync::signal_fence(state, waiters, value, || sync::host_waiting(waiters)) {
            i.dev.wake_firmware_for_parked_queues();
        }
        Ok(())
    }

    /// Waits until the fence is at least `value` (see [`FencePoint::wait`]).
    pub fn wait(&self, value: u64, timeout: Duration) -> Result<(), WaitError> {
        self.wait_with(value, WaitMode::Adaptive, timeout)
    }

    /// Waits with a chosen [`WaitMode`] until the fence is at least `value`. Takes no
    /// reference count: with [`crate::Queue::enqueue`] this is the cheapest round trip.
    pub fn wait_with(
        &self,
        value: u64,
        mode: WaitMode,
        timeout: Duration,
    ) -> Result<(), WaitError> {
        wait_many(&[(&*self.inner, value)], true, mode, timeout).map(|_| ())
    }

    /// Duplicates the fence's descriptors for another process to
    /// [`crate::Device::import_fence`].
    pub fn export(&self) -> Result<ExportedFence, FenceError> {
        let dup = |fd: &OwnedFd| {
            fd.try_clone().map_err(|e| {
                FenceError::Dup(
                    rustix::io::Errno::from_io_error(&e).unwrap_or(rustix::io::Errno::IO),
                )
            })
        };
        Ok(ExportedFence {
            state: dup(&self.inner.state_fd)?,
            waiters: dup(&self.inner.waiters_fd)?,
        })
    }
}

/// A fence in transit between contexts or processes: its two memory objects (the value
/// side, read-only for queue timelines, and the waiter side).
#[derive(Debug)]
pub struct ExportedFence {
    state: OwnedFd,
    waiters: OwnedFd,
}

impl ExportedFence {
    /// Rebuilds an exported fence from descriptors received from another process. Whether
    /// they really are a userq fence is checked by the device at import.
    pub fn from_fds(state: OwnedFd, waiters: OwnedFd) -> Self {
        ExportedFence { state, waiters }
    }

    /// The two descriptors.
    pub fn into_fds(self) -> (OwnedFd, OwnedFd) {
        (self.state, self.waiters)
    }

    /// Borrows the two descriptors.
    pub fn as_fds(&self) -> (BorrowedFd<'_>, BorrowedFd<'_>) {
        (self.state.as_fd(), self.waiters.as_fd())
    }

    /// Sends the fence over a connected Unix socket (SCM_RIGHTS).
    pub fn send(&self, socket: impl AsFd) -> std::io::Result<()> {
        os::send_with_fds(
            socket.as_fd(),
            b"userq-fence",
            &[self.state.as_fd(), self.waiters.as_fd()],
        )
        .map_err(std::io::Error::from)
    }

    /// Receives a fence sent with [`ExportedFence::send`].
    pub fn recv(socket: impl AsFd) -> std::io::Result<ExportedFence> {
        let mut buf = [0u8; 32];
        let got = os::recv_with_fds(socket.as_fd(), &mut buf).map_err(std::io::Error::from)?;
        let bad =
            || std::io::Error::new(std::io::ErrorKind::InvalidData, "not a userq fence message");
        if &buf[..got.len] != b"userq-fence" || got.truncated {
            return Err(bad());
        }
        let [state, waiters] = <[OwnedFd; 2]>::try_from(got.fds).map_err(|_| bad())?;
        Ok(ExportedFence { state, waiters })
    }
}

/// A fence reaching a value: "packet N of that queue is done".
#[derive(Clone, Debug)]
pub struct FencePoint {
    fence: Fence,
    value: u64,
}

impl FencePoint {
    /// The fence.
    pub fn fence(&self) -> &Fence {
        &self.fence
    }

    /// The value waited for.
    pub fn value(&self) -> u64 {
        self.value
    }

    /// Whether the fence has reached the value, without waiting. Errors as
    /// [`FencePoint::wait`] does.
    pub fn poll(&self) -> Result<bool, WaitError> {
        match self.fence.inner.check(self.value) {
            Some(Ok(())) => Ok(true),
            Some(Err(e)) => Err(e),
            None => Ok(false),
        }
    }

    /// The point as a borrowed wait target.
    pub(crate) fn target(&self) -> Target<'_> {
        (&*self.fence.inner, self.value)
    }

    /// `Some` once the point is reached or can never be.
    pub(crate) fn poll_decided(&self) -> Option<Result<(), WaitError>> {
        self.fence.inner.check(self.value)
    }

    /// The fence's futex wake word.
    pub(crate) fn wake_word(&self) -> &RoU32 {
        &self.fence.inner.state().slot.wake
    }

    /// Waits (adaptively) until the fence reaches the value; `Duration::MAX` waits forever.
    pub fn wait(&self, timeout: Duration) -> Result<(), WaitError> {
        self.wait_with(WaitMode::Adaptive, timeout)
    }

    /// Waits with a chosen [`WaitMode`].
    pub fn wait_with(&self, mode: WaitMode, timeout: Duration) -> Result<(), WaitError> {
        wait_many(&[(&*self.fence.inner, self.value)], true, mode, timeout).map(|_| ())
    }
}

impl Fence {
    /// Sleeps until this fence's wake word moves (any signal, poison or explicit wake) or
    /// `timeout` passes, unless `still_waiting` says the wait is over after registering.
    pub(crate) fn sleep_until_woken(&self, still_waiting: impl Fn() -> bool, timeout: Duration) {
        let i = &self.inner;
        let me = [(&**i, 0)];
        let _registered = Registered::new(&me);
        sync::sleep_unless(
            &[&i.state().slot.wake],
            || !still_waiting(),
            || Some(timeout),
        );
    }

    /// The connection this fence belongs to.
    pub(crate) fn device(&self) -> &Arc<DeviceInner> {
        &self.inner.dev
    }

    pub(crate) fn device_gone(&self) -> bool {
        self.inner.device_gone()
    }
}
