//! [`DeviceBuilder`]: which device to open (the socket, connect or embedded) and what an
//! embedded device it starts has (kernels, engines, device memory, eviction policy).

use super::Device;
use crate::embedded;
use crate::error::OpenError;
use std::path::PathBuf;
#[cfg(feature = "embedded")]
use std::sync::Arc;
use std::time::Duration;

/// How [`DeviceBuilder::open`] finds its device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OpenMode {
    /// Connect if a device answers on the socket; otherwise start an embedded device that
    /// serves the socket.
    #[default]
    Auto,
    /// Connect to a running device only.
    Connect,
    /// Start an embedded device (reusing one this process already runs on that socket).
    Embedded,
}

/// How long a control request (opening the context, creating a queue, a fence or a
/// buffer, ...) may wait to be sent and answered before it fails with
/// [`crate::ControlError::Timeout`]. Far above any answer kmd-shim gives while it runs:
/// its firmware calls are bounded by 5 s, and the slowest requests (committing or
/// migrating gigabytes) take about a second.
pub const DEFAULT_CONTROL_TIMEOUT: Duration = Duration::from_secs(60);

/// Builds a [`Device`].
#[derive(Clone, Default)]
pub struct DeviceBuilder {
    socket: Option<PathBuf>,
    mode: OpenMode,
    /// `None`: [`DEFAULT_CONTROL_TIMEOUT`].
    control_timeout: Option<Duration>,
    kernels: Vec<embedded::KernelEntry>,
    engines: Option<usize>,
    vram: Option<u64>,
    /// The counterfactual eviction policy's watchdog, if chosen.
    wait_for_jobs: Option<Duration>,
}

impl std::fmt::Debug for DeviceBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceBuilder")
            .field("socket", &self.socket)
            .field("mode", &self.mode)
            .field("control_timeout", &self.control_timeout)
            .field(
                "kernels",
                &self
                    .kernels
                    .iter()
                    .map(embedded::describe)
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl DeviceBuilder {
    /// The socket to use (default: `$USERQ_DEVICE`, else [`default_socket_path`]).
    pub fn socket(mut self, path: impl Into<PathBuf>) -> Self {
        self.socket = Some(path.into());
        self
    }

    /// How to find the device.
    pub fn mode(mut self, mode: OpenMode) -> Self {
        self.mode = mode;
        self
    }

    /// The bound on each control request's send and answer (default
    /// [`DEFAULT_CONTROL_TIMEOUT`], at least 1 ms). A request that runs past it fails with
    /// [`crate::ControlError::Timeout`] and gives the connection up: the device then counts
    /// as lost for this context.
    pub fn control_timeout(mut self, timeout: Duration) -> Self {
        self.control_timeout = Some(timeout.max(Duration::from_millis(1)));
        self
    }

    /// Engine threads of an embedded device this builder starts (default: one fewer than
    /// the cores, at least one; or `$USERQ_FW_ENGINES`).
    #[cfg(feature = "embedded")]
    pub fn engines(mut self, engines: usize) -> Self {
        self.engines = Some(engines.clamp(1, 256));
        self
    }

    /// Device memory for on-demand buffers of an embedded device this builder starts
    /// (default [`userq_uapi::paging::DEFAULT_VRAM`]; at least one 64 KiB page, else
    /// opening fails with a typed error).
    #[cfg(feature = "embedded")]
    pub fn vram(mut self, bytes: u64) -> Self {
        self.vram = Some(bytes);
        self
    }

    /// Makes an embedded device this builder starts evict the way a dma-fence-backed
    /// memory manager would: wait until no job uses a buffer before taking its pages. This
    /// is the counterfactual that deadlocks with page faults and long-running jobs; the
    /// wait gives up after `watchdog` (at most 3 s), prints the cycle, and stops the
    /// faulting queues (`EvictionDeadlock`). Off by default.
    #[cfg(feature = "embedded")]
    pub fn eviction_waits_for_jobs(mut self, watchdog: Duration) -> Self {
        self.wait_for_jobs = Some(watchdog);
        self
    }

    /// Adds a custom kernel under `id` (use ids from
    /// [`crate::kernels::FIRST_CUSTOM`] on) to the firmware of an embedded device this
    /// builder starts. A device that is already running, in this process or in a daemon,
    /// keeps the kernels it started with: submitting an unknown id stops the queue with
    /// `UnknownKernel`.
    #[cfg(feature = "embedded")]
    pub fn kernel(mut self, id: u32, kernel: Arc<dyn fw_emu::kernel::Kernel>) -> Self {
        self.kernels.push((id, kernel));
        self
    }

    /// Opens the device and a context on it.
    pub fn open(self) -> Result<Device, OpenError> {
        let timeout = self.control_timeout.unwrap_or(DEFAULT_CONTROL_TIMEOUT);
        let env = std::env::var_os("USERQ_DEVICE").filter(|v| !v.is_empty());
        let (path, mode) = match (self.socket, env) {
            (Some(p), _) => (p, self.mode),
            // An explicit $USERQ_DEVICE names a device that must be running.
            (None, Some(p)) if self.mode == OpenMode::Auto => (PathBuf::from(p), OpenMode::Connect),
            (None, Some(p)) => (PathBuf::from(p), self.mode),
            (None, None) => (default_socket_path(), self.mode),
        };
        match mode {
            OpenMode::Connect => Device::attach(&path, None, timeout),
            OpenMode::Embedded => {
                let kmd = embedded::start(
                    &path,
                    &self.kernels,
                    self.engines,
                    self.vram,
                    self.wait_for_jobs,
                )?;
                Device::attach(&path, Some(kmd), timeout)
            }
            OpenMode::Auto => match Device::attach(&path, None, timeout) {
                Ok(d) => Ok(d),
                Err(OpenError::Connect { .. }) if cfg!(feature = "embedded") => {
                    match embedded::start(
                        &path,
                        &self.kernels,
                        self.engines,
                        self.vram,
                        self.wait_for_jobs,
                    ) {
                        Ok(kmd) => Device::attach(&path, Some(kmd), timeout),
                        // Another process won the race to serve this socket: join it.
                        Err(e) if embedded::lost_race(&e) => Device::attach(&path, None, timeout),
                        Err(e) => Err(e),
                    }
                }
                Err(e) => Err(e),
            },
        }
    }
}

/// The default device socket: `$XDG_RUNTIME_DIR/userq/dev0.sock`, or
/// `/tmp/userq-$UID/dev0.sock`.
pub fn default_socket_path() -> PathBuf {
    userq_uapi::socket::default_socket_path()
}
