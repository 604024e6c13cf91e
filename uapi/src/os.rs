//! DOC: the platform layer: memfds and their seals, read-only re-opens, fd passing, peer
//! credentials.
//!
//! Every shared object is a sealed memfd (it can neither shrink nor grow, so no mapper can
//! be made to fault by another process truncating it). Mapping one is [`crate::shm`]'s
//! job: typed handles, checked once.

use rustix::fd::{BorrowedFd, OwnedFd};
use rustix::fs::{MemfdFlags, SealFlags};
use rustix::io;
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;

/// Why a shared object could not be mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    /// fstat or mmap failed, or the object is smaller than asked.
    #[error("cannot map object: {0}")]
    Io(#[from] io::Errno),
    /// The object is not of the expected kind or ABI version.
    #[error(transparent)]
    Header(#[from] crate::layout::HeaderError),
}

/// Creates a memfd of `size` bytes (zero-filled), sealed against shrinking and growing,
/// and, with [`crate::shm::Sealing::Final`], against further seals.
pub fn create_memfd(name: &str, size: u64, sealing: crate::shm::Sealing) -> io::Result<OwnedFd> {
    let fd = rustix::fs::memfd_create(name, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)?;
    rustix::fs::ftruncate(&fd, size)?;
    let mut seals = SealFlags::SHRINK | SealFlags::GROW;
    if sealing == crate::shm::Sealing::Final {
        seals |= SealFlags::SEAL;
    }
    rustix::fs::fcntl_add_seals(&fd, seals)?;
    Ok(fd)
}

/// Allocates every page of the object now (`fallocate(2)`, mode 0), so that no later
/// access has to find memory for it: the access neither takes the fault that allocates a
/// page nor can fail for want of one (a shmem page that cannot be allocated on touch
/// raises `SIGBUS` in the process touching it). An object too big for the memory left
/// fails here, with `ENOMEM` or `ENOSPC`; under memory pressure the kernel may instead
/// reclaim or, at worst, wake the OOM killer, as for any allocation.
pub fn commit(fd: BorrowedFd<'_>, size: u64) -> io::Result<()> {
    loop {
        match rustix::fs::fallocate(fd, rustix::fs::FallocateFlags::empty(), 0, size) {
            // A signal interrupted it: the pages allocated so far stay; go on.
            Err(io::Errno::INTR) => continue,
            r => return r,
        }
    }
}

/// Forbids every *new* writable mapping of the object and every `write(2)`
/// (`F_SEAL_FUTURE_WRITE`), whatever descriptor or `/proc/self/fd` re-open is used;
/// existing writable mappings (kmd-shim's, the firmware's) keep working. Then seals the
/// seals.
pub fn seal_read_only(fd: BorrowedFd<'_>) -> io::Result<()> {
    rustix::fs::fcntl_add_seals(fd, SealFlags::FUTURE_WRITE | SealFlags::SEAL)
}

/// A new read-only open file description of the same object: whoever holds only this fd
/// cannot map the object writable.
pub fn reopen_read_only(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    use rustix::fd::AsRawFd;
    let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
    rustix::fs::open(
        path.as_str(),
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
}

/// Identity of the object behind an fd: (device, inode).
pub fn object_identity(fd: BorrowedFd<'_>) -> io::Result<(u64, u64)> {
    let st = rustix::fs::fstat(fd)?;
    Ok((st.st_dev, st.st_ino))
}

/// Whether `fd` is a memfd: it answers `F_GET_SEALS`, which only memfds (shmem and
/// hugetlbfs files) do. The check does not reach the file's filesystem, so a descriptor on
/// a FUSE mount whose daemon never answers cannot block it, as `fstat` can.
pub fn is_memfd(fd: BorrowedFd<'_>) -> bool {
    rustix::fs::fcntl_get_seals(fd).is_ok()
}

/// The credentials of a Unix socket's peer, as the kernel recorded them when the
/// connection was made (`SO_PEERCRED`), translated into this process's namespaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCredentials {
    /// The peer's process id, `None` when the peer is in no PID namespace this process can
    /// see (the kernel reports 0: for example, this process runs in a container and the
    /// peer outside it).
    pub pid: Option<u32>,
    /// The peer's user id.
    pub uid: u32,
    /// The peer's group id.
    pub gid: u32,
}

impl PeerCredentials {
    /// Whether the peer runs as this process's user or as root: the one check both ends
    /// of a device socket make (kmd-shim of a client, a client of the server).
    pub fn same_user_or_root(&self) -> bool {
        self.uid == rustix::process::getuid().as_raw() || self.uid == 0
    }
}

/// Whether `fd` names an open descriptor of this process: the check to make before a raw
/// number from the command line is borrowed (`BorrowedFd::borrow_raw` requires an open
/// one). Through libc, as rustix takes only borrowed descriptors.
pub fn raw_fd_is_open(fd: i32) -> bool {
    // SAFETY: F_GETFD only reads the descriptor table's flags for `fd`; any integer is a
    // valid argument (EBADF for one that is not open).
    unsafe { libc::fcntl(fd, libc::F_GETFD) != -1 }
}

/// Reads the peer's credentials of a connected Unix socket. Not through rustix: its `UCred`
/// keeps the pid in a non-zero type, which the kernel's 0 for an invisible peer would make
/// undefined behaviour.
pub fn peer_credentials(sock: BorrowedFd<'_>) -> io::Result<PeerCredentials> {
    use rustix::fd::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` is a valid, writable `struct ucred` of `len` bytes and `len` a valid
    // socklen_t; the kernel writes at most `len` bytes and any bit pattern is a valid
    // `ucred` (three integers). `sock` is borrowed, so the descriptor is open.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(
            io::Errno::from_io_error(&std::io::Error::last_os_error()).unwrap_or(io::Errno::IO)
        );
    }
    if len as usize != std::mem::size_of::<libc::ucred>() {
        return Err(io::Errno::INVAL);
    }
    Ok(PeerCredentials {
        pid: u32::try_from(cred.pid).ok().filter(|&p| p != 0),
        uid: cred.uid,
        gid: cred.gid,
    })
}

/// Whether the peer of a connected socket has hung up (or the socket has an error), by a
/// poll that does not wait. A zero-length read on a SEQPACKET socket is either a hang-up or
/// an empty message; this tells them apart.
pub fn hung_up(sock: BorrowedFd<'_>) -> bool {
    use rustix::event::{poll, PollFd, PollFlags};
    let mut fds = [PollFd::new(&sock, PollFlags::RDHUP)];
    let zero = rustix::time::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    matches!(poll(&mut fds, Some(&zero)), Ok(n) if n > 0)
        && fds[0]
            .revents()
            .intersects(PollFlags::HUP | PollFlags::RDHUP | PollFlags::ERR)
}

/// Sends one message with file descriptors attached.
pub fn send_with_fds(sock: BorrowedFd<'_>, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    send_flags(sock, bytes, fds, SendFlags::NOSIGNAL)
}

/// [`send_with_fds`] without waiting: a peer whose receive queue is full (one that does not
/// read what it is sent) gets `AGAIN` instead of holding the sender.
pub fn try_send_with_fds(
    sock: BorrowedFd<'_>,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    send_flags(sock, bytes, fds, SendFlags::NOSIGNAL | SendFlags::DONTWAIT)
}

fn send_flags(
    sock: BorrowedFd<'_>,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
    flags: SendFlags,
) -> io::Result<()> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(4))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Errno::INVAL);
    }
    let iov = [IoSlice::new(bytes)];
    let n = rustix::net::sendmsg(sock, &iov, &mut control, flags)?;
    if n != bytes.len() {
        return Err(io::Errno::MSGSIZE);
    }
    Ok(())
}

/// One message received with [`recv_with_fds`].
#[derive(Debug)]
pub struct Received {
    /// Bytes of payload (0 with no fds means the peer closed the connection).
    pub len: usize,
    /// Descriptors attached (close-on-exec).
    pub fds: Vec<OwnedFd>,
    /// The payload or the descriptors did not fit and were cut.
    pub truncated: bool,
}

/// Receives one message and any descriptors attached to it (up to 4).
pub fn recv_with_fds(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Received> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(4))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = rustix::net::recvmsg(sock, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC)?;
    let mut fds = Vec::new();
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(it) = m {
            fds.extend(it);
        }
    }
    let truncated = msg
        .flags
        .intersects(ReturnFlags::TRUNC | ReturnFlags::CTRUNC);
    Ok(Received {
        len: msg.bytes,
        fds,
        truncated,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shm::Sealing;
    use rustix::fd::AsFd;

    #[test]
    fn commit_allocates_every_page_of_a_memfd() {
        const SIZE: u64 = 1 << 20;
        let fd = create_memfd("t", SIZE, Sealing::Final).unwrap();
        let allocated = |fd: &OwnedFd| rustix::fs::fstat(fd).unwrap().st_blocks as u64 * 512;
        assert_eq!(allocated(&fd), 0, "a new memfd is sparse");
        commit(fd.as_fd(), SIZE).unwrap();
        assert!(allocated(&fd) >= SIZE, "{} of {SIZE} bytes", allocated(&fd));
        // Sealed against growing: committing past the end is refused.
        assert!(commit(fd.as_fd(), 2 * SIZE).is_err());
    }

    fn seqpacket_pair() -> (OwnedFd, OwnedFd) {
        rustix::net::socketpair(
            rustix::net::AddressFamily::UNIX,
            rustix::net::SocketType::SEQPACKET,
            rustix::net::SocketFlags::CLOEXEC,
            None,
        )
        .unwrap()
    }

    #[test]
    fn peer_credentials_name_the_peer() {
        let (a, _b) = seqpacket_pair();
        let cred = peer_credentials(a.as_fd()).unwrap();
        assert_eq!(cred.pid, Some(std::process::id()));
        assert_eq!(cred.uid, rustix::process::getuid().as_raw());
        assert_eq!(cred.gid, rustix::process::getgid().as_raw());
        // Not a socket: an error, not a made-up peer.
        let memfd = create_memfd("t", 4096, Sealing::Final).unwrap();
        assert_eq!(peer_credentials(memfd.as_fd()), Err(io::Errno::NOTSOCK));
    }

    #[test]
    fn an_empty_message_is_not_a_hang_up() {
        let (a, b) = seqpacket_pair();
        send_with_fds(b.as_fd(), &[], &[]).unwrap();
        let mut buf = [0u8; 8];
        let got = recv_with_fds(a.as_fd(), &mut buf).unwrap();
        assert_eq!((got.len, got.fds.len()), (0, 0));
        assert!(!hung_up(a.as_fd()), "an empty message");
        drop(b);
        let got = recv_with_fds(a.as_fd(), &mut buf).unwrap();
        assert_eq!((got.len, got.fds.len()), (0, 0));
        assert!(hung_up(a.as_fd()), "the peer closed");
    }

    #[test]
    fn only_memfds_are_memfds() {
        let memfd = create_memfd("t", 4096, Sealing::Final).unwrap();
        assert!(is_memfd(memfd.as_fd()));
        let (r, w) = rustix::pipe::pipe().unwrap();
        assert!(!is_memfd(r.as_fd()) && !is_memfd(w.as_fd()));
        let file = std::fs::File::open("/proc/self/exe").unwrap();
        assert!(!is_memfd(file.as_fd()));
        let (a, _b) = seqpacket_pair();
        assert!(!is_memfd(a.as_fd()));
    }
}
