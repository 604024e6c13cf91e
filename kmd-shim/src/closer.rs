//! DOC: closing the descriptors a client sent that kmd-shim does not use, off the workers.
//!
//! A close can block. A TCP socket with `SO_LINGER` set and unsent data waits out its
//! linger time. A file on a FUSE mount waits for the mount's daemon to answer FLUSH, on
//! every close. A client can send such a descriptor and close its own copy, so that
//! kmd-shim's close is the one that waits. So a descriptor that is not a memfd (the only
//! kind a request may carry) is never closed on a worker:
//!
//! - a socket first has its linger turned into an abort, so its close returns at once;
//! - every such descriptor then goes to one closer thread.
//!
//! A close that never returns holds only that thread, and the descriptors queued behind it
//! stay open meanwhile (ARCHITECTURE, "Known limits"). `tests/connection.rs` sends
//! lingering sockets, more of them than there are workers, through the real server.

use rustix::fd::OwnedFd;
use std::sync::mpsc::{channel, Sender};
use std::sync::OnceLock;
use std::time::Duration;

/// The closer thread's queue; `None` if the thread could not be started (then descriptors
/// are closed where they are disposed of).
static CLOSER: OnceLock<Option<Sender<OwnedFd>>> = OnceLock::new();

/// Closes `fd`, a descriptor a client sent that is not a memfd, without blocking the caller.
pub(crate) fn dispose(fd: OwnedFd) {
    if rustix::net::sockopt::socket_type(&fd).is_ok() {
        // Zero linger: the close resets the connection instead of waiting for the peer to
        // take the unsent data. (The socket is the client's own; its copy is reset too.)
        let _ = rustix::net::sockopt::set_socket_linger(&fd, Some(Duration::ZERO));
    }
    let closer = CLOSER.get_or_init(|| {
        let (tx, rx) = channel::<OwnedFd>();
        std::thread::Builder::new()
            .name("kmd-fd-closer".into())
            .spawn(move || rx.into_iter().for_each(drop))
            .ok()
            .map(|_| tx)
    });
    match closer {
        Some(tx) => {
            // The thread never ends while `CLOSER` holds its sender; a failed send hands
            // the descriptor back, and it is closed here.
            let _ = tx.send(fd);
        }
        None => drop(fd),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{ErrorKind, Read};
    use std::net::{TcpListener, TcpStream};

    /// A socket set to linger is aborted, not closed gracefully: its peer sees a reset
    /// (a graceful close would give it an end of file). That a close of a lingering socket
    /// holds no worker is checked through the server, in `tests/connection.rs`.
    #[test]
    fn a_lingering_socket_is_aborted() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut peer, _) = listener.accept().unwrap();
        rustix::net::sockopt::set_socket_linger(&stream, Some(Duration::from_secs(60))).unwrap();
        dispose(stream.into());
        peer.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let got = peer.read(&mut [0u8; 16]);
        assert!(
            matches!(&got, Err(e) if e.kind() == ErrorKind::ConnectionReset),
            "{got:?}"
        );
    }
}
