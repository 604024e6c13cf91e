//! How resets touched a context: [`Device::reset_stats`], as `gem_reset_stats` and
//! `GL_ARB_robustness` report it.

use crate::device::Device;
use crate::error::ControlError;
use userq_uapi::ioctl::Reply;
use userq_uapi::ioctl::{Request, ResetStatsReply};

/// What a context had to do with resets, so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ResetStats {
    /// Hangs of this context's queues; each reset its queue.
    pub guilty: u32,
    /// This context's queues stopped by what they did not do: a wait on a fence another
    /// queue's hang (or a ban) poisoned; plus one for each loss of the device while the
    /// context was open (still readable from a context the loss left behind).
    pub innocent: u32,
    /// Whether the context is banned: it may create nothing more, its queues take no work.
    pub banned: bool,
}

/// The short answer of [`ResetStats::status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetStatus {
    /// A queue of this context hung and was reset.
    Guilty,
    /// This context lost work to a reset it did not cause.
    Innocent,
    /// No reset touched this context.
    Unaffected,
}

impl ResetStats {
    /// Guilty if it ever hung, else innocent if a reset ever cost it work, else unaffected.
    pub fn status(&self) -> ResetStatus {
        if self.guilty > 0 {
            ResetStatus::Guilty
        } else if self.innocent > 0 {
            ResetStatus::Innocent
        } else {
            ResetStatus::Unaffected
        }
    }
}

impl Device {
    /// How resets touched this context (one control call).
    pub fn reset_stats(&self) -> Result<ResetStats, ControlError> {
        let (v, _) = self.inner.call(Request::ResetStats, &[])?;
        let r = ResetStatsReply::decode(&v).map_err(|e| ControlError::Protocol(e.describe()))?;
        Ok(ResetStats {
            guilty: r.guilty,
            innocent: r.innocent,
            banned: r.banned,
        })
    }
}
