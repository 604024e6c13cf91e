//! An in-process kmd-shim for the integration tests, its firmware the `fw-emu` built next
//! to `kmd-shim`: stopped, and its directory removed, on drop, even when a test fails.

/// A running device and its temporary directory.
pub struct Device {
    kmd: Option<kmd_shim::Kmd>,
    dir: std::path::PathBuf,
}

impl Device {
    /// Starts a device in a fresh directory named after `tag`, its configuration adjusted
    /// by `edit`.
    pub fn start(tag: &str, edit: impl FnOnce(&mut kmd_shim::KmdConfig)) -> Device {
        let dir = std::env::temp_dir().join(format!("userq-kmd-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let fw = std::path::Path::new(env!("CARGO_BIN_EXE_kmd-shim")).with_file_name("fw-emu");
        let launcher = kmd_shim::FirmwareLauncher::Process {
            program: fw,
            args: Vec::new(),
        };
        let mut config = kmd_shim::KmdConfig::new(dir.join("dev.sock"), launcher);
        config.verbose = false;
        edit(&mut config);
        let kmd = kmd_shim::Kmd::start(config).expect("device");
        Device {
            kmd: Some(kmd),
            dir,
        }
    }

    /// The device.
    pub fn kmd(&self) -> &kmd_shim::Kmd {
        self.kmd.as_ref().expect("running")
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        drop(self.kmd.take());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
