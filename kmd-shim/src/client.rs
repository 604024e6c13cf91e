//! DOC: one client connection: peer check, request loop, and cleanup on close.
//!
//! Every message is untrusted. A message of the wrong size, an unknown op, the wrong
//! number of file descriptors, or fds that are not userq objects get an error reply and
//! the connection goes on; attached descriptors that are not used are closed. When the
//! connection closes, for whatever reason (including SIGKILL of the client), the context
//! and everything it owned are reclaimed.

use crate::device::{Device, Reply};
use rustix::fd::{AsFd, OwnedFd};
use userq_uapi::ioctl::{RawReply, Request, MESSAGE_SIZE};
use userq_uapi::{os, KmdStatus, ABI_VERSION};

/// Whether the peer may use the device: the same user as kmd-shim, or root.
fn peer_allowed(sock: &OwnedFd) -> bool {
    match rustix::net::sockopt::socket_peercred(sock) {
        Ok(cred) => {
            let me = rustix::process::getuid();
            cred.uid == me || cred.uid.is_root()
        }
        Err(_) => false,
    }
}

/// Serves one connection until it closes, then reclaims its context.
pub fn serve(dev: &Device, sock: OwnedFd) {
    if !peer_allowed(&sock) {
        let r = RawReply::new(KmdStatus::PermissionDenied, &[]);
        let _ = os::send_with_fds(sock.as_fd(), bytemuck::bytes_of(&r), &[]);
        return;
    }
    let mut ctx: Option<u32> = None;
    loop {
        let mut buf = [0u8; 2 * MESSAGE_SIZE];
        let got = match os::recv_with_fds(sock.as_fd(), &mut buf) {
            Ok(g) => g,
            Err(rustix::io::Errno::INTR) => continue,
            Err(_) => break,
        };
        if got.len == 0 && got.fds.is_empty() {
            break; // closed
        }
        let result = if got.truncated || got.len != MESSAGE_SIZE {
            Err(KmdStatus::Malformed)
        } else {
            handle(dev, &mut ctx, &buf[..got.len], got.fds)
        };
        let (reply, fds) = match result {
            Ok((values, fds)) => (RawReply::new(KmdStatus::Ok, &values), fds),
            Err(status) => (RawReply::new(status, &[]), Vec::new()),
        };
        let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
        if os::send_with_fds(sock.as_fd(), bytemuck::bytes_of(&reply), &borrowed).is_err() {
            break;
        }
    }
    if let Some(c) = ctx {
        dev.close_context(c);
    }
}

fn handle(
    dev: &Device,
    ctx: &mut Option<u32>,
    bytes: &[u8],
    fds: Vec<OwnedFd>,
) -> Result<Reply, KmdStatus> {
    let req = Request::decode(bytes)?;
    if fds.len() != req.fds_in() {
        return Err(KmdStatus::BadFd);
    }
    let c = match (req, *ctx) {
        (Request::OpenContext { abi_version }, None) => {
            if abi_version != ABI_VERSION {
                return Err(KmdStatus::AbiMismatch);
            }
            let (id, reply) = dev.open_context()?;
            *ctx = Some(id);
            return Ok(reply);
        }
        (Request::OpenContext { .. }, Some(_)) => return Err(KmdStatus::ContextExists),
        (_, None) => return Err(KmdStatus::NoContext),
        (_, Some(c)) => c,
    };
    match req {
        Request::OpenContext { .. } => Err(KmdStatus::ContextExists),
        Request::CreateQueue {
            ring_entries,
            priority,
            time_slice_us,
        } => dev.create_queue(c, ring_entries, priority, time_slice_us),
        Request::DestroyQueue { slot } => dev.destroy_queue(c, slot),
        Request::CreateFence { initial } => dev.create_fence(c, initial),
        Request::ImportFence => dev.import_fence(c, &fds),
        Request::ReleaseFence { handle } => dev.release_fence(c, handle),
        Request::AllocBuffer { size } => dev.alloc_buffer(c, size),
        Request::FreeBuffer { va } => dev.free_buffer(c, va),
        Request::ImportBuffer => dev.import_buffer(c, &fds),
    }
}
