//! DOC: error codes that cross process boundaries.
//!
//! [`ErrorCode`] is what the firmware or kmd-shim writes into a fence's
//! [`crate::layout::ErrorRecord`] and poison word, and what it reports on the fw→kmd ring.
//! [`KmdStatus`] is the status word of a control-socket reply.

/// Why a queue stopped or a fence was poisoned.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// A packet with an opcode this ABI does not define; `detail` is the opcode.
    UnknownOpcode = 1,
    /// A packet with a non-zero reserved field; `detail` is the word index.
    ReservedField = 2,
    /// WAIT_FENCE with an unknown condition; `detail` is the low 32 bits of it.
    BadWaitCondition = 3,
    /// A fence handle this context does not hold; `detail` is the handle.
    BadFenceHandle = 4,
    /// SIGNAL_FENCE on a fence the context may only read; `detail` is the handle.
    FenceNotWritable = 5,
    /// An address that is not 8-byte aligned; `address` is it.
    MisalignedAddress = 6,
    /// An address outside the queue's VM; `address` is it.
    MemoryViolation = 7,
    /// The published write index moved backwards or ran more than a ring ahead of the read
    /// index; `address` is the write index seen.
    BadWriteIndex = 8,
    /// WAIT_FENCE on a fence that was poisoned; `detail` is that fence's poison code.
    DependencyFailed = 9,
    /// The queue was destroyed before reaching the value waited for.
    QueueDestroyed = 10,
    /// The context that owned this fence or queue went away.
    OwnerDied = 11,
    /// The device was lost; every object of its generation is gone.
    DeviceLost = 12,
    /// DISPATCH of a kernel id the firmware does not have; `detail` is the id.
    UnknownKernel = 13,
    /// DISPATCH whose arguments do not fit the kernel: wrong count, a buffer outside the
    /// VM or too small for the grid; `detail` is the argument index, `address` its value.
    BadKernelArgs = 14,
    /// DISPATCH with an empty or oversized grid or workgroup, or too many arguments.
    BadGrid = 15,
    /// A running workgroup did not yield within the preemption timeout when its queue had
    /// to stop (suspend): the queue was reset.
    PreemptTimeout = 16,
    /// A dispatch ran past its queue's job timeout: the queue was reset. `detail` is the
    /// time it had run, in milliseconds.
    JobTimeout = 17,
    /// A dispatch of a long-running queue finished no workgroup and reached no checkpoint
    /// for its queue's no-progress timeout: the queue was reset. `detail` is the time
    /// without progress, in milliseconds.
    NoProgress = 18,
    /// The queue's context was banned after repeated hangs: its queues were stopped and
    /// it may create no more.
    ContextBanned = 19,
    /// SIGNAL_FENCE with a value below the fence's current one (fences never go
    /// backwards; SET_FENCE sets flag words). `address` is the fence's value, `detail` the
    /// handle.
    FenceBackwards = 20,
    /// A workgroup's footprint needs more device pages at once than the whole
    /// device-memory budget holds: it can never run. `address` is the first page it
    /// needed, `detail` the pages it needed.
    WorkingSetTooLarge = 21,
    /// kmd-shim's `WaitForIdleJobs` eviction policy (the dma-fence way, off by default)
    /// waited for a job that waits for this queue's fault: the cycle was caught by its
    /// watchdog and the faulting queue stopped. `address` is the faulting address.
    EvictionDeadlock = 22,
    /// An on-demand buffer was freed while this queue's dispatch used it. `address` is
    /// the buffer's device address.
    BufferFreed = 23,
    /// A kernel raised an exception (it panicked), as a shader exception stops a GPU
    /// queue: the queue stopped and the dispatch's other workgroups were cancelled.
    /// `address` is the linear index of the workgroup that raised it (`u64::MAX` when the
    /// kernel's signature, argument check or `bounded` did, before any workgroup ran),
    /// `detail` the kernel id.
    KernelException = 24,
}

impl ErrorCode {
    /// Decodes a code word; `None` for 0 and unknown codes.
    pub fn from_u32(v: u32) -> Option<Self> {
        use ErrorCode::*;
        Some(match v {
            1 => UnknownOpcode,
            2 => ReservedField,
            3 => BadWaitCondition,
            4 => BadFenceHandle,
            5 => FenceNotWritable,
            6 => MisalignedAddress,
            7 => MemoryViolation,
            8 => BadWriteIndex,
            9 => DependencyFailed,
            10 => QueueDestroyed,
            11 => OwnerDied,
            12 => DeviceLost,
            13 => UnknownKernel,
            14 => BadKernelArgs,
            15 => BadGrid,
            16 => PreemptTimeout,
            17 => JobTimeout,
            18 => NoProgress,
            19 => ContextBanned,
            20 => FenceBackwards,
            21 => WorkingSetTooLarge,
            22 => EvictionDeadlock,
            23 => BufferFreed,
            24 => KernelException,
            _ => return None,
        })
    }

    /// Short human-readable description.
    pub fn describe(self) -> &'static str {
        use ErrorCode::*;
        match self {
            UnknownOpcode => "unknown opcode",
            ReservedField => "reserved packet field not zero",
            BadWaitCondition => "unknown wait condition",
            BadFenceHandle => "fence handle not held by this context",
            FenceNotWritable => "fence is read-only for this context",
            MisalignedAddress => "misaligned device address",
            MemoryViolation => "device address outside the queue's VM",
            BadWriteIndex => "invalid ring write index",
            DependencyFailed => "waited-on fence was poisoned",
            QueueDestroyed => "queue destroyed",
            OwnerDied => "owner went away",
            DeviceLost => "device lost",
            UnknownKernel => "unknown kernel",
            BadKernelArgs => "kernel arguments do not fit the kernel",
            BadGrid => "bad dispatch grid",
            PreemptTimeout => "a workgroup did not yield in time to be preempted",
            JobTimeout => "hang: a dispatch ran past the queue's job timeout; the queue was reset",
            NoProgress => "hang: a long-running dispatch made no progress; the queue was reset",
            ContextBanned => "the context was banned after repeated hangs",
            FenceBackwards => "SIGNAL_FENCE would have moved the fence backwards",
            WorkingSetTooLarge => "a workgroup needs more device pages than the budget holds",
            EvictionDeadlock => {
                "eviction waited for a job that waited for this fault (WaitForIdleJobs policy)"
            }
            BufferFreed => "an on-demand buffer was freed while a dispatch used it",
            KernelException => "a kernel raised an exception (it panicked)",
        }
    }

    /// Whether this code is a reset kmd-shim decided after a hang (the queue was guilty).
    pub fn is_hang(self) -> bool {
        matches!(
            self,
            ErrorCode::JobTimeout | ErrorCode::NoProgress | ErrorCode::PreemptTimeout
        )
    }
}

/// Status word of a control-socket reply: 0 is success.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum KmdStatus {
    /// Success.
    #[error("ok")]
    Ok = 0,
    /// The request was not a well-formed message of the right size.
    #[error("malformed request")]
    Malformed = 1,
    /// The request's op is not one this ABI defines.
    #[error("unknown request")]
    UnknownOp = 2,
    /// The client speaks another ABI version.
    #[error("ABI version mismatch")]
    AbiMismatch = 3,
    /// The connection has no context yet (send OPEN_CONTEXT first).
    #[error("no context open on this connection")]
    NoContext = 4,
    /// OPEN_CONTEXT sent twice on one connection.
    #[error("context already open")]
    ContextExists = 5,
    /// A per-context or per-device limit would be exceeded.
    #[error("limit exceeded")]
    LimitExceeded = 6,
    /// An argument is out of range.
    #[error("invalid argument")]
    InvalidArgument = 7,
    /// A handle, slot or address names nothing this context owns.
    #[error("no such object")]
    NotFound = 8,
    /// The file descriptors attached are missing, extra, or not userq objects.
    #[error("bad file descriptor")]
    BadFd = 9,
    /// The device-memory budget is exhausted.
    #[error("out of device memory")]
    OutOfMemory = 10,
    /// The firmware is gone.
    #[error("device lost")]
    DeviceLost = 11,
    /// The firmware did not acknowledge in time.
    #[error("firmware did not answer in time")]
    FirmwareTimeout = 12,
    /// kmd-shim failed to create an object (memfd, mmap).
    #[error("internal error in kmd-shim")]
    Internal = 13,
    /// The peer is not allowed to use this device (SO_PEERCRED).
    #[error("permission denied")]
    PermissionDenied = 14,
    /// The context was banned after repeated hangs: it may create nothing more.
    #[error("context banned after repeated hangs")]
    Banned = 15,
    /// Jobs still use the memory (the `WaitForIdleJobs` eviction policy gave up waiting).
    #[error("jobs still use the memory")]
    Busy = 16,
    /// The firmware took memory back from a workgroup that did not yield in time: its
    /// queue was reset (`PreemptTimeout`), and the request still succeeded.
    #[error("done, after resetting a queue that did not yield")]
    Preempted = 17,
}

impl KmdStatus {
    /// Decodes a status word; unknown words map to [`KmdStatus::Internal`].
    pub fn from_u32(v: u32) -> Self {
        use KmdStatus::*;
        match v {
            0 => Ok,
            1 => Malformed,
            2 => UnknownOp,
            3 => AbiMismatch,
            4 => NoContext,
            5 => ContextExists,
            6 => LimitExceeded,
            7 => InvalidArgument,
            8 => NotFound,
            9 => BadFd,
            10 => OutOfMemory,
            11 => DeviceLost,
            12 => FirmwareTimeout,
            14 => PermissionDenied,
            15 => Banned,
            16 => Busy,
            17 => Preempted,
            _ => Internal,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_code_decodes_from_its_own_word_and_nothing_else_does() {
        let mut known = 0;
        for v in 0..64u32 {
            if let Some(c) = ErrorCode::from_u32(v) {
                assert_eq!(c as u32, v);
                assert!(!c.describe().is_empty());
                known += 1;
            }
        }
        // 1..=24, with no gap: a new code needs its word decoded too.
        assert_eq!(known, 24);
        assert_eq!(ErrorCode::from_u32(0), None);
        assert_eq!(
            ErrorCode::from_u32(ErrorCode::KernelException as u32),
            Some(ErrorCode::KernelException)
        );
    }
}
