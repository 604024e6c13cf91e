//! # kmd-shim: the userq kernel-driver shim
//!
//! DOC: kmd-shim owns the control plane of a userq device, as amdkfd or xe.ko do for a
//! real one. It
//!
//! - listens on a Unix socket and serves the ioctls of [`userq_uapi::ioctl`], one context
//!   per connection, after checking the peer with `SO_PEERCRED` ([`client`]);
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
//!   restarts the firmware under a new device generation ([`restart`]).
//!
//! It is never on the submit or complete path, and no path in it waits on a user fence or
//! on a job: it waits only on the firmware's acks, which are bounded.
#![deny(missing_docs)]

pub mod buffer;
pub mod client;
pub mod context;
pub mod device;
pub mod fence;
pub mod firmware;
pub mod queue;
pub mod reset;
pub mod restart;
pub mod socket;

pub use device::Limits;
pub use firmware::{FirmwareLauncher, FirmwareStartError};
pub use restart::RestartPolicy;
pub use socket::{default_socket_path, BindError};

use device::Device;
use firmware::FirmwareLink;
use socket::Listener;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::*};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Connections served at once; one more is closed at accept. Each costs a thread.
pub const MAX_CONNECTIONS: usize = 1024;

/// How to start a device.
#[derive(Debug)]
pub struct KmdConfig {
    /// Where to listen.
    pub socket: PathBuf,
    /// How to start the firmware.
    pub firmware: FirmwareLauncher,
    /// Resource limits.
    pub limits: Limits,
    /// How long to wait for a firmware ack before failing the ioctl.
    pub ack_timeout: Duration,
    /// Log queue errors and device events to stderr.
    pub verbose: bool,
    /// When to restart a lost firmware.
    pub restart: RestartPolicy,
}

impl KmdConfig {
    /// Defaults for a socket path and launcher.
    pub fn new(socket: impl Into<PathBuf>, firmware: FirmwareLauncher) -> Self {
        KmdConfig {
            socket: socket.into(),
            firmware,
            limits: Limits::default(),
            ack_timeout: Duration::from_secs(5),
            verbose: false,
            restart: RestartPolicy::default(),
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
    /// A service thread could not be spawned.
    #[error("cannot spawn a kmd-shim thread: {0}")]
    Thread(std::io::Error),
}

/// Live connections: a duplicate of each socket (to shut it down on stop) and its thread.
/// Kept apart from [`Inner`] so that a finishing client thread can deregister after it
/// dropped its reference to `Inner`: then `Inner` (and with it the socket file) is gone by
/// the time [`Kmd`] is dropped, never later on a detached thread.
type Clients = Arc<Mutex<HashMap<u64, (OwnedFd, Option<JoinHandle<()>>)>>>;

struct Inner {
    device: Device,
    listener: Listener,
    clients: Clients,
    next_client: AtomicU64,
    stopping: AtomicBool,
}

use rustix::fd::{AsFd, OwnedFd};

/// A running device: socket server, device table and firmware. Stops on drop.
pub struct Kmd {
    inner: Arc<Inner>,
    acceptor: Option<JoinHandle<()>>,
    events: Option<JoinHandle<()>>,
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
        let listener = Listener::bind(&config.socket)?;
        let link = FirmwareLink::start(&config.firmware, 1, config.ack_timeout)?;
        link.wait_ready(Duration::from_secs(10))?;
        let mut restarter = restart::Restarter {
            launcher: config.firmware,
            policy: config.restart,
            ack_timeout: config.ack_timeout,
            recent: Default::default(),
        };
        let inner = Arc::new(Inner {
            device: Device::new(link, config.limits, config.verbose),
            listener,
            clients: Arc::new(Mutex::new(HashMap::new())),
            next_client: AtomicU64::new(1),
            stopping: AtomicBool::new(false),
        });
        let ev = inner.clone();
        let events = std::thread::Builder::new()
            .name("kmd-events".into())
            .spawn(move || restart::supervise(&ev.device, &mut restarter, &ev.stopping))
            .map_err(StartError::Thread)?;
        let mut kmd = Kmd {
            inner,
            acceptor: None,
            events: Some(events),
        };
        let acc = kmd.inner.clone();
        kmd.acceptor = Some(
            std::thread::Builder::new()
                .name("kmd-accept".into())
                .spawn(move || accept_loop(acc))
                .map_err(StartError::Thread)?,
        );
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

    /// Firmware restarts so far.
    pub fn restarts(&self) -> u64 {
        self.inner.device.restarts()
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
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
        let clients: Vec<_> = {
            let mut c = self.inner.clients.lock().unwrap_or_else(|e| e.into_inner());
            c.drain().collect()
        };
        for (_, (sock, _)) in &clients {
            let _ = rustix::net::shutdown(sock.as_fd(), rustix::net::Shutdown::Both);
        }
        for (_, (_, t)) in clients {
            if let Some(t) = t {
                let _ = t.join();
            }
        }
        dev.link().stop();
        if let Some(t) = self.events.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Kmd {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept_loop(inner: Arc<Inner>) {
    loop {
        let sock = match inner.listener.accept() {
            Ok(s) => s,
            Err(rustix::io::Errno::INTR) | Err(rustix::io::Errno::CONNABORTED) => continue,
            Err(rustix::io::Errno::MFILE) | Err(rustix::io::Errno::NFILE) => {
                // Out of descriptors: back off instead of spinning on the error.
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            Err(_) => return,
        };
        if inner.stopping.load(Acquire) {
            return;
        }
        if inner
            .clients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
            >= MAX_CONNECTIONS
        {
            continue; // dropping the socket closes it: the client sees a closed connection
        }
        let Ok(dup) = sock.try_clone() else {
            continue;
        };
        let id = inner.next_client.fetch_add(1, Relaxed);
        let me = inner.clone();
        let registry = inner.clients.clone();
        let mut clients = inner.clients.lock().unwrap_or_else(|e| e.into_inner());
        let t = std::thread::Builder::new()
            .name(format!("kmd-client-{id}"))
            .spawn(move || {
                client::serve(&me.device, sock);
                drop(me);
                registry
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
            });
        if let Ok(t) = t {
            clients.insert(id, (dup, Some(t)));
        }
    }
}
