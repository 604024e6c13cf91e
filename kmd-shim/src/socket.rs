//! DOC: the device socket: where it lives, how exactly one server binds it, how a client
//! reaches it.
//!
//! The socket is a Unix `SOCK_SEQPACKET` socket. Its default path is
//! `$XDG_RUNTIME_DIR/userq/dev0.sock`, or `/tmp/userq-$UID/dev0.sock` where there is no
//! runtime directory. Binding happens under an `flock` on the socket's directory, after a
//! connect probe: if a live server answers, binding is refused with
//! [`BindError::InUse`]; if the file is left over from a dead server, it is replaced. So two
//! processes racing to start an embedded device end with one server and one client.

use rustix::fd::{AsFd, BorrowedFd, OwnedFd};
use rustix::fs::{FlockOperation, Mode, OFlags};
use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
use std::path::{Path, PathBuf};

/// Why the device socket could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// A live device already serves this path.
    #[error("a device is already serving {0}")]
    InUse(PathBuf),
    /// The directory could not be made private or the socket could not be created.
    #[error("cannot bind {path}: {source}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// The failing call's error.
        source: rustix::io::Errno,
    },
}

pub use userq_uapi::socket::{connect, default_socket_path};

/// A bound, listening device socket; the file is removed on drop if it is still ours.
#[derive(Debug)]
pub struct Listener {
    fd: OwnedFd,
    path: PathBuf,
    /// (device, inode) of the socket file we bound: a later server may replace the file
    /// once ours stops answering, and its file must survive our drop.
    identity: (u64, u64),
}

/// Locks the socket's directory (an `flock` released when the returned fd closes).
fn lock_dir(path: &Path) -> rustix::io::Result<OwnedFd> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let fd = rustix::fs::open(
        dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    rustix::fs::flock(&fd, FlockOperation::LockExclusive)?;
    Ok(fd)
}

/// Whether the directory is safe to serve from: owned by us (or root), a directory, not a
/// symbolic link. Another user must not be able to plant a device for us.
fn dir_is_ours(dir: &Path) -> bool {
    match rustix::fs::lstat(dir) {
        Ok(st) => {
            let me = rustix::process::getuid().as_raw();
            rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Directory
                && (st.st_uid == me || st.st_uid == 0)
        }
        Err(_) => false,
    }
}

impl Listener {
    /// Binds `path` unless a live device serves it already.
    pub fn bind(path: &Path) -> Result<Listener, BindError> {
        let io = |source| BindError::Io {
            path: path.to_owned(),
            source,
        };
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(|e| {
                io(rustix::io::Errno::from_io_error(&e).unwrap_or(rustix::io::Errno::IO))
            })?;
            let _ = rustix::fs::chmod(dir, Mode::RWXU);
        }
        if !dir_is_ours(dir) {
            return Err(io(rustix::io::Errno::PERM));
        }
        let dirfd = lock_dir(path).map_err(io)?;
        if connect(path).is_ok() {
            return Err(BindError::InUse(path.to_owned()));
        }
        match rustix::fs::unlink(path) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => {}
            Err(e) => return Err(io(e)),
        }
        let fd = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )
        .map_err(io)?;
        rustix::net::bind(&fd, &SocketAddrUnix::new(path).map_err(io)?).map_err(io)?;
        let _ = rustix::fs::chmod(path, Mode::RUSR | Mode::WUSR);
        rustix::net::listen(&fd, 128).map_err(io)?;
        // Connections are taken when the socket is readable: accept must never block.
        rustix::fs::fcntl_setfl(&fd, OFlags::NONBLOCK).map_err(io)?;
        let st = rustix::fs::stat(path).map_err(io)?;
        // The directory lock is released when `dirfd` closes here.
        drop(dirfd);
        Ok(Listener {
            fd,
            path: path.to_owned(),
            identity: (st.st_dev, st.st_ino),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Takes a waiting connection (a blocking socket); `AGAIN` when there is none (the
    /// listening socket does not block).
    pub fn accept(&self) -> rustix::io::Result<OwnedFd> {
        rustix::net::accept_with(&self.fd, SocketFlags::CLOEXEC)
    }

    /// The listening socket, to wait on it for connections.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Makes a blocked and every later [`Listener::accept`] fail.
    pub fn stop(&self) {
        let _ = rustix::net::shutdown(self.fd.as_fd(), rustix::net::Shutdown::Both);
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        // Under the directory lock, so no other server binds between the check and the
        // unlink.
        let _lock = lock_dir(&self.path);
        if let Ok(st) = rustix::fs::stat(&self.path) {
            if (st.st_dev, st.st_ino) == self.identity {
                let _ = rustix::fs::unlink(&self.path);
            }
        }
    }
}
