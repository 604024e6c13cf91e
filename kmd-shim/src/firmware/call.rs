//! DOC: requests to the firmware: [`FirmwareLink::call`] and
//! [`FirmwareLink::call_many`] (post, then sleep a bounded time until the acks come),
//! [`FirmwareLink::post`] (no wait: for the event thread), and
//! what a request that could not be posted or acknowledged means for the device.

use super::{FirmwareLink, Sender};
use rustix::fd::{AsFd, BorrowedFd};
use std::sync::atomic::Ordering::*;
use std::time::{Duration, Instant};
use userq_uapi::fwmsg::{FwRequest, FwStatus, ObjectId};
use userq_uapi::os;
use userq_uapi::sync::{Backoff, BackoffStep};
use userq_uapi::KmdStatus;

impl FirmwareLink {
    /// Sends `objects` on the channel, posts `req`, and waits for its ack.
    pub fn call(
        &self,
        req: FwRequest,
        objects: &[(ObjectId, BorrowedFd<'_>)],
    ) -> Result<(), KmdStatus> {
        if self.is_lost() {
            return Err(KmdStatus::DeviceLost);
        }
        let seq = {
            let mut s = self.sender.lock().unwrap_or_else(|e| e.into_inner());
            for (id, fd) in objects {
                os::send_with_fds(s.channel.as_fd(), &id.to_le_bytes(), &[*fd])
                    .map_err(|_| KmdStatus::DeviceLost)?;
            }
            self.push_tracked(&mut s, req)?
        };
        self.wait_acks(&[seq]).remove(0)
    }

    /// Posts `reqs` back to back (the firmware applies them in order), then waits for all
    /// their acks: one round trip instead of one per request. Results in request order.
    pub fn call_many(&self, reqs: &[FwRequest]) -> Vec<Result<(), KmdStatus>> {
        if self.is_lost() {
            return vec![Err(KmdStatus::DeviceLost); reqs.len()];
        }
        let mut seqs = Vec::with_capacity(reqs.len());
        {
            let mut s = self.sender.lock().unwrap_or_else(|e| e.into_inner());
            for r in reqs {
                match self.push_tracked(&mut s, *r) {
                    Ok(seq) => seqs.push(seq),
                    Err(e) => {
                        drop(s);
                        let mut out = self.wait_acks(&seqs);
                        out.resize(reqs.len(), Err(e));
                        return out;
                    }
                }
            }
        }
        self.wait_acks(&seqs)
    }

    /// Pushes one request whose ack a caller will wait for. Called with the sender lock.
    fn push_tracked(&self, s: &mut Sender, req: FwRequest) -> Result<u32, KmdStatus> {
        let seq = s.next_seq;
        s.next_seq = s.next_seq.wrapping_add(1).max(1);
        self.acks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(seq, None);
        if !self.push_request(&req.encode(seq)) {
            self.forget_ack(seq);
            return Err(self.push_failed());
        }
        Ok(seq)
    }

    /// Waits (bounded by the ack timeout) for the acks of `seqs`, asleep on the acks'
    /// condition variable, which the event thread signals. It does not spin first: the
    /// firmware that must act on the requests, and the event thread that brings the acks
    /// back, may be queued on this very vCPU (with a client spinning on the other one,
    /// kmd-shim and the firmware share one), and a spin holds them off for its whole
    /// length. A page fault's service waits here once; its round trip was 91-124 us at
    /// p50 with a 30 us spin, 43-97 us without (`userq-bench paging`, three runs each,
    /// alternated); queue creation and a one-page migration measured the same either way.
    fn wait_acks(&self, seqs: &[u32]) -> Vec<Result<(), KmdStatus>> {
        let deadline = Instant::now() + self.ack_timeout;
        let mut out: Vec<Option<Result<(), KmdStatus>>> = vec![None; seqs.len()];
        let mut acks = self.acks.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            for (i, seq) in seqs.iter().enumerate() {
                if out[i].is_none() {
                    if let Some(Some(status)) = acks.get(seq).copied() {
                        acks.remove(seq);
                        out[i] = Some(match status {
                            FwStatus::Ok => Ok(()),
                            FwStatus::NotFound => Err(KmdStatus::NotFound),
                            FwStatus::Exists => Err(KmdStatus::InvalidArgument),
                            FwStatus::BadObject | FwStatus::Malformed => Err(KmdStatus::Internal),
                            FwStatus::PreemptTimeout => Err(KmdStatus::Preempted),
                            FwStatus::Busy => Err(KmdStatus::Busy),
                        });
                    }
                }
            }
            if out.iter().all(Option::is_some) {
                return out.into_iter().flatten().collect();
            }
            let now = Instant::now();
            let failed = if self.is_lost() {
                Some(KmdStatus::DeviceLost)
            } else if now >= deadline {
                Some(KmdStatus::FirmwareTimeout)
            } else {
                None
            };
            if let Some(e) = failed {
                for (i, seq) in seqs.iter().enumerate() {
                    if out[i].is_none() {
                        acks.remove(seq);
                    }
                }
                drop(acks);
                let e = if e == KmdStatus::FirmwareTimeout {
                    self.timed_out()
                } else {
                    e
                };
                return out.into_iter().map(|r| r.unwrap_or(Err(e))).collect();
            }
            acks = self
                .acked
                .wait_timeout(acks, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Posts `req` without waiting for its ack (which is dropped when it comes): for the
    /// event thread, which delivers acks and so must never wait for one. Requests that
    /// name memory objects go through [`FirmwareLink::call`].
    pub fn post(&self, req: FwRequest) -> Result<(), KmdStatus> {
        if self.is_lost() {
            return Err(KmdStatus::DeviceLost);
        }
        let mut s = self.sender.lock().unwrap_or_else(|e| e.into_inner());
        let seq = s.next_seq;
        s.next_seq = s.next_seq.wrapping_add(1).max(1);
        if self.push_request(&req.encode(seq)) {
            Ok(())
        } else {
            Err(self.push_failed())
        }
    }

    /// Why a request could not even be posted: the device was lost meanwhile, or the
    /// firmware left its ring full for the whole ack timeout (then it is hung).
    fn push_failed(&self) -> KmdStatus {
        if self.is_lost() {
            KmdStatus::DeviceLost
        } else {
            self.timed_out()
        }
    }

    /// Pushes a request's words onto `to_fw` (waiting a bounded time for room) and kicks
    /// the firmware. Called with the sender lock held, so requests keep their order.
    fn push_request(&self, words: &[u64; 8]) -> bool {
        let ring = &self.control.to_fw;
        let deadline = Instant::now() + self.ack_timeout;
        let mut backoff = Backoff::new(Duration::from_micros(20), Duration::from_millis(1));
        while !ring.push(words) {
            self.kick_firmware();
            if Instant::now() >= deadline || self.is_lost() {
                return false;
            }
            if backoff.step() == BackoffStep::Sleep {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        self.kick_firmware();
        true
    }

    fn forget_ack(&self, seq: u32) {
        self.acks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&seq);
    }

    /// A request went unacknowledged for the whole ack timeout. Acks are bounded by
    /// design (the firmware never waits on work to send one), so the firmware is hung: the
    /// device is declared lost, and kmd-shim's view and the firmware's can no longer
    /// disagree afterwards. The event thread reports it on its next wake-up.
    fn timed_out(&self) -> KmdStatus {
        if !self.stopping.load(Acquire) {
            self.hung.store(true, Release);
        }
        KmdStatus::FirmwareTimeout
    }
}
