//! Error types, one per kind of operation.

use std::path::PathBuf;
pub use userq_uapi::error::ErrorCode;
pub use userq_uapi::KmdStatus;

/// A control-plane call to kmd-shim failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// kmd-shim refused the request.
    #[error("kmd-shim refused the request: {0}")]
    Rejected(KmdStatus),
    /// The connection to kmd-shim is gone: the device was stopped or lost.
    #[error("connection to the device closed")]
    Disconnected,
    /// kmd-shim answered with something that is not a valid reply.
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    /// kmd-shim did not take the request or answer it within the control timeout
    /// ([`crate::DeviceBuilder::control_timeout`]): the process serving the device is
    /// stopped or stuck. The connection is given up (a late answer could not be told from
    /// the next one's), so the device counts as lost for this context from then on.
    #[error("the device did not answer within {0:?}; the connection is given up")]
    Timeout(std::time::Duration),
    /// An object kmd-shim handed over could not be mapped or failed its check.
    #[error(transparent)]
    Map(#[from] userq_uapi::os::MapError),
}

/// [`crate::Device`] could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// No device answers on the socket.
    #[error("cannot connect to {path}: {source}")]
    Connect {
        /// The socket path tried.
        path: PathBuf,
        /// Why.
        source: rustix::io::Errno,
    },
    /// An embedded device could not be started.
    #[cfg(feature = "embedded")]
    #[error("cannot start an embedded device: {0}")]
    Start(#[from] kmd_shim::StartError),
    /// This build of userq has no embedded mode (cargo feature `embedded` off): only a
    /// running device can be opened.
    #[error("no device is running and this build has no embedded mode (feature `embedded`)")]
    EmbeddedUnavailable,
    /// The device refused or failed the context.
    #[error(transparent)]
    Control(#[from] ControlError),
}

/// [`crate::Device::queue`] could not create a queue.
#[derive(Debug, thiserror::Error)]
pub enum QueueCreateError {
    /// The ring size is not a power of two in the allowed range.
    #[error("ring size {0} is not a power of two between 2 and 65536")]
    BadRingSize(u32),
    /// The context already has the maximum number of queues.
    #[error("too many queues in this context")]
    TooManyQueues,
    /// The time slice is not between 1 µs and 1 s.
    #[error("time slice {0:?} is not between 1 µs and 1 s")]
    BadTimeSlice(std::time::Duration),
    /// The watchdog's timeout is not between 1 ms and 600 s.
    #[error("watchdog {0:?}: its timeout is not between 1 ms and 600 s")]
    BadWatchdog(userq_uapi::watchdog::Watchdog),
    /// The context was banned after repeated hangs.
    #[error("context banned after repeated hangs")]
    Banned,
    /// Another control-plane failure.
    #[error(transparent)]
    Control(#[from] ControlError),
}

/// A submission was refused. Nothing of it reached the ring.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubmitError {
    /// The ring has no room and the caller asked not to block.
    #[error("ring full")]
    WouldBlock,
    /// The batch has more packets than the ring has entries.
    #[error("batch of {batch} packets does not fit a ring of {entries}")]
    BatchTooLarge {
        /// Packets in the batch.
        batch: usize,
        /// Ring entries.
        entries: u64,
    },
    /// A command names a fence of another device connection; its handle means nothing
    /// to this queue's context. Import the fence into this device first.
    #[error("command names a fence that belongs to another device connection")]
    ForeignFence,
    /// The queue stopped on an error; nothing submitted now would run. Returned by the
    /// first submit after the firmware marked the queue stopped, not a ring later.
    #[error("queue stopped: {0}")]
    QueueFaulted(FenceFault),
    /// A command signals a fence this context may not write (a queue's timeline).
    #[error("command signals a fence that only the firmware may write")]
    FenceNotWritable,
    /// Waiting for room timed out.
    #[error("timed out waiting for room in the ring")]
    Timeout,
    /// The device is lost.
    #[error("device lost")]
    DeviceLost,
    /// A DISPATCH has more than 16 argument words.
    #[error("a dispatch takes at most 16 arguments")]
    TooManyKernelArgs,
    /// The queue's DISPATCH argument area could not be allocated.
    #[error("out of device memory for the dispatch argument area")]
    OutOfMemory,
    /// The context was banned after repeated hangs: its queues that were still running
    /// were stopped ([`ErrorCode::ContextBanned`]) and take no more work. (A queue that had
    /// stopped before, such as the one whose hang brought the ban, keeps its own error:
    /// [`SubmitError::QueueFaulted`]; `Device::reset_stats` tells whether the context is
    /// banned.)
    #[error("context banned after repeated hangs")]
    Banned,
}

impl SubmitError {
    /// The error for a queue that stopped with `f`.
    pub(crate) fn stopped(f: FenceFault) -> SubmitError {
        if f.code == Some(ErrorCode::ContextBanned) {
            SubmitError::Banned
        } else {
            SubmitError::QueueFaulted(f)
        }
    }
}

/// Why a fence was poisoned: the error record its signaller wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FenceFault {
    /// What happened; `None` for a code this build does not know.
    pub code: Option<ErrorCode>,
    /// Index of the packet that failed (its fence value would have been `packet_index + 1`).
    pub packet_index: u64,
    /// Offending address or write index, where there is one.
    pub address: u64,
    /// Code-specific detail (bad opcode, fence handle, poison code of a dependency).
    pub detail: u32,
    /// The last value that completed before the error.
    pub last_completed: u64,
}

impl std::fmt::Display for FenceFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.code {
            Some(c) => write!(f, "{}", c.describe())?,
            None => write!(f, "unknown error")?,
        }
        write!(
            f,
            " at packet {} (address {:#x}, detail {}), last completed value {}",
            self.packet_index, self.address, self.detail, self.last_completed
        )
    }
}

/// A wait did not see its fence reach the value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WaitError {
    /// The timeout passed first.
    #[error("timed out")]
    Timeout,
    /// The fence was poisoned: its queue stopped on an error, was destroyed, or its owner
    /// went away, before reaching the value.
    #[error("fence poisoned: {0}")]
    Faulted(FenceFault),
    /// The device was lost.
    #[error("device lost")]
    DeviceLost,
}

/// A host-side signal was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignalError {
    /// The fence is a queue's timeline: only the firmware signals it.
    #[error("a queue timeline fence cannot be signalled from the host")]
    ReadOnly,
    /// The fence is poisoned.
    #[error("fence poisoned: {0}")]
    Poisoned(FenceFault),
    /// The value is below the fence's current one: fences never go backwards.
    #[error("fence is at {current}, above {requested}: fences never go backwards")]
    Backwards {
        /// The fence's value.
        current: u64,
        /// The value asked for.
        requested: u64,
    },
}

/// Creating, exporting or importing a fence failed.
#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    /// The fds given to import are not the two objects of one live userq fence.
    #[error("not a userq fence of this device")]
    NotAFence,
    /// Duplicating a descriptor failed.
    #[error("cannot duplicate a fence descriptor: {0}")]
    Dup(rustix::io::Errno),
    /// The context was banned after repeated hangs: it may create or import no fence.
    #[error("context banned after repeated hangs")]
    Banned,
    /// Another control-plane failure.
    #[error(transparent)]
    Control(ControlError),
}

impl From<ControlError> for FenceError {
    fn from(e: ControlError) -> Self {
        match e {
            ControlError::Rejected(KmdStatus::Banned) => FenceError::Banned,
            e => FenceError::Control(e),
        }
    }
}

/// Allocating a buffer failed.
#[derive(Debug, thiserror::Error)]
pub enum AllocError {
    /// Zero elements, or more bytes than one buffer may have.
    #[error("invalid buffer size")]
    BadSize,
    /// The device-memory budget is exhausted.
    #[error("out of device memory")]
    OutOfMemory,
    /// The descriptor given to import is not a buffer of this device.
    #[error("not a userq buffer of this device")]
    NotABuffer,
    /// The context was banned after repeated hangs: it may allocate or import nothing.
    #[error("context banned after repeated hangs")]
    Banned,
    /// Another control-plane failure.
    #[error(transparent)]
    Control(ControlError),
}

impl From<ControlError> for AllocError {
    fn from(e: ControlError) -> Self {
        match e {
            ControlError::Rejected(KmdStatus::Banned) => AllocError::Banned,
            e => AllocError::Control(e),
        }
    }
}

/// [`crate::Queue::set_watchdog`] failed.
#[derive(Debug, thiserror::Error)]
pub enum WatchdogError {
    /// The watchdog's timeout is not between 1 ms and 600 s.
    #[error("watchdog {0:?}: its timeout is not between 1 ms and 600 s")]
    Invalid(userq_uapi::watchdog::Watchdog),
    /// The context was banned after repeated hangs.
    #[error("context banned after repeated hangs")]
    Banned,
    /// Another control-plane failure.
    #[error(transparent)]
    Control(ControlError),
}

impl From<ControlError> for WatchdogError {
    fn from(e: ControlError) -> Self {
        match e {
            ControlError::Rejected(KmdStatus::Banned) => WatchdogError::Banned,
            e => WatchdogError::Control(e),
        }
    }
}
