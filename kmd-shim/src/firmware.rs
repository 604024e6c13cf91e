//! DOC: kmd-shim's side of the firmware transport (like xe's `xe_guc_ct.c`).
//!
//! kmd-shim owns the [`ControlRegion`], the [`DeviceStatus`] and the [`DeviceKick`]
//! objects, starts the firmware (a child process or a thread, see [`FirmwareLauncher`]),
//! and sends it the boot objects on the object channel. Requests go out through
//! [`FirmwareLink::call`], which sends the request's memory objects on the channel,
//! pushes the request on the `to_fw` ring, kicks the firmware if it sleeps, and waits a
//! bounded time for the ack. The event thread ([`FirmwareLink::run_events`]) drains the
//! `to_kmd` ring: acks go to their callers, queue errors are recorded, and the heartbeat is
//! watched. No path here waits on a user fence or a job.

use crate::launch::{self, FirmwareLauncher};
use crate::pool::DevicePool;
use rustix::fd::{AsFd, BorrowedFd, OwnedFd};
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Child;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::*};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use userq_uapi::fwmsg::{boot, FwEvent, FwRequest, FwStatus, ObjectId};
use userq_uapi::layout::{ControlRegion, DeviceKick, DeviceState, DeviceStatus, Telemetry};
use userq_uapi::os;
use userq_uapi::shm::{Sealing, Shm};
use userq_uapi::sync::{self, Backoff, BackoffStep};

mod call;

/// A running firmware.
#[derive(Debug)]
enum Running {
    Process(Child),
    Thread(JoinHandle<()>),
}

/// Why the firmware could not be started.
#[derive(Debug, thiserror::Error)]
pub enum FirmwareStartError {
    /// Creating the boot objects or the channel failed.
    #[error("cannot create firmware objects: {0}")]
    Objects(rustix::io::Errno),
    /// The `fw-emu` executable could not be run.
    #[error("cannot start {path}: {source}")]
    Spawn {
        /// The executable.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The firmware did not announce itself in time.
    #[error("firmware did not come up within {0:?}")]
    NoReady(Duration),
}

/// What the event thread reports to kmd-shim's device table.
pub trait EventSink: Send + Sync {
    /// A queue stopped on an error.
    fn queue_error(&self, ev: FwEvent);
    /// A queue's watchdog fired ([`FwEvent::Hang`]). Called on the event thread: it may
    /// [`FirmwareLink::post`] requests but must not wait for an ack.
    fn hang(&self, ev: FwEvent);
    /// The firmware died or stopped its heartbeat.
    fn device_lost(&self);
    /// A page fault ([`FwEvent::Fault`]); the last of a batch completes it. Called on the
    /// event thread: it hands the batch to the pager and never waits.
    fn fault(&self, ev: FwEvent);
    /// A job that a timed-out `WaitJobs` still found using a buffer ([`FwEvent::Busy`]).
    fn busy(&self, ev: FwEvent);
}

struct Sender {
    channel: OwnedFd,
    next_seq: u32,
}

/// kmd-shim's link to the firmware.
pub struct FirmwareLink {
    control: Shm<ControlRegion>,
    status: Shm<DeviceStatus>,
    kick: Shm<DeviceKick>,
    status_fd: OwnedFd,
    status_ro: OwnedFd,
    /// This generation's telemetry (the firmware writes it too), and a read-only fd of it
    /// for observers.
    telemetry: Shm<Telemetry>,
    telemetry_fd: OwnedFd,
    telemetry_ro: OwnedFd,
    kick_fd: OwnedFd,
    sender: Mutex<Sender>,
    /// Sequence numbers of calls waiting for their ack, and the acks that arrived for them.
    /// An ack for a sequence number nobody waits for (any more) is dropped.
    acks: Mutex<HashMap<u32, Option<FwStatus>>>,
    acked: Condvar,
    ready: AtomicBool,
    lost: AtomicBool,
    hung: AtomicBool,
    stopping: AtomicBool,
    stop: AtomicBool,
    running: Mutex<Option<Running>>,
    /// Set by the exit watcher when the firmware process has exited.
    exit_seen: Arc<AtomicBool>,
    next_object: AtomicU64,
    ack_timeout: Duration,
    /// Device memory of this generation (sent at boot).
    pool: Arc<DevicePool>,
}

impl std::fmt::Debug for FirmwareLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FirmwareLink")
            .field("lost", &self.lost)
            .finish_non_exhaustive()
    }
}

impl FirmwareLink {
    /// Creates the boot objects and starts the firmware; does not wait for it yet.
    pub fn start(
        launcher: &FirmwareLauncher,
        generation: u64,
        ack_timeout: Duration,
        vram: u64,
    ) -> Result<FirmwareLink, FirmwareStartError> {
        let obj = FirmwareStartError::Objects;
        let pool = Arc::new(DevicePool::create(vram).map_err(obj)?);
        let (control_fd, control) =
            Shm::<ControlRegion>::create("userq-control", Sealing::Final, 0, 0).map_err(obj)?;
        // Only kmd-shim and the firmware write the status page: sealed read-only for
        // everyone else once the firmware has mapped it (see `wait_ready`).
        let (status_fd, status) =
            Shm::<DeviceStatus>::create("userq-status", Sealing::FirmwareWritable, 0, generation)
                .map_err(obj)?;
        status
            .health
            .state
            .store(DeviceState::Running as u32, Relaxed);
        status.health.generation.store(generation, Relaxed);
        status
            .health
            .cp_cpu
            .store(userq_uapi::layout::CPU_UNKNOWN, Relaxed);
        let (kick_fd, kick) =
            Shm::<DeviceKick>::create("userq-kick", Sealing::Final, 0, 0).map_err(obj)?;
        let status_ro = os::reopen_read_only(status_fd.as_fd()).map_err(obj)?;
        let (telemetry_fd, telemetry) =
            Shm::<Telemetry>::create("userq-telemetry", Sealing::FirmwareWritable, 0, generation)
                .map_err(obj)?;
        telemetry.device.vram_bytes.store(vram, Relaxed);
        let telemetry_ro = os::reopen_read_only(telemetry_fd.as_fd()).map_err(obj)?;

        let (ours, theirs) = rustix::net::socketpair(
            rustix::net::AddressFamily::UNIX,
            rustix::net::SocketType::SEQPACKET,
            rustix::net::SocketFlags::CLOEXEC,
            None,
        )
        .map_err(obj)?;
        let exit_seen = Arc::new(AtomicBool::new(false));
        let running = match launcher {
            FirmwareLauncher::Process { program, args } => {
                let control = Shm::<ControlRegion>::map(control_fd.as_fd()).map_err(|e| {
                    FirmwareStartError::Objects(match e {
                        os::MapError::Io(e) => e,
                        _ => rustix::io::Errno::INVAL,
                    })
                })?;
                let child =
                    launch::spawn_watched(program, args, theirs, control, exit_seen.clone())
                        .map_err(|source| FirmwareStartError::Spawn {
                            path: program.clone(),
                            source,
                        })?;
                Running::Process(child)
            }
            FirmwareLauncher::Thread(start) => {
                Running::Thread(start(theirs).map_err(|source| FirmwareStartError::Spawn {
                    path: "fw-emu thread".into(),
                    source,
                })?)
            }
        };
        let link = FirmwareLink {
            control,
            status,
            kick,
            status_fd,
            status_ro,
            telemetry,
            telemetry_fd,
            telemetry_ro,
            kick_fd,
            sender: Mutex::new(Sender {
                channel: ours,
                next_seq: 1,
            }),
            acks: Mutex::new(HashMap::new()),
            acked: Condvar::new(),
            ready: AtomicBool::new(false),
            lost: AtomicBool::new(false),
            hung: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            running: Mutex::new(Some(running)),
            exit_seen,
            next_object: AtomicU64::new(boot::FIRST_DYNAMIC),
            ack_timeout,
            pool,
        };
        {
            let s = link.sender.lock().unwrap_or_else(|e| e.into_inner());
            for (id, fd) in [
                (boot::CONTROL, control_fd.as_fd()),
                (boot::STATUS, link.status_fd.as_fd()),
                (boot::KICK, link.kick_fd.as_fd()),
                (boot::TELEMETRY, link.telemetry_fd.as_fd()),
                (boot::POOL, link.pool.fd()),
                (boot::POOL_USE, link.pool.uses_fd()),
            ] {
                os::send_with_fds(s.channel.as_fd(), &id.to_le_bytes(), &[fd]).map_err(obj)?;
            }
        }
        Ok(link)
    }

    /// Waits until the firmware announced [`FwEvent::Ready`], reading the event ring
    /// itself (call it before the event thread runs: nothing else is on the ring before
    /// Ready), then seals the status page read-only for everyone but kmd-shim and the
    /// firmware. A firmware that exits first fails at once.
    pub fn wait_ready(&self, timeout: Duration) -> Result<(), FirmwareStartError> {
        let deadline = Instant::now() + timeout;
        let mut backoff = Backoff::new(Duration::from_micros(50), Duration::from_millis(1));
        while !self.ready.load(Acquire) {
            match self.control.to_kmd.pop().map(|w| FwEvent::decode(&w)) {
                Some(Some(FwEvent::Ready)) => self.ready.store(true, Release),
                Some(_) => {} // nothing else can come before Ready
                None => {
                    if Instant::now() >= deadline || self.exited() {
                        return Err(FirmwareStartError::NoReady(timeout));
                    }
                    if backoff.step() == BackoffStep::Sleep {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            }
        }
        os::seal_read_only(self.status_fd.as_fd()).map_err(FirmwareStartError::Objects)?;
        os::seal_read_only(self.telemetry_fd.as_fd()).map_err(FirmwareStartError::Objects)
    }

    /// This generation's telemetry.
    pub fn telemetry(&self) -> &Telemetry {
        &self.telemetry
    }

    /// The telemetry, read-only, to hand to observers.
    pub fn telemetry_fd_read_only(&self) -> BorrowedFd<'_> {
        self.telemetry_ro.as_fd()
    }

    /// Device memory of this generation.
    pub fn pool(&self) -> &Arc<DevicePool> {
        &self.pool
    }

    /// The device generation this firmware serves.
    pub fn generation(&self) -> u64 {
        self.status().health.generation.load(Relaxed)
    }

    /// The device status page, read-only, to hand to clients.
    pub fn status_fd_read_only(&self) -> BorrowedFd<'_> {
        self.status_ro.as_fd()
    }

    /// The kick page, to hand to clients.
    pub fn kick_fd(&self) -> BorrowedFd<'_> {
        self.kick_fd.as_fd()
    }

    /// The device status page.
    pub fn status(&self) -> &DeviceStatus {
        &self.status
    }

    /// Whether the device is lost.
    pub fn is_lost(&self) -> bool {
        self.lost.load(Acquire)
    }

    /// A fresh object id for the object channel.
    pub fn new_object_id(&self) -> ObjectId {
        self.next_object.fetch_add(1, Relaxed)
    }

    fn kick_firmware(&self) {
        sync::wake_if_announced(&self.status().sleep.sleeping, &self.kick.kick.word);
    }

    /// The event thread's body: runs until [`FirmwareLink::stop`], or until it declared the
    /// device lost (after telling `sink`).
    ///
    /// It and the pager thread ([`crate::pager`]) sleep as soon as they run out of work: no
    /// spin, no yield phase (the firmware's event kick, the pager's condition variable wake
    /// them). On two cores the command processor polls on one and a spinning client holds
    /// the other, so a third spinner takes a CPU from one of them:
    /// - with a half-millisecond yield phase, a page fault's round trip under an adaptive
    ///   (default) wait took 214-504 us at p50, 60-72 us without (under EEVDF every
    ///   `sched_yield` moves the caller's deadline a whole slice later, so a thread that
    ///   yielded for long is picked after everyone else once it has work);
    /// - with a 20 us spin after the last work, a resident dispatch right after a fault took
    ///   24-48 us at p50 for whole rounds, about a third of them (the spinning thread held the
    ///   command processor's vCPU), 0.6 us with none; a fault's own round trip is the same
    ///   either way (three alternated `userq-bench paging --quick` runs of each).
    pub fn run_events(&self, sink: &dyn EventSink) {
        let c = &*self.control;
        let mut last_beat = (self.status().health.heartbeat.load(Relaxed), Instant::now());
        while !self.stop.load(Acquire) {
            let mut got = false;
            // Whether a thread now has work from this turn: the pager a batch of faults,
            // a request's sender its ack.
            let mut handed = false;
            while let Some(w) = c.to_kmd.pop() {
                got = true;
                match FwEvent::decode(&w) {
                    Some(FwEvent::Ready) => {} // seen by `wait_ready` already
                    Some(FwEvent::Ack { seq, status }) => {
                        let mut acks = self.acks.lock().unwrap_or_else(|e| e.into_inner());
                        if let Some(slot) = acks.get_mut(&seq) {
                            *slot = Some(status);
                            self.acked.notify_all();
                            handed = true;
                        }
                    }
                    Some(ev @ FwEvent::QueueError { .. }) => sink.queue_error(ev),
                    Some(ev @ FwEvent::Hang { .. }) => sink.hang(ev),
                    Some(ev @ FwEvent::Fault { last, .. }) => {
                        sink.fault(ev);
                        handed |= last;
                    }
                    Some(ev @ FwEvent::Busy { .. }) => sink.busy(ev),
                    None => {}
                }
            }
            // That thread may be queued on this vCPU (with a client spinning on the other
            // one, all of kmd-shim and the firmware share one): give way once, before this
            // thread looks at the ring again and announces its sleep. A page fault's round
            // trip crosses this thread twice (the batch, then the acks of its maps and
            // replies).
            if handed {
                std::thread::yield_now();
            }
            if got {
                continue;
            }
            // Out of work: sleep at once (see above). NEED_WAKEUP on the to_kmd ring, with
            // the heartbeat period as a bound.
            sync::announce_and_sleep(
                &c.kmd_sleep,
                &c.kmd_kick.word,
                || {
                    c.to_kmd.has_message()
                        || self.stop.load(Acquire)
                        || self.exit_seen.load(Acquire)
                },
                Duration::from_millis(userq_uapi::HEARTBEAT_PERIOD_MS),
            );
            // Events first (a page fault's acks wake this thread): the health check costs
            // a lock and, in daemon mode, a syscall. It runs once the ring is drained and
            // the thread would sleep again, which a firmware that died finds at once.
            if c.to_kmd.has_message() {
                continue;
            }
            if !self.is_lost()
                && !self.stopping.load(Acquire)
                && self.ready.load(Acquire)
                && (self.hung.load(Acquire) || self.firmware_dead(&mut last_beat))
            {
                self.mark_lost();
                sink.device_lost();
                return;
            }
        }
    }

    /// Whether the firmware exited or its heartbeat stalled for [`HEARTBEAT_TIMEOUT`].
    fn firmware_dead(&self, last: &mut (u64, Instant)) -> bool {
        let beat = self.status().health.heartbeat.load(Relaxed);
        if beat != last.0 {
            *last = (beat, Instant::now());
        }
        self.exited() || last.1.elapsed() > HEARTBEAT_TIMEOUT
    }

    /// Whether the firmware process exited or its thread finished.
    fn exited(&self) -> bool {
        match self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            Some(Running::Process(child)) => !matches!(child.try_wait(), Ok(None)),
            Some(Running::Thread(t)) => t.is_finished(),
            None => true,
        }
    }

    /// Lets go of a lost firmware before a restart: kills its process (a frozen one too:
    /// SIGKILL ends a stopped process) and reaps it, or leaves its thread (a thread cannot
    /// be stopped; it exits once it notices the closed channel). Does not wait for acks.
    pub fn abandon(&self) {
        self.stopping.store(true, Release);
        self.let_go(Duration::ZERO);
    }

    /// Marks the link lost and stopped, closes the object channel (a firmware that sees it
    /// closed exits), and waits up to `grace` for the firmware to end: then a process is
    /// killed and reaped, and a thread that has not finished is left (it cannot be
    /// stopped).
    fn let_go(&self, grace: Duration) {
        self.mark_lost();
        self.stop.store(true, Release);
        {
            let s = self.sender.lock().unwrap_or_else(|e| e.into_inner());
            let _ = rustix::net::shutdown(s.channel.as_fd(), rustix::net::Shutdown::Both);
        }
        self.kick_firmware(); // so that it looks at its channel now
        let running = self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let deadline = Instant::now() + grace;
        match running {
            Some(Running::Process(mut child)) => {
                while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(5));
                }
                let _ = child.kill();
                let _ = child.wait();
            }
            Some(Running::Thread(t)) => {
                while !t.is_finished() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(1));
                }
                if t.is_finished() {
                    let _ = t.join();
                }
            }
            None => {}
        }
    }

    fn mark_lost(&self) {
        self.lost.store(true, Release);
        self.status()
            .health
            .state
            .store(DeviceState::Lost as u32, Release);
        let _g = self.acks.lock().unwrap_or_else(|e| e.into_inner());
        self.acked.notify_all();
    }

    /// Stops the firmware (asking first, then killing a process that does not exit) and
    /// the event thread. The device counts as lost afterwards.
    pub fn stop(&self) {
        // From here on a firmware exit is expected: the event thread must not report it
        // as a loss.
        self.stopping.store(true, Release);
        if !self.is_lost() && self.ready.load(Acquire) {
            let _ = self.call(FwRequest::Shutdown, &[]);
        }
        // The event thread returns once it sees `stop`: wake it.
        self.stop.store(true, Release);
        let c = &*self.control;
        c.kmd_kick.word.fetch_add(1, Release);
        sync::futex_wake_all(&c.kmd_kick.word);
        // A firmware that missed Shutdown exits when its channel closes; a stuck one is
        // killed (a process) or left (a thread) after 2 s.
        self.let_go(Duration::from_secs(2));
    }

    /// The firmware's process id in daemon mode.
    pub fn firmware_pid(&self) -> Option<u32> {
        match self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            Some(Running::Process(c)) => Some(c.id()),
            _ => None,
        }
    }
}

impl Drop for FirmwareLink {
    /// A link dropped without [`FirmwareLink::stop`] (a start that failed half-way, a
    /// replaced link) lets its firmware go: a child process is killed and reaped.
    fn drop(&mut self) {
        self.abandon();
    }
}

/// How long the heartbeat may stall before the firmware counts as hung (it beats at
/// least every [`userq_uapi::HEARTBEAT_PERIOD_MS`]; the event thread looks at least that
/// often, so a frozen firmware is declared lost within this plus one period).
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_millis(20 * userq_uapi::HEARTBEAT_PERIOD_MS);
