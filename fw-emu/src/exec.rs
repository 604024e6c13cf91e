//! DOC: executing one packet.
//!
//! The queue copies a packet out of its ring once; `execute` decodes the copy
//! (`Command::decode`, the one validation of packet structure), resolves its addresses in
//! the context's VM and its fence handles in the context's bindings, and runs it:
//! WRITE_VALUE and TIMESTAMP store into device memory, SIGNAL_FENCE advances a fence (never
//! backwards) and SET_FENCE sets a flag word (where the binding is writable), WAIT_FENCE completes or parks, DISPATCH resolves the kernel's
//! arguments and becomes a job for the engines. Every failure is a [`Fault`] for this queue
//! only, with the packet index, the offending address or word, and a detail.

use crate::fence::{Binding, FenceObject, WaitStatus};
use crate::job::Job;
use crate::kernels::KernelLibrary;
use crate::vm::Vm;
use crate::QueueId;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::Ordering::Release;
use std::sync::Arc;
use std::time::Duration;
use userq_uapi::error::ErrorCode;
use userq_uapi::ioctl::Priority;
use userq_uapi::packet::{Command, FenceHandle, Packet, PacketError, WaitCondition};
use userq_uapi::sync;

/// Why a queue stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// What happened.
    pub code: ErrorCode,
    /// Index of the offending packet.
    pub packet_index: u64,
    /// Offending address or index.
    pub address: u64,
    /// Code-specific detail.
    pub detail: u32,
}

/// A WAIT_FENCE the queue is parked on.
#[derive(Debug)]
pub(crate) struct ParkedWait {
    pub(crate) fence: Rc<FenceObject>,
    pub(crate) value: u64,
    pub(crate) mask: u64,
    pub(crate) condition: WaitCondition,
    /// Index of the WAIT_FENCE packet (its timeline value is `packet_index + 1`).
    pub(crate) packet_index: u64,
}

impl ParkedWait {
    /// Where the wait stands.
    pub(crate) fn status(&self) -> WaitStatus {
        self.fence
            .wait_status(self.value, self.mask, self.condition)
    }
}

/// The fault of packet `index`, given its code, address and detail.
fn fault_at(index: u64) -> impl Fn(ErrorCode, u64, u32) -> Fault {
    move |code, address, detail| Fault {
        code,
        packet_index: index,
        address,
        detail,
    }
}

/// What executing one packet did.
pub(crate) enum Step {
    Done,
    Park(ParkedWait),
    Dispatch(Arc<Job>),
}

/// What a queue's packets may use besides its own ring.
pub struct Resources<'a> {
    /// The context's fence bindings.
    pub bindings: &'a HashMap<FenceHandle, Binding>,
    /// The context's VM.
    pub vm: &'a Vm,
    /// The kernels DISPATCH may name.
    pub kernels: &'a KernelLibrary,
}

/// Decodes and executes packet `index` of queue `id` (copied out of its ring once, by the
/// caller). A DISPATCH becomes a job for the engines with the queue's `priority` and
/// `time_slice`; a WAIT_FENCE whose condition does not hold yet becomes a park.
pub(crate) fn execute(
    packet: &Packet,
    index: u64,
    res: &Resources<'_>,
    id: QueueId,
    priority: Priority,
    time_slice: Option<Duration>,
) -> Result<Step, Fault> {
    let (bindings, vm) = (res.bindings, res.vm);
    let fault = fault_at(index);
    let cmd = Command::decode(packet).map_err(|e| match e {
        PacketError::UnknownOpcode(op) => fault(ErrorCode::UnknownOpcode, 0, op as u32),
        PacketError::ReservedNotZero { word } => fault(ErrorCode::ReservedField, 0, word as u32),
        PacketError::BadCondition(c) => fault(ErrorCode::BadWaitCondition, 0, c as u32),
        PacketError::BadHandle(h) => fault(ErrorCode::BadFenceHandle, h, u32::MAX),
        PacketError::BadGrid => fault(ErrorCode::BadGrid, 0, 0),
        PacketError::TooManyArgs(n) => fault(ErrorCode::BadGrid, 0, n),
    })?;
    let binding = |h: FenceHandle| {
        bindings
            .get(&h)
            .ok_or(fault(ErrorCode::BadFenceHandle, 0, h.0))
    };
    let writable = |h: FenceHandle| match binding(h)? {
        b if b.writable => Ok(&b.fence),
        _ => Err(fault(ErrorCode::FenceNotWritable, 0, h.0)),
    };
    match cmd {
        Command::Nop => Ok(Step::Done),
        Command::WriteValue { addr, value } => {
            let word = vm.word(addr).map_err(|c| fault(c, addr, 0))?;
            word.store(value, Release);
            Ok(Step::Done)
        }
        Command::Timestamp { addr } => {
            let word = vm.word(addr).map_err(|c| fault(c, addr, 0))?;
            word.store(now_ns(), Release);
            Ok(Step::Done)
        }
        // Queues parked on the fence are re-checked every turn; no kick needed.
        Command::SignalFence { fence, value } => {
            let f = writable(fence)?;
            sync::advance_fence(f.state(), f.waiters(), value, || f.host_waiting())
                .map_err(|current| fault(ErrorCode::FenceBackwards, current, fence.0))?;
            Ok(Step::Done)
        }
        Command::SetFence { fence, value } => {
            let f = writable(fence)?;
            sync::signal_fence(f.state(), f.waiters(), value, || f.host_waiting());
            Ok(Step::Done)
        }
        Command::WaitFence {
            fence,
            value,
            mask,
            condition,
        } => {
            let b = binding(fence)?;
            let wait = ParkedWait {
                fence: b.fence.clone(),
                value,
                mask,
                condition,
                packet_index: index,
            };
            match wait.status() {
                WaitStatus::Satisfied => Ok(Step::Done),
                WaitStatus::Poisoned(code) => {
                    Err(fault(ErrorCode::DependencyFailed, b.fence.id, code))
                }
                WaitStatus::Pending => Ok(Step::Park(wait)),
            }
        }
        Command::Dispatch(d) => dispatch(d, index, res, id, priority, time_slice),
    }
}

/// DISPATCH: resolves the kernel and its arguments into a job. Out of line: building a job
/// took `execute` a frame of 824 bytes, which every packet paid for (the prologue, and
/// the stores a wide frame brings); without it, 216. A NOP stream's throughput went from
/// 152-166 to 169-196 M/s with the vCPUs close (ARCHITECTURE, "Where a NOP stream's time
/// goes").
#[inline(never)]
fn dispatch(
    d: userq_uapi::packet::Dispatch,
    index: u64,
    res: &Resources<'_>,
    id: QueueId,
    priority: Priority,
    time_slice: Option<Duration>,
) -> Result<Step, Fault> {
    let fault = fault_at(index);
    let kernel = res
        .kernels
        .get(d.kernel)
        .ok_or(fault(ErrorCode::UnknownKernel, 0, d.kernel))?;
    // The kernel's own code (its signature, argument check and `bounded`) runs here, on
    // the command processor: a panic in it stops this queue, not the firmware.
    let job = crate::kernel::contain(|| {
        let args = crate::kernel::resolve(kernel.as_ref(), &d, res.vm)?;
        Ok(Job::new(
            id,
            index,
            kernel.clone(),
            args,
            d,
            priority,
            time_slice,
        ))
    })
    .ok_or(fault(ErrorCode::KernelException, u64::MAX, d.kernel))?
    .map_err(|e: crate::kernel::ArgError| fault(ErrorCode::BadKernelArgs, e.value, e.index))?;
    Ok(Step::Dispatch(Arc::new(job)))
}

/// The device clock: CLOCK_MONOTONIC in nanoseconds, comparable across processes.
pub fn now_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}
