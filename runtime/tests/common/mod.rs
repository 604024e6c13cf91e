//! An embedded device on a private socket for each test; the directory is removed when the
//! test ends, however it ends.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use userq::{Device, DeviceBuilder, ErrorCode, OpenMode, WaitError};

/// A test's device.
pub struct Env {
    dev: Option<Device>,
    dir: PathBuf,
}

impl Env {
    /// A default embedded device.
    pub fn new() -> Env {
        Env::with(Device::builder())
    }

    /// An embedded device from a builder (kernels, engines).
    pub fn with(builder: DeviceBuilder) -> Env {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "userq-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let dev = builder
            .socket(dir.join("dev.sock"))
            .mode(OpenMode::Embedded)
            .open()
            .expect("embedded device");
        Env {
            dev: Some(dev),
            dir,
        }
    }

    /// The device.
    pub fn dev(&self) -> &Device {
        self.dev.as_ref().expect("open")
    }

    /// A second context on the same device, as another process would have.
    pub fn second(&self) -> Device {
        Device::connect(self.dev().socket_path()).expect("second context")
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.dev.take();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The code a wait ended with, which must be a fault.
pub fn fault_code(r: Result<(), WaitError>) -> ErrorCode {
    match r {
        Err(WaitError::Faulted(f)) => f.code.expect("known code"),
        other => panic!("expected a fault, got {other:?}"),
    }
}

/// The thread ids of this process's threads named `name` (for pinning the embedded
/// firmware's command processor, `fw-emu`).
pub fn threads(name: &str) -> Vec<i32> {
    std::fs::read_dir("/proc/self/task")
        .expect("tasks")
        .flatten()
        .filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == name))
        .filter_map(|t| t.file_name().to_str()?.parse().ok())
        .collect()
}

/// Pins a thread (`None`: the calling one) to `cpu`.
pub fn pin(tid: Option<i32>, cpu: usize) {
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    rustix::thread::sched_setaffinity(tid.and_then(rustix::process::Pid::from_raw), &set)
        .expect("pin");
}
