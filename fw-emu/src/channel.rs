//! DOC: the object channel: how memory objects reach the firmware.
//!
//! kmd-shim sends each memfd as one `SOCK_SEQPACKET` message, an 8-byte
//! [`ObjectId`] with the fd attached, *before* it posts the request naming that object.
//! So when the firmware processes a request, the objects it names are already queued on
//! the socket; [`ObjectChannel::take`] never blocks.

use rustix::fd::{AsFd, OwnedFd};
use rustix::net::RecvFlags;
use std::collections::HashMap;
use userq_uapi::fwmsg::ObjectId;
use userq_uapi::os;

/// The firmware's end of the object channel.
#[derive(Debug)]
pub struct ObjectChannel {
    sock: OwnedFd,
    stash: HashMap<ObjectId, OwnedFd>,
}

impl ObjectChannel {
    /// Wraps the firmware's end of the socketpair.
    pub fn new(sock: OwnedFd) -> Self {
        ObjectChannel {
            sock,
            stash: HashMap::new(),
        }
    }

    /// Takes object `id` off the channel, reading and stashing others queued before it.
    /// `blocking` is used only at boot, before kmd-shim has anything else to do.
    pub fn take(&mut self, id: ObjectId, blocking: bool) -> Option<OwnedFd> {
        loop {
            if let Some(fd) = self.stash.remove(&id) {
                return Some(fd);
            }
            if !blocking {
                // Non-blocking read: only what is already queued.
                let mut probe = [0u8; 1];
                match rustix::net::recv(
                    &self.sock,
                    &mut probe,
                    RecvFlags::PEEK | RecvFlags::DONTWAIT,
                ) {
                    Ok(_) => {}
                    Err(_) => return None,
                }
            }
            let mut buf = [0u8; 8];
            let got = os::recv_with_fds(self.sock.as_fd(), &mut buf).ok()?;
            if got.len == 0 && got.fds.is_empty() {
                return None; // kmd-shim closed its end
            }
            let mut fds = got.fds.into_iter();
            match (got.len, fds.next()) {
                (8, Some(fd)) if !got.truncated => {
                    self.stash.insert(u64::from_le_bytes(buf), fd);
                }
                _ => {} // malformed message from kmd-shim: dropped, its fds closed
            }
        }
    }

    /// Closes an object whose request was refused. kmd-shim sent it before the request,
    /// so it is on the channel already (or stashed): take it off and drop it.
    pub fn discard(&mut self, id: ObjectId) {
        drop(self.take(id, false));
    }

    /// Whether kmd-shim has closed its end (checked without consuming anything).
    pub fn peer_closed(&self) -> bool {
        let mut probe = [0u8; 8];
        matches!(
            rustix::net::recv(
                &self.sock,
                &mut probe,
                RecvFlags::PEEK | RecvFlags::DONTWAIT
            ),
            Ok((0, _))
        )
    }
}

/// Why a `--channel-fd N` argument does not name this process's object channel.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelFdError {
    /// The argument is not a descriptor number.
    #[error("--channel-fd {0:?}: not a descriptor number")]
    NotANumber(String),
    /// 0, 1 and 2 are the standard streams, never the channel.
    #[error("--channel-fd {0}: a standard stream, not the channel")]
    StandardStream(i32),
    /// No such open descriptor, or not a Unix `SOCK_SEQPACKET` socket.
    #[error("--channel-fd {0}: not an inherited SOCK_SEQPACKET socket")]
    NotAChannel(i32),
    /// The channel was taken already: it has one owner per process.
    #[error("--channel-fd: the channel was taken already")]
    Taken,
}

/// Takes ownership of the object channel this process inherited from kmd-shim, named by
/// the value of its `--channel-fd` argument. The descriptor must be above the standard
/// streams, open, and a Unix `SOCK_SEQPACKET` socket; it is taken at most once per process,
/// so no two owners of it can exist through this function. The one way a firmware program
/// (`fw-emu`, a custom firmware, a benchmark's firmware role) turns the number into a
/// descriptor.
pub fn inherited_channel(arg: &str) -> Result<OwnedFd, ChannelFdError> {
    use rustix::fd::{BorrowedFd, FromRawFd, RawFd};
    use std::sync::atomic::{AtomicBool, Ordering};
    static TAKEN: AtomicBool = AtomicBool::new(false);
    let fd: RawFd = arg
        .parse()
        .map_err(|_| ChannelFdError::NotANumber(arg.to_owned()))?;
    if (0..=2).contains(&fd) {
        return Err(ChannelFdError::StandardStream(fd));
    }
    if fd < 0 {
        return Err(ChannelFdError::NotAChannel(fd));
    }
    // SAFETY: `fd` is open (checked first; a firmware program runs this at start-up, before
    // any other thread could close it), and the borrow is used only for the probe and ends
    // with this block.
    let is_channel = userq_uapi::os::raw_fd_is_open(fd)
        && unsafe {
            let probe = BorrowedFd::borrow_raw(fd);
            rustix::net::sockopt::socket_type(probe) == Ok(rustix::net::SocketType::SEQPACKET)
        };
    if !is_channel {
        return Err(ChannelFdError::NotAChannel(fd));
    }
    if TAKEN.swap(true, Ordering::AcqRel) {
        return Err(ChannelFdError::Taken);
    }
    // SAFETY: `fd` is open and a SEQPACKET socket (checked above), and its number came on
    // the command line kmd-shim built for this program, as socket activation hands out
    // LISTEN_FDS: the descriptor was inherited for the firmware and nothing else in the
    // process opened it. This function hands it out once per process, so the OwnedFd is
    // its only owner.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
