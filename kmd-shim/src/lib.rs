//! # kmd-shim: the userq kernel-driver shim
//!
//! DOC: kmd-shim owns the control plane of a userq device, as amdkfd or xe.ko do for a
//! real one. It
//!
//! - listens on a Unix socket and serves the ioctls of [`userq_uapi::ioctl`], one context
//!   per connection, after checking the peer with `SO_PEERCRED` ([`client`]), every
//!   connection from one epoll set with a small pool of workers, bounded in number and
//!   in how long they may stay without a context ([`server`]);
//! - creates every memory object (sealed memfds) and hands clients the fds, read-only where
//!   only the firmware may write: the device table ([`device`]) and, one module per object,
//!   [`context`], [`queue`], [`fence`] and [`buffer`];
//! - starts the firmware, a child `fw-emu` process or a thread, and talks to it through the
//!   shared-memory message rings and the object channel ([`firmware`]);
//! - reclaims a context and everything it owned when its connection closes, however the
//!   client ended, and poisons the fences nobody can signal any more;
//! - decides what a hang the firmware reports costs: the queue is reset, a context that
//!   keeps hanging is banned ([`reset`]);
//! - watches the firmware's heartbeat and declares the device lost when it stops, then
//!   restarts the firmware under a new device generation ([`restart`]);
//! - owns device memory for on-demand buffers ([`pool`]) and services page faults in
//!   batches on its pager thread, evicting the least recently used pages of any context
//!   with the invalidate → acknowledge handshake ([`pager`]).
//!
//! It is never on the submit or complete path, and no path in it waits on a user fence or
//! on a job: it waits only on the firmware's acks, which are bounded. (The one exception
//! is opt-in and named for it: [`EvictionPolicy::WaitForIdleJobs`], the counterfactual.)
#![deny(missing_docs)]

pub mod buffer;
pub mod client;
mod closer;
pub mod context;
pub mod device;
mod evict;
mod evict_wait_jobs;
mod fault;
pub mod fence;
pub mod firmware;
pub mod launch;
mod ondemand;
pub mod pager;
pub mod pool;
pub mod queue;
pub mod reset;
pub mod restart;
pub mod server;
pub mod socket;
pub mod telemetry;

pub use device::Limits;
pub use firmware::FirmwareStartError;
pub use launch::FirmwareLauncher;
pub use pager::EvictionPolicy;
pub use restart::RestartPolicy;
pub use server::ServerLimits;
pub use socket::{default_socket_path, BindError};

use device::Device;
use firmware::FirmwareLink;
use server::Server;
use socket::Listener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::*};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// How to start a device.
#[derive(Debug)]
pub struct KmdConfig {
    /// Where to listen.
    pub socket: PathBuf,
    /// How to start the firmware.
    pub firmware: FirmwareLauncher,
    /// Resource limits.
    pub limits: Limits,
    /// Bounds of the connection server: connections, handshake timeout, workers.
    pub server: ServerLimits,
    /// How long to wait for a firmware ack before failing the ioctl.
    pub ack_timeout: Duration,
    /// Log queue errors and device events to stderr.
    pub verbose: bool,
    /// When to restart a lost firmware.
    pub restart: RestartPolicy,
    /// Device memory for on-demand buffers, bytes (whole 64 KiB pages, at least one).
    pub vram: u64,
    /// How eviction treats pages jobs use (path 3 by default).
    pub eviction: EvictionPolicy,
}

impl KmdConfig {
    /// Defaults for a socket path and launcher.
    pub fn new(socket: impl Into<PathBuf>, firmware: FirmwareLauncher) -> Self {
        KmdConfig {
            socket: socket.into(),
            firmware,
            limits: Limits::default(),
            server: ServerLimits::default(),
            ack_timeout: Duration::from_secs(5),
            verbose: false,
            restart: RestartPolicy::default(),
            vram: userq_uapi::paging::DEFAULT_VRAM,
            eviction: EvictionPolicy::default(),
        }
    }
}

/// Why a device could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The socket is served by someone else, or could not be bound.
    #[error(transparent)]
    Bind(#[from] BindError),
    /// The firmware did not start.
    #[error(transparent)]
    Firmware(#[from] FirmwareStartError),
    /// The device-memory budget is smaller than one device page or above the maximum.
    #[error("device memory budget of {0} bytes: must be from one 64 KiB page to 64 GiB")]
    BadVram(u64),
    /// A service thread (or the epoll set) could not be created.
    #[error("cannot start a kmd-shim thread: {0}")]
    Thread(std::io::Error),
}

struct Inner {
    device: Device,
    listener: Listener,
    server: Server,
    stopping: AtomicBool,
}

/// A running device: socket server, device table and firmware. Stops on drop.
pub struct Kmd {
    inner: Arc<Inner>,
    workers: Vec<JoinHandle<()>>,
    events: Option<JoinHandle<()>>,
    pager: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Kmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kmd")
            .field("socket", &self.inner.listener.path())
            .finish_non_exhaustive()
    }
}

impl Kmd {
    /// Binds the socket, starts the firmware and waits for it, then starts serving.
    pub fn start(config: KmdConfig) -> Result<Kmd, StartError> {
        if !(userq_uapi::paging::DEVICE_PAGE..=userq_uapi::paging::MAX_VRAM).contains(&config.vram)
        {
            return Err(StartError::BadVram(config.vram));
        }
        let listener = Listener::bind(&config.socket)?;
        let link = FirmwareLink::start(&config.firmware, 1, config.ack_timeout, config.vram)?;
        link.wait_ready(Duration::from_secs(10))?;
        let mut restarter = restart::Restarter {
            launcher: config.firmware,
            policy: config.restart,
            ack_timeout: config.ack_timeout,
            vram: config.vram,
            recent: Default::default(),
        };
        let server = Server::new(&listener, config.server).map_err(StartError::Thread)?;
        let inner = Arc::new(Inner {
            device: Device::new(
                link,
                config.limits,
                config.verbose,
                config.eviction,
                Arc::new(
                    telemetry::EventLogWriter::create()
                        .map_err(|e| StartError::Thread(std::io::Error::from(e)))?,
                ),
            ),
            listener,
            server,
            stopping: AtomicBool::new(false),
        });
        let ev = inner.clone();
        let events = std::thread::Builder::new()
            .name("kmd-events".into())
            .spawn(move || restart::supervise(&ev.device, &mut restarter, &ev.stopping))
            .map_err(StartError::Thread)?;
        // From here on, dropping `kmd` on an error stops what started.
        let mut kmd = Kmd {
            inner,
            workers: Vec::new(),
            events: Some(events),
            pager: None,
        };
        let p = kmd.inner.clone();
        kmd.pager = Some(
            std::thread::Builder::new()
                .name("kmd-pager".into())
                .spawn(move || p.device.run_pager(&p.stopping))
                .map_err(StartError::Thread)?,
        );
        for i in 0..kmd.inner.server.workers() {
            let w = kmd.inner.clone();
            kmd.workers.push(
                std::thread::Builder::new()
                    .name(format!("kmd-worker-{i}"))
                    .spawn(move || w.server.work(&w.device, &w.listener))
                    .map_err(StartError::Thread)?,
            );
        }
        Ok(kmd)
    }

    /// The socket path clients connect to.
    pub fn socket_path(&self) -> &Path {
        self.inner.listener.path()
    }

    /// The firmware's process id (daemon mode only).
    pub fn firmware_pid(&self) -> Option<u32> {
        self.inner.device.link().firmware_pid()
    }

    /// Suspends a queue (`Some(slot)`) or a whole context (its VM's work): the control
    /// path eviction builds on. Returns when nothing of it runs any more.
    pub fn suspend(&self, ctx: u32, slot: Option<u32>) -> Result<(), userq_uapi::KmdStatus> {
        self.inner.device.suspend(ctx, slot)
    }

    /// Resumes what [`Kmd::suspend`] stopped.
    pub fn resume(&self, ctx: u32, slot: Option<u32>) -> Result<(), userq_uapi::KmdStatus> {
        self.inner.device.resume(ctx, slot)
    }

    /// Whether the firmware died or stopped its heartbeat, and has not been restarted
    /// (yet).
    pub fn is_lost(&self) -> bool {
        self.inner.device.link().is_lost()
    }

    /// The device generation: 1, plus one per firmware restart.
    pub fn generation(&self) -> u64 {
        self.inner.device.generation()
    }

    /// Stops serving: every fence is poisoned with DeviceLost, every connection closed and
    /// reclaimed, the firmware stopped, the socket file removed.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if self.inner.stopping.swap(true, AcqRel) {
            return;
        }
        let dev = &self.inner.device;
        dev.link()
            .status()
            .health
            .state
            .store(userq_uapi::layout::DeviceState::Lost as u32, Release);
        dev.poison_all();
        self.inner.listener.stop();
        self.inner.server.stop();
        for t in self.workers.drain(..) {
            let _ = t.join();
        }
        for ctx in self.inner.server.close_all() {
            dev.close_context(ctx);
        }
        dev.link().stop();
        if let Some(t) = self.events.take() {
            let _ = t.join();
        }
        dev.pager.wake();
        if let Some(t) = self.pager.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Kmd {
    fn drop(&mut self) {
        self.stop();
    }
}
