//! DOC: hangs, queue resets, bans and the reset statistics (like amdgpu's job timeout
//! handler and xe's TDR, with i915's ban policy).
//!
//! The firmware reports a hang ([`FwEvent::Hang`]) once per dispatch; kmd-shim decides,
//! on its event thread:
//!
//! 1. the queue's context is guilty: its hang is counted, and its recent hangs are kept
//!    for the ban policy;
//! 2. the queue is reset ([`FwRequest::ResetQueue`], naming the dispatch, so a dispatch that
//!    completed meanwhile is left alone): only that queue stops, its timeline poisoned with
//!    the hang's code, the error record before the state word before the wake;
//! 3. a context with [`Limits::ban_after_hangs`] hangs within [`Limits::ban_window`] is
//!    banned ([`FwRequest::BanContext`]): every queue of it stops with
//!    `ContextBanned`, and it may create no more queues, fences or buffers
//!    ([`KmdStatus::Banned`]).
//!
//! The event thread posts these requests without waiting for their acks (it is the thread
//! that would deliver them), so it never waits on anything but a ring slot. No path here
//! waits on a fence or a job.
//!
//! A context's queue stopped by what it did not do is counted as innocent: a WAIT_FENCE
//! on a fence poisoned by another queue's hang or ban (the firmware reports
//! `DependencyFailed` with the poison code), or the loss of the device. RESET_STATS
//! answers with the counts, as `gem_reset_stats` and `GL_ARB_robustness` do.
//!
//! [`Limits::ban_after_hangs`]: crate::Limits::ban_after_hangs
//! [`Limits::ban_window`]: crate::Limits::ban_window

use crate::device::Device;
use std::collections::VecDeque;
use std::time::Instant;
use userq_uapi::error::ErrorCode;
use userq_uapi::fwmsg::{FwEvent, FwRequest};
use userq_uapi::ioctl::ResetStatsReply;
use userq_uapi::layout::EventKind;
use userq_uapi::watchdog::Watchdog;
use userq_uapi::KmdStatus;

/// How resets touched a context.
#[derive(Debug, Default)]
pub(crate) struct ResetRecord {
    /// Hangs of its queues.
    guilty: u32,
    /// Its queues stopped by others' hangs, and device losses.
    innocent: u32,
    /// When its recent hangs were, oldest first (within the ban window).
    recent: VecDeque<Instant>,
    banned: bool,
}

impl Device {
    /// A hang report: count it, reset the queue, ban a context that keeps hanging.
    pub(crate) fn on_hang(&self, ev: FwEvent) {
        let FwEvent::Hang {
            ctx,
            slot,
            code,
            packet_index,
            elapsed_ms,
            job,
        } = ev
        else {
            return;
        };
        let now = Instant::now();
        let ban = {
            let mut t = self.table();
            let Some(c) = t.contexts.get_mut(&ctx) else {
                return; // gone already: its queues went with it
            };
            let r = &mut c.resets;
            r.guilty += 1;
            r.recent.push_back(now);
            while r
                .recent
                .front()
                .is_some_and(|&t0| now.duration_since(t0) > self.limits.ban_window)
            {
                r.recent.pop_front();
            }
            let ban = !r.banned && r.recent.len() >= self.limits.ban_after_hangs.max(1) as usize;
            r.banned |= ban;
            let (row, g, i, b) = (c.row, r.guilty, r.innocent, r.banned);
            drop(t);
            self.telemetry_resets(row, g, i, b);
            ban
        };
        self.event(
            EventKind::HangDetected,
            ctx,
            slot,
            [code as u64, elapsed_ms, packet_index],
        );
        if self.verbose {
            eprintln!(
                "kmd-shim: context {ctx} queue {slot} hung at packet {packet_index} ({}, {elapsed_ms} ms); resetting the queue",
                code.describe()
            );
        }
        let _ = self.link().post(FwRequest::ResetQueue {
            ctx,
            slot,
            code,
            detail: u32::try_from(elapsed_ms).unwrap_or(u32::MAX),
            packet_index,
            job,
        });
        self.event(
            EventKind::QueueReset,
            ctx,
            slot,
            [code as u64, 0, packet_index],
        );
        if ban {
            self.event(EventKind::ContextBanned, ctx, u32::MAX, [0; 3]);
            if self.verbose {
                eprintln!("kmd-shim: context {ctx} banned after repeated hangs");
            }
            let _ = self.link().post(FwRequest::BanContext { ctx });
        }
    }

    /// A queue error report: a queue that failed on a fence another hang poisoned is an
    /// innocent victim of that reset.
    pub(crate) fn count_victim(&self, ctx: u32, code: ErrorCode, detail: u32) {
        let by_reset = ErrorCode::from_u32(detail)
            .is_some_and(|c| c.is_hang() || c == ErrorCode::ContextBanned);
        if code == ErrorCode::DependencyFailed && by_reset {
            let mut t = self.table();
            if let Some(c) = t.contexts.get_mut(&ctx) {
                c.resets.innocent += 1;
                let (row, r) = (c.row, &c.resets);
                let (g, i, b) = (r.guilty, r.innocent, r.banned);
                drop(t);
                self.telemetry_resets(row, g, i, b);
            }
        }
    }

    /// The device was lost: every context was affected without being guilty.
    pub(crate) fn count_device_loss(&self) {
        let mut rows = Vec::new();
        for c in self.table().contexts.values_mut() {
            c.resets.innocent += 1;
            let r = &c.resets;
            rows.push((c.row, r.guilty, r.innocent, r.banned));
        }
        for (row, g, i, b) in rows {
            self.telemetry_resets(row, g, i, b);
        }
    }

    /// Whether context `ctx` is banned.
    pub(crate) fn is_banned(&self, ctx: u32) -> bool {
        self.table()
            .contexts
            .get(&ctx)
            .is_some_and(|c| c.resets.banned)
    }

    /// RESET_STATS. First a [`FwRequest::Sync`] round trip: by its ack every queue error
    /// the firmware reported before is counted, so a client that saw its queue fail
    /// finds the failure in its statistics.
    pub fn reset_stats(&self, ctx: u32) -> Result<ResetStatsReply, KmdStatus> {
        // A lost device answers with what was counted: the loss is counted already.
        let _ = self.link().call(FwRequest::Sync, &[]);
        let t = self.table();
        let r = &t.contexts.get(&ctx).ok_or(KmdStatus::NoContext)?.resets;
        Ok(ResetStatsReply {
            guilty: r.guilty,
            innocent: r.innocent,
            banned: r.banned,
        })
    }

    /// SET_WATCHDOG: changes a queue's hang detection, for its running dispatch too.
    pub fn set_watchdog(&self, ctx: u32, slot: u32, watchdog: Watchdog) -> Result<(), KmdStatus> {
        {
            let t = self.table();
            let c = t.contexts.get(&ctx).ok_or(KmdStatus::NoContext)?;
            if !c.queues.contains_key(&slot) {
                return Err(KmdStatus::NotFound);
            }
        }
        self.link().call(
            FwRequest::SetWatchdog {
                ctx,
                slot,
                watchdog,
            },
            &[],
        )
    }
}
