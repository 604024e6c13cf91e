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
mod events;
pub use events::{EventSink, HEARTBEAT_TIMEOUT};

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
