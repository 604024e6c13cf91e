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
