//! Embedded mode: the same kmd-shim and firmware code, run as threads of this process,
//! serving the device socket so that other processes can join. Built with the `embedded`
//! cargo feature (on by default); a daemon-only client turns it off and links neither.

#[cfg(feature = "embedded")]
mod imp {
    use crate::error::OpenError;
    use std::collections::HashMap;
    use std::path::{Path, PathBuf};
    use std::sync::{Arc, Mutex, OnceLock, Weak};

    /// A custom kernel to register with an embedded device's firmware.
    pub(crate) type KernelEntry = (u32, Arc<dyn fw_emu::kernel::Kernel>);

    /// Keeps an embedded device running while a [`crate::Device`] of it lives.
    pub(crate) type Host = Arc<kmd_shim::Kmd>;

    /// Embedded devices this process serves, by socket path.
    fn registry() -> &'static Mutex<HashMap<PathBuf, Weak<kmd_shim::Kmd>>> {
        static R: OnceLock<Mutex<HashMap<PathBuf, Weak<kmd_shim::Kmd>>>> = OnceLock::new();
        R.get_or_init(Default::default)
    }

    /// Starts an embedded device serving `path`, or returns the one this process already
    /// runs there.
    pub(crate) fn start(
        path: &Path,
        kernels: &[KernelEntry],
        engines: Option<usize>,
        vram: Option<u64>,
        wait_for_jobs: Option<std::time::Duration>,
    ) -> Result<Host, OpenError> {
        let mut reg = registry().lock().unwrap_or_else(|e| e.into_inner());
        if let Some(k) = reg.get(path).and_then(Weak::upgrade) {
            return Ok(k);
        }
        let mut config = fw_emu::FirmwareConfig::default();
        if let Some(n) = engines {
            config.engines = n;
        }
        for (id, k) in kernels {
            config.kernels.register(*id, k.clone());
        }
        let launcher = kmd_shim::FirmwareLauncher::Thread(Box::new(move |channel| {
            // Called again for each firmware restart: each boot gets its own config.
            let config = config.clone();
            std::thread::Builder::new()
                .name("fw-emu".into())
                .spawn(move || match fw_emu::Firmware::boot(channel, config) {
                    Ok(fw) => fw.run(),
                    Err(e) => eprintln!("userq: embedded firmware failed to boot: {e}"),
                })
        }));
        let mut kc = kmd_shim::KmdConfig::new(path, launcher);
        kc.server.max_connections = connection_bound(kc.server.max_connections);
        if let Some(v) = vram {
            kc.vram = v;
        }
        if let Some(watchdog) = wait_for_jobs {
            kc.eviction = kmd_shim::EvictionPolicy::WaitForIdleJobs { watchdog };
        }
        let kmd = Arc::new(kmd_shim::Kmd::start(kc)?);
        reg.insert(path.to_owned(), Arc::downgrade(&kmd));
        Ok(kmd)
    }

    /// The connections an embedded device serves: every one costs a descriptor of this
    /// process, which is the application's, so at most a quarter of its descriptor limit
    /// (at least 16, at most the daemon's `default`): a flood of connections from other
    /// processes then leaves the application most of its table.
    fn connection_bound(default: usize) -> usize {
        let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
        let quarter = limit.map_or(usize::MAX, |n| usize::try_from(n / 4).unwrap_or(usize::MAX));
        quarter.clamp(16, default.max(16))
    }

    /// A registered kernel's id and name, for `Debug`.
    pub(crate) fn describe((id, kernel): &KernelEntry) -> (u32, String) {
        (*id, kernel.name().to_owned())
    }

    /// Whether starting failed because another process already serves the socket.
    pub(crate) fn lost_race(e: &OpenError) -> bool {
        matches!(
            e,
            OpenError::Start(kmd_shim::StartError::Bind(kmd_shim::BindError::InUse(_)))
        )
    }
}

#[cfg(not(feature = "embedded"))]
mod imp {
    use crate::error::OpenError;
    use std::path::Path;

    /// No custom kernels without an embedded firmware.
    pub(crate) type KernelEntry = std::convert::Infallible;

    /// Never built: this build has no embedded mode.
    pub(crate) type Host = std::convert::Infallible;

    /// Embedded mode is not built in.
    pub(crate) fn start(
        _path: &Path,
        _kernels: &[KernelEntry],
        _engines: Option<usize>,
        _vram: Option<u64>,
        _wait_for_jobs: Option<std::time::Duration>,
    ) -> Result<Host, OpenError> {
        Err(OpenError::EmbeddedUnavailable)
    }

    /// Never called: there are no kernel entries.
    pub(crate) fn describe(e: &KernelEntry) -> (u32, String) {
        match *e {}
    }

    /// Never: nothing was started.
    pub(crate) fn lost_race(_e: &OpenError) -> bool {
        false
    }
}

pub(crate) use imp::{describe, lost_race, start, Host, KernelEntry};
