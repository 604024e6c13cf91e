//! DOC: where a device is reached: the default socket path and the client's connect.
//!
//! A device is a Unix `SOCK_SEQPACKET` socket served by kmd-shim (a daemon, or a process
//! running an embedded device). Its default path is `$XDG_RUNTIME_DIR/userq/dev0.sock`, or
//! `/tmp/userq-$UID/dev0.sock` where there is no runtime directory. These live in the ABI
//! crate so that a daemon-only client reaches a device without linking kmd-shim.

use rustix::fd::{AsFd, OwnedFd};
use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
use std::path::{Path, PathBuf};

/// The default socket path, as described in the module docs.
pub fn default_socket_path() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(dir) => PathBuf::from(dir).join("userq").join("dev0.sock"),
        None => {
            let uid = rustix::process::getuid().as_raw();
            PathBuf::from(format!("/tmp/userq-{uid}")).join("dev0.sock")
        }
    }
}

/// Connects to a device socket served by this user (or root): a server run by anyone
/// else is refused with `EPERM`, since it would hand this process memory to map.
pub fn connect(path: &Path) -> rustix::io::Result<OwnedFd> {
    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?;
    rustix::net::connect(&fd, &SocketAddrUnix::new(path)?)?;
    if !crate::os::peer_credentials(fd.as_fd())?.same_user_or_root() {
        return Err(rustix::io::Errno::PERM);
    }
    Ok(fd)
}
