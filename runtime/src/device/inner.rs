//! DOC: what every object of one connection shares: the control socket and its
//! request/reply exchange, the context's shared pages, and the device's health as this
//! connection sees it.

use crate::embedded;
use crate::error::{ControlError, OpenError};
use rustix::fd::{AsFd, BorrowedFd, OwnedFd};
use rustix::net::sockopt::Timeout;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;
use userq_uapi::ioctl::{OpenContextReply, RawReply, Reply, Request, MESSAGE_SIZE};
use userq_uapi::layout::ContextWaiters;
use userq_uapi::layout::{DeviceKick, DeviceState, DeviceStatus, DoorbellPage};
use userq_uapi::os;
use userq_uapi::shm::{ReadOnly, Shm};
use userq_uapi::{KmdStatus, ABI_VERSION};

/// How long after a host signal woke the sleeping firmware an adaptive wait for a queue
/// timeline of the device sleeps at once instead of spinning: an adaptive wait's own
/// spin-and-yield horizon. The woken firmware is often queued on the signaller's vCPU,
/// and a waiter spinning or yielding there holds it off (yields do not hand the CPU over
/// under EEVDF).
const COLD_SIGNAL_WINDOW_NS: u64 = crate::wait::ADAPTIVE_YIELD_UNTIL.as_nanos() as u64;

/// The state every object of one connection shares.
pub(crate) struct DeviceInner {
    control: Mutex<OwnedFd>,
    /// The bound on each request's send and on its answer.
    timeout: Duration,
    pub(crate) ctx: u32,
    pub(super) generation: u64,
    pub(crate) doorbells: Shm<DoorbellPage>,
    /// Written only by the firmware and kmd-shim: mapped read-only.
    pub(crate) status: Shm<DeviceStatus<ReadOnly>>,
    pub(crate) kick: Shm<DeviceKick>,
    /// This context's waiter counts, one per fence it holds (see `Fence` waits).
    pub(crate) waiters: Shm<ContextWaiters>,
    /// This process is registered for the firmware's membarrier, so its queues may use the
    /// doorbell fast path (see `userq_uapi::layout::RingPoll`).
    pub(crate) fast_doorbell: bool,
    /// The control socket hung up (whoever served the device is gone), or a request timed
    /// out and the connection was given up.
    gone: std::sync::atomic::AtomicBool,
    /// When (monotonic ns) a host signal from this connection last woke the sleeping
    /// firmware for queues parked on the fence; 0: not within [`COLD_SIGNAL_WINDOW_NS`].
    signal_woke_ns: std::sync::atomic::AtomicU64,
    /// The number of the firmware sleep a host signal of this connection last woke (see
    /// [`DeviceInner::wake_firmware_for_parked_queues`]).
    woken_sleep: std::sync::atomic::AtomicU64,
    /// Futex wakes of the firmware made by this connection's host signals.
    pub(super) signal_wakes: std::sync::atomic::AtomicU64,
    pub(super) socket: PathBuf,
    /// Keeps an embedded device alive while this process uses it. Declared last: it is
    /// dropped after the control socket closes, so the device reclaims this context first.
    pub(super) embedded: Option<embedded::Host>,
}

impl DeviceInner {
    /// Connects to the device serving `path` and opens a context (`embedded`: the device
    /// this process runs there, kept alive with the connection).
    pub(super) fn open(
        path: &Path,
        embedded: Option<embedded::Host>,
        timeout: Duration,
    ) -> Result<DeviceInner, OpenError> {
        let sock = userq_uapi::socket::connect(path).map_err(|source| OpenError::Connect {
            path: path.to_owned(),
            source,
        })?;
        // Every request and its answer is bounded: a stopped daemon fails the call with
        // `Timeout` instead of holding the calling thread for good.
        for t in [Timeout::Send, Timeout::Recv] {
            rustix::net::sockopt::set_socket_timeout(&sock, t, Some(timeout)).map_err(
                |source| OpenError::Connect {
                    path: path.to_owned(),
                    source,
                },
            )?;
        }
        let (values, fds) = exchange(
            &sock,
            timeout,
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
        Ok(DeviceInner {
            control: Mutex::new(sock),
            timeout,
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
        })
    }

    /// One request/reply exchange on the control socket.
    pub(crate) fn call(
        &self,
        req: Request,
        fds: &[BorrowedFd<'_>],
    ) -> Result<([u64; 7], Vec<OwnedFd>), ControlError> {
        let sock = self.control.lock().unwrap_or_else(|e| e.into_inner());
        let r = exchange(&sock, self.timeout, req, fds);
        if let Err(ControlError::Timeout(_)) = r {
            // Given up: kmd-shim sees the hang-up (once it runs again) and reclaims the
            // context; every later call and wait here finds the device gone.
            self.gone.store(true, std::sync::atomic::Ordering::Relaxed);
            let _ = rustix::net::shutdown(&*sock, rustix::net::Shutdown::Both);
        }
        r
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
        let hung_up = os::hung_up(sock.as_fd());
        if hung_up {
            self.gone.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        hung_up
    }
}

fn exchange(
    sock: &OwnedFd,
    timeout: Duration,
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
        if e == Errno::AGAIN {
            return Err(ControlError::Timeout(timeout));
        }
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
            Err(Errno::AGAIN) => return Err(ControlError::Timeout(timeout)),
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
        // An answer to a request that never went out, or that the server closed the
        // connection on unread, can only be a refusal.
        KmdStatus::Ok if sent.is_err() || reset => Err(ControlError::Disconnected),
        KmdStatus::Ok => Ok((reply.values, got.fds)),
        s => Err(ControlError::Rejected(s)),
    }
}
