//! Child processes of the bench: the bench re-executes itself in a *role* (`__fw`,
//! `__echo-unix`, …). Every child is registered so that a Ctrl-C (or any exit of the
//! parent through [`Children`]'s drop) kills and reaps all of them.

use rustix::fd::{AsFd, AsRawFd, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};
use userq::uapi::shm::{Sealing, ShmBytes};

fn registry() -> &'static Mutex<Vec<u32>> {
    static R: OnceLock<Mutex<Vec<u32>>> = OnceLock::new();
    R.get_or_init(Default::default)
}

/// Kills (SIGKILL) every registered child and its process group members we started.
pub fn kill_all() {
    let pids: Vec<u32> = registry()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .drain(..)
        .collect();
    for pid in pids {
        if let Some(p) = rustix::process::Pid::from_raw(pid as i32) {
            let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
            let _ = rustix::process::waitpid(Some(p), rustix::process::WaitOptions::empty());
        }
    }
}

/// A child process in a role; killed and reaped on drop.
pub struct Role {
    child: Option<Child>,
    name: String,
}

impl Role {
    /// Starts `current_exe <role> args…`, keeping `inherit` open in the child.
    pub fn spawn(
        role: &str,
        args: &[String],
        inherit: Option<&OwnedFd>,
        stdout: Stdio,
    ) -> std::io::Result<Role> {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.arg(role).args(args).stdout(stdout).stdin(Stdio::null());
        let raw = inherit.map(|f| f.as_raw_fd());
        // SAFETY: runs in the forked child before exec, calling only async-signal-safe
        // syscalls (fcntl, prctl) on a descriptor the child inherited.
        unsafe {
            cmd.pre_exec(move || {
                if let Some(raw) = raw {
                    let fd = rustix::fd::BorrowedFd::borrow_raw(raw);
                    rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::empty())?;
                }
                rustix::process::set_parent_process_death_signal(Some(
                    rustix::process::Signal::KILL,
                ))?;
                Ok(())
            });
        }
        let child = cmd.spawn()?;
        registry()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(child.id());
        Ok(Role {
            child: Some(child),
            name: role.to_owned(),
        })
    }

    /// The child.
    pub fn child(&mut self) -> &mut Child {
        self.child.as_mut().expect("running")
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// Asks the child to stop (SIGTERM) and waits up to `limit`, then kills it.
    pub fn stop(mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        unregister(c.id());
        if let Some(p) = rustix::process::Pid::from_raw(c.id() as i32) {
            let _ = rustix::process::kill_process(p, rustix::process::Signal::TERM);
        }
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = c.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        eprintln!("userq-bench: {} did not stop; killing it", self.name);
        let _ = c.kill();
        c.wait().ok()
    }
}

fn unregister(pid: u32) {
    registry()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|&p| p != pid);
}

impl Drop for Role {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unregister(c.id());
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Installs the Ctrl-C / SIGTERM handler of the parent: kill and reap every child, remove
/// the run's directory `dir`, exit 130.
pub fn reap_on_interrupt(dir: std::path::PathBuf) {
    let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let _ = signal_hook::flag::register(sig, flag.clone());
    }
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_millis(20));
        if flag.load(std::sync::atomic::Ordering::Relaxed) {
            kill_all();
            // The run's sockets and objects went with the children; their directory too.
            let _ = std::fs::remove_dir_all(&dir);
            eprintln!("userq-bench: interrupted; every child process was stopped");
            std::process::exit(130);
        }
    });
}

/// A zero-filled shared memfd of `len` bytes, mapped here.
pub fn shared_memory(len: usize) -> std::io::Result<(OwnedFd, ShmBytes)> {
    let fd = userq::uapi::os::create_memfd("userq-bench", len as u64, Sealing::Final)?;
    let map = ShmBytes::map(fd.as_fd(), len).map_err(std::io::Error::other)?;
    Ok((fd, map))
}

/// Maps an inherited shared memfd given by its number on the command line.
pub fn inherited_memory(arg: &str) -> std::io::Result<ShmBytes> {
    let raw: i32 = arg
        .parse()
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "fd number"))?;
    if !userq::uapi::os::raw_fd_is_open(raw) {
        return Err(rustix::io::Errno::BADF.into());
    }
    // SAFETY: the descriptor is open (checked above) and the parent passed it to us for this
    // purpose; mapping does not take ownership, and the borrow lasts only for this call.
    let fd = unsafe { rustix::fd::BorrowedFd::borrow_raw(raw) };
    let len = rustix::fs::fstat(fd)?.st_size as usize;
    ShmBytes::map(fd, len).map_err(std::io::Error::other)
}
