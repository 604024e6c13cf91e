//! DOC: how the firmware is started: a [`FirmwareLauncher`] (a child process in daemon
//! mode, a thread in embedded mode), and, for a process, the thread it is forked from.
//!
//! The child gets the firmware's end of the object channel as an inherited descriptor and
//! `PR_SET_PDEATHSIG`, so it never outlives kmd-shim. That signal fires when the *thread*
//! that forked the child exits, not the process, so the child is forked from a watcher
//! thread that lives exactly as long as the child: it waits for the child's exit without
//! reaping it (`waitid` with `WNOWAIT`; the link reaps it) and then wakes kmd-shim's event
//! thread, so a killed firmware is declared lost at once.

use rustix::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering::Release};
use std::sync::Arc;
use std::thread::JoinHandle;
use userq_uapi::layout::ControlRegion;
use userq_uapi::shm::Shm;
use userq_uapi::sync;

/// How the firmware is started.
pub enum FirmwareLauncher {
    /// Daemon mode: run a firmware executable as a child process, as
    /// `program [args…] --channel-fd N`. `fw-emu` takes no leading arguments; another
    /// program that embeds `fw_emu::Firmware` (a custom firmware build, a benchmark) may
    /// need some to select its firmware role.
    Process {
        /// The executable.
        program: PathBuf,
        /// Arguments placed before `--channel-fd N`.
        args: Vec<std::ffi::OsString>,
    },
    /// Embedded mode: a function that starts the firmware on a thread of this process,
    /// given the firmware's end of the object channel. Called again for each restart.
    Thread(Box<dyn Fn(OwnedFd) -> std::io::Result<JoinHandle<()>> + Send + Sync>),
}

impl std::fmt::Debug for FirmwareLauncher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FirmwareLauncher::Process { program, args } => f
                .debug_struct("Process")
                .field("program", program)
                .field("args", args)
                .finish(),
            FirmwareLauncher::Thread(_) => f.write_str("Thread(..)"),
        }
    }
}

impl FirmwareLauncher {
    /// The `fw-emu` binary next to the running executable (where cargo puts both).
    pub fn sibling_process() -> FirmwareLauncher {
        let exe = std::env::current_exe().unwrap_or_default();
        FirmwareLauncher::Process {
            program: exe.with_file_name("fw-emu"),
            args: Vec::new(),
        }
    }
}

fn errno(e: std::io::Error) -> rustix::io::Errno {
    rustix::io::Errno::from_io_error(&e).unwrap_or(rustix::io::Errno::IO)
}

/// Starts the firmware process from a watcher thread that lives exactly as long as the
/// process: the child's `PR_SET_PDEATHSIG` fires when the *thread* that forked it exits,
/// so forking from the caller's thread would kill the firmware when that thread ends. The
/// watcher waits for the child's exit without reaping it (`waitid` with `WNOWAIT`; the
/// link reaps it) and then wakes the event thread, so a killed firmware is declared lost
/// at once rather than at the event thread's next heartbeat check.
pub(crate) fn spawn_watched(
    path: &Path,
    args: &[std::ffi::OsString],
    channel: OwnedFd,
    control: Shm<ControlRegion>,
    seen: Arc<AtomicBool>,
) -> std::io::Result<Child> {
    let (tx, rx) = std::sync::mpsc::channel();
    let (path, args) = (path.to_owned(), args.to_vec());
    std::thread::Builder::new()
        .name("kmd-fw-watch".into())
        .spawn(move || {
            let child = match spawn_process(&path, &args, channel) {
                Ok(c) => c,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            let pid = rustix::process::Pid::from_child(&child);
            if tx.send(Ok(child)).is_err() {
                return;
            }
            let options =
                rustix::process::WaitIdOptions::EXITED | rustix::process::WaitIdOptions::NOWAIT;
            while let Err(rustix::io::Errno::INTR) =
                rustix::process::waitid(rustix::process::WaitId::Pid(pid), options)
            {}
            // The flag first: the event thread's re-check before it sleeps looks at it.
            seen.store(true, Release);
            control.kmd_kick.word.fetch_add(1, Release);
            sync::futex_wake_all(&control.kmd_kick.word);
        })?;
    rx.recv()
        .unwrap_or_else(|_| Err(std::io::Error::other("firmware watcher thread ended")))
}

fn spawn_process(
    path: &Path,
    args: &[std::ffi::OsString],
    channel: OwnedFd,
) -> std::io::Result<Child> {
    use std::os::unix::process::CommandExt;
    let raw = channel.as_raw_fd();
    let mut cmd = Command::new(path);
    cmd.args(args).arg("--channel-fd").arg(raw.to_string());
    // SAFETY: the closure runs in the forked child before exec and calls only
    // async-signal-safe syscalls (fcntl, prctl) on a descriptor the child inherited.
    unsafe {
        cmd.pre_exec(move || {
            let fd = rustix::fd::BorrowedFd::borrow_raw(raw);
            rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::empty())?;
            // The firmware must not outlive kmd-shim.
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))?;
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| std::io::Error::from_raw_os_error(errno(e).raw_os_error()))?;
    drop(channel);
    Ok(child)
}
