//! Process harness for the system tests: every child is killed and reaped on drop, even
//! when the test fails, and every temporary directory is removed.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// `target/<profile>`, where cargo puts the workspace's executables.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_owned()
}

/// An executable of the workspace; fails with a hint if it was not built.
pub fn workspace_bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} not built: run the tests with `cargo test --workspace`, which builds every binary",
        p.display()
    );
    p
}

/// The test client.
pub fn testclient() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_userq-testclient"))
}

/// A private temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "userq-test-{}-{}-{}",
            tag,
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process that is killed and reaped on drop.
pub struct Proc {
    pub child: Option<Child>,
    pub name: String,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command) -> Proc {
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Proc {
            child: Some(child),
            name: name.to_owned(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Waits for exit; kills it and fails the test after `limit`.
    pub fn wait_for(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        let child = self.child.as_mut().expect("running");
        loop {
            if let Some(s) = child.try_wait().expect("try_wait") {
                self.child = None;
                return s;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                self.child = None;
                panic!("{} did not exit within {limit:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits for exit and collects stdout/stderr (the child must have been spawned with
    /// piped output).
    /// The running child (to write its stdin).
    pub fn child(&mut self) -> &mut Child {
        self.child.as_mut().expect("running")
    }

    pub fn output_within(mut self, limit: Duration) -> Output {
        let child = self.child.take().expect("running");
        let name = self.name.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let pid = child.id();
        let reader = std::thread::spawn(move || {
            let out = child.wait_with_output();
            let _ = tx.send(());
            out
        });
        if rx.recv_timeout(limit).is_err() {
            let _ = rustix::process::kill_process(
                rustix::process::Pid::from_raw(pid as i32).expect("pid"),
                rustix::process::Signal::KILL,
            );
            let _ = reader.join();
            panic!("{name} did not exit within {limit:?}");
        }
        reader.join().expect("reader").expect("wait_with_output")
    }

    /// Waits for exit within `limit`, fails the test unless it succeeded, and returns its
    /// stdout (the child must have been spawned with piped output).
    pub fn succeeded(self, limit: Duration) -> String {
        let name = self.name.clone();
        let out = self.output_within(limit);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{name} failed ({}): {stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }

    pub fn signal(&self, sig: rustix::process::Signal) {
        if let Some(c) = &self.child {
            let _ = rustix::process::kill_process(
                rustix::process::Pid::from_raw(c.id() as i32).expect("pid"),
                sig,
            );
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Child process ids of `pid` (from /proc).
pub fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
                out.extend(s.split_whitespace().filter_map(|x| x.parse::<u32>().ok()));
            }
        }
    }
    out
}

/// The state letter of a process or thread (`stat_path` is its `/proc/…/stat`), if it
/// exists: `R`, `S`, `T` (stopped), `Z` (zombie), …
pub fn state(stat_path: &Path) -> Option<char> {
    let s = std::fs::read_to_string(stat_path).ok()?;
    s.rsplit_once(") ")?.1.chars().next()
}

/// Whether a process exists (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    state(Path::new(&format!("/proc/{pid}/stat"))).is_some_and(|c| c != 'Z')
}

/// Whether every thread of a process is stopped (SIGSTOP takes effect asynchronously).
pub fn all_threads_stopped(pid: u32) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/task")).is_ok_and(|d| {
        d.flatten()
            .all(|t| state(&t.path().join("stat")) == Some('T'))
    })
}

/// CPU time (user + system) of a process or thread, in clock ticks.
pub fn cpu_ticks(stat_path: &str) -> u64 {
    let s = std::fs::read_to_string(stat_path).expect("read stat");
    let rest = s.rsplit_once(") ").expect("stat format").1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state is field 3, utime 14, stime 15 (1-based in proc(5)).
    f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime")
}

/// A kmd-shim daemon on a private socket; stopped (SIGTERM, then SIGKILL) on drop, after
/// which neither it nor its firmware may remain.
pub struct Daemon {
    /// The process spawned: kmd-shim, or the wrapper it runs under.
    pub proc: Proc,
    /// kmd-shim itself (`proc`'s pid unless it runs under a wrapper).
    pub kmd_pid: u32,
    pub socket: PathBuf,
    pub fw_pid: u32,
    /// [`Daemon::stop`] saw both exit: their pids may belong to others by now.
    stopped: bool,
    _dir: TempDir,
}

impl Daemon {
    pub fn start() -> Daemon {
        Daemon::start_with(&[])
    }

    /// A daemon with extra command-line arguments.
    pub fn start_with(args: &[&str]) -> Daemon {
        Daemon::start_under(&[], args)
    }

    /// A daemon run by `wrapper` (a command that runs its arguments as its only child, such
    /// as `unshare --fork`; empty: none), with extra command-line arguments.
    pub fn start_under(wrapper: &[&str], args: &[&str]) -> Daemon {
        let dir = TempDir::new("daemon");
        let socket = dir.path().join("dev.sock");
        let kmd = workspace_bin("kmd-shim");
        let mut cmd = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(&kmd);
                c
            }
            None => Command::new(&kmd),
        };
        let proc = Proc::spawn(
            "kmd-shim",
            cmd.arg("--socket")
                .arg(&socket)
                .arg("--quiet")
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            // Serving: a context opens (so the firmware has booted; one killed while it
            // boots fails the start instead of being restarted).
            if socket.exists() && userq::Device::connect(&socket).is_ok() {
                let kmd_pid = if wrapper.is_empty() {
                    Some(proc.pid())
                } else {
                    children_of(proc.pid()).first().copied()
                };
                if let Some((kmd_pid, fw)) =
                    kmd_pid.and_then(|k| Some((k, *children_of(k).first()?)))
                {
                    return Daemon {
                        proc,
                        kmd_pid,
                        socket,
                        fw_pid: fw,
                        stopped: false,
                        _dir: dir,
                    };
                }
            }
            assert!(
                Instant::now() < deadline,
                "kmd-shim did not start serving within 10 s (no client could open a context)"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops the daemon and checks that nothing is left behind.
    pub fn stop(mut self) {
        let _ = rustix::process::kill_process(
            rustix::process::Pid::from_raw(self.kmd_pid as i32).expect("pid"),
            rustix::process::Signal::TERM,
        );
        let status = self.proc.wait_for(Duration::from_secs(10));
        assert!(status.success(), "kmd-shim exited with {status}");
        assert!(!self.socket.exists(), "kmd-shim left its socket behind");
        let deadline = Instant::now() + Duration::from_secs(5);
        while alive(self.fw_pid) {
            assert!(Instant::now() < deadline, "fw-emu outlived kmd-shim");
            std::thread::sleep(Duration::from_millis(10));
        }
        self.stopped = true;
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // `stop` consumed the process already on the success path; this is the failure path.
        self.proc.signal(rustix::process::Signal::KILL);
        if self.stopped {
            return;
        }
        for pid in [self.kmd_pid, self.fw_pid] {
            if alive(pid) {
                let _ = rustix::process::kill_process(
                    rustix::process::Pid::from_raw(pid as i32).expect("pid"),
                    rustix::process::Signal::KILL,
                );
            }
        }
    }
}

/// A test client hosting an embedded device on `socket` (`nofile`: with its descriptor
/// limit lowered to that first), once it says it is ready; killed and reaped on drop.
pub fn host_embedded(socket: &Path, nofile: Option<u64>) -> Proc {
    let mut args = vec![
        "host".to_owned(),
        socket.to_str().expect("utf-8").to_owned(),
    ];
    args.extend(nofile.map(|n| n.to_string()));
    let mut host = Proc::spawn(
        "userq-testclient host",
        Command::new(testclient())
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
    );
    let stdout = host.child().stdout.take().expect("stdout");
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).expect("read");
    assert_eq!(line.trim(), "ready", "the host did not start");
    host
}

/// Runs the test client with a scenario against a device socket.
pub fn client(socket: &Path, args: &[&str]) -> Proc {
    Proc::spawn(
        &format!("userq-testclient {}", args.join(" ")),
        Command::new(testclient())
            .args(args)
            .env("USERQ_DEVICE", socket)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )
}

/// Runs a client to completion and returns its stdout; fails on a non-zero exit.
pub fn run_client(socket: &Path, args: &[&str]) -> String {
    client(socket, args).succeeded(Duration::from_secs(60))
}
