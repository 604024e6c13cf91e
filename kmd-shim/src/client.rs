//! DOC: one client connection: peer check, one request and its reply at a time.
//!
//! Every message is untrusted. A message of the wrong size, an unknown op, the wrong
//! number of file descriptors, or fds that are not userq objects get an error reply and
//! the connection goes on; attached descriptors that are not used are closed. The
//! [`crate::server`] calls [`serve_one`] whenever a connection is readable; when the
//! connection closes, for whatever reason (including SIGKILL of the client), the server
//! reclaims the context and everything it owned.

use crate::device::Device;
use rustix::fd::{AsFd, OwnedFd};
use userq_uapi::ioctl::{EmptyReply, RawReply, Reply, Request, MESSAGE_SIZE};
use userq_uapi::{os, KmdStatus, ABI_VERSION};

/// Whether the peer may use the device: the same user as kmd-shim, or root.
pub(crate) fn peer_allowed(sock: &OwnedFd) -> bool {
    os::peer_credentials(sock.as_fd()).is_ok_and(|c| c.same_user_or_root())
}

/// Tells a peer why its connection is closed before it sent anything: it failed the peer
/// check (`PermissionDenied`), or the server is full (`LimitExceeded`). Its first request
/// reads this as the answer.
pub(crate) fn refuse(sock: &OwnedFd, status: KmdStatus) {
    let r = RawReply::new(status, &[]);
    let _ = os::try_send_with_fds(sock.as_fd(), bytemuck::bytes_of(&r), &[]);
}

/// Receives one request on a readable connection and sends its reply. `ctx` is the
/// connection's context (set by OPEN_CONTEXT). Returns false when the connection is over:
/// closed by the peer, broken, or not taking its replies (the reply is sent without
/// waiting: a client that sends requests and does not read the answers fills its queue,
/// and then loses its connection instead of holding a worker). The caller then reclaims
/// the context.
///
/// Every descriptor a request may carry is a memfd. One that is not makes the request
/// `BadFd` before anything looks at it, and it is closed off this thread
/// (the closer thread, `closer.rs`): its close could block.
pub fn serve_one(dev: &Device, sock: &OwnedFd, ctx: &mut Option<u32>) -> bool {
    let mut buf = [0u8; 2 * MESSAGE_SIZE];
    let got = match os::recv_with_fds(sock.as_fd(), &mut buf) {
        Ok(g) => g,
        // Readiness said readable; a spurious wake-up or a signal is not the end.
        Err(rustix::io::Errno::INTR) | Err(rustix::io::Errno::AGAIN) => return true,
        Err(_) => return false,
    };
    // Nothing read: the peer closed, or sent an empty message (SEQPACKET carries those),
    // which is malformed like any other wrong size.
    if got.len == 0 && got.fds.is_empty() && os::hung_up(sock.as_fd()) {
        return false;
    }
    let (fds, foreign): (Vec<_>, Vec<_>) =
        got.fds.into_iter().partition(|f| os::is_memfd(f.as_fd()));
    let any_foreign = !foreign.is_empty();
    foreign.into_iter().for_each(crate::closer::dispose);
    let result = if got.truncated || got.len != MESSAGE_SIZE {
        Err(KmdStatus::Malformed)
    } else if any_foreign {
        Err(KmdStatus::BadFd)
    } else {
        handle(dev, sock, ctx, &buf[..got.len], fds)
    };
    let (reply, fds) = match result {
        Ok(answer) => (RawReply::new(KmdStatus::Ok, &answer.values), answer.fds),
        Err(status) => (RawReply::new(status, &[]), Vec::new()),
    };
    let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
    os::try_send_with_fds(sock.as_fd(), bytemuck::bytes_of(&reply), &borrowed).is_ok()
}

/// A successful reply as it goes on the socket: its values and descriptors.
struct Answer {
    values: [u64; 7],
    fds: Vec<OwnedFd>,
}

impl Answer {
    fn new<R: Reply, const N: usize>(reply: R, fds: [OwnedFd; N]) -> Answer {
        Answer {
            values: reply.encode(),
            fds: fds.into(),
        }
    }
}

fn handle(
    dev: &Device,
    sock: &OwnedFd,
    ctx: &mut Option<u32>,
    bytes: &[u8],
    fds: Vec<OwnedFd>,
) -> Result<Answer, KmdStatus> {
    let req = Request::decode(bytes)?;
    if fds.len() != req.fds_in() {
        return Err(KmdStatus::BadFd);
    }
    let c = match (req, *ctx) {
        // Observers and tracers need no context.
        (Request::Observe { abi_version }, _) => {
            let (reply, fds) = dev.observe(abi_version)?;
            return Ok(Answer::new(reply, fds));
        }
        (Request::ProfileFd { ctx, slot }, _) => {
            let fd = dev.profile_fd(ctx, slot)?;
            return Ok(Answer::new(EmptyReply, [fd]));
        }
        (Request::OpenContext { abi_version }, None) => {
            if abi_version != ABI_VERSION {
                return Err(KmdStatus::AbiMismatch);
            }
            // 0: a peer in a PID namespace kmd-shim cannot see (it is still served; the
            // pid only labels its context in status and events).
            let pid = os::peer_credentials(sock.as_fd()).map_or(0, |c| c.pid.unwrap_or(0));
            let (reply, fds) = dev.open_context(pid)?;
            *ctx = Some(reply.ctx);
            return Ok(Answer::new(reply, fds));
        }
        (Request::OpenContext { .. }, Some(_)) => return Err(KmdStatus::ContextExists),
        (_, None) => return Err(KmdStatus::NoContext),
        (_, Some(c)) => c,
    };
    let empty = |()| Answer::new(EmptyReply, []);
    let creates = matches!(
        req,
        Request::CreateQueue { .. }
            | Request::CreateFence { .. }
            | Request::ImportFence
            | Request::AllocBuffer { .. }
            | Request::ImportBuffer
            | Request::SetWatchdog { .. }
    );
    if !dev.is_current(c) && !matches!(req, Request::ResetStats) {
        // Its firmware was lost (and perhaps restarted): none of its objects exist. (Its
        // reset statistics still answer: the loss is counted there.)
        return Err(KmdStatus::DeviceLost);
    }
    if creates && dev.is_banned(c) {
        return Err(KmdStatus::Banned);
    }
    match req {
        Request::OpenContext { .. } => Err(KmdStatus::ContextExists),
        Request::CreateQueue {
            ring_entries,
            priority,
            time_slice_us,
            watchdog,
            profile,
        } => dev
            .create_queue(c, ring_entries, priority, time_slice_us, watchdog, profile)
            .map(|(reply, fds)| Answer {
                values: reply.encode(),
                fds,
            }),
        Request::DestroyQueue { slot } => dev.destroy_queue(c, slot).map(empty),
        Request::CreateFence { initial } => dev
            .create_fence(c, initial)
            .map(|(reply, fds)| Answer::new(reply, fds)),
        Request::ImportFence => dev
            .import_fence(c, &fds)
            .map(|reply| Answer::new(reply, [])),
        Request::ReleaseFence { handle } => dev.release_fence(c, handle).map(empty),
        Request::AllocBuffer { size, flags } => dev
            .alloc_buffer(c, size, flags)
            .map(|(reply, fds)| Answer::new(reply, fds)),
        Request::FreeBuffer { va } => dev.free_buffer(c, va).map(empty),
        Request::ImportBuffer => dev
            .import_buffer(c, &fds)
            .map(|reply| Answer::new(reply, [])),
        Request::SetWatchdog { slot, watchdog } => dev.set_watchdog(c, slot, watchdog).map(empty),
        Request::ResetStats => dev.reset_stats(c).map(|reply| Answer::new(reply, [])),
        Request::Migrate { va, len, to } => dev.migrate(c, va, len, to).map(empty),
        // Answered above, with or without a context; the same answers here.
        Request::Observe { abi_version } => dev
            .observe(abi_version)
            .map(|(reply, fds)| Answer::new(reply, fds)),
        Request::ProfileFd { ctx, slot } => dev
            .profile_fd(ctx, slot)
            .map(|fd| Answer::new(EmptyReply, [fd])),
        Request::PagingStats { part } => {
            let parts = dev.paging_stats().parts();
            Ok(Answer::new(
                userq_uapi::ioctl::PagingStatsReply(parts[part.min(1) as usize]),
                [],
            ))
        }
    }
}
