//! # userq: user-mode GPU queues, emulated on the CPU
//!
//! A [`Device`] is a connection to a userq device (kmd-shim plus firmware), with its own
//! context and device address space. It creates [`Queue`]s, [`Fence`]s and [`Buffer`]s.
//! Work is submitted by writing [`Command`]s into a queue's ring in shared memory and
//! ringing its doorbell: no syscall and no daemon on the way. The firmware runs the
//! commands in order and completes packet `N` by setting the queue's timeline fence to `N`;
//! [`FencePoint::wait`] spins, then sleeps on a shared futex (at once, when the submit or a
//! host signal had to wake a sleeping firmware: see [`WaitMode::Adaptive`]).
//!
//! ```
//! use std::time::Duration;
//! use userq::{Command, Device, OpenMode};
//!
//! # let dir = std::env::temp_dir().join(format!("userq-doc-{}", std::process::id()));
//! # let sock = dir.join("dev.sock");
//! // An embedded device: kmd-shim and the firmware run as threads of this process.
//! let dev = Device::builder().socket(&sock).mode(OpenMode::Embedded).open()?;
//! let mut queue = dev.create_queue()?;
//! let out = dev.alloc::<u64>(4)?;
//!
//! let done = queue.submit_batch(&[
//!     Command::write_value(out.address_of(0).unwrap(), 42),
//!     Command::write_value(out.address_of(3).unwrap(), 7),
//! ])?;
//! done.wait(Duration::from_secs(5))?;
//! assert_eq!(out.to_vec(), vec![42, 0, 0, 7]);
//! assert_eq!(queue.timeline().value(), 2);
//! # drop((done, queue, out, dev)); std::fs::remove_dir(&dir)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Modes: [`Device::open_default`] connects to a running `kmd-shim` daemon if one serves the
//! socket, and otherwise starts an *embedded* device (the same kmd-shim and firmware code, as
//! threads) that serves the socket so that other processes can join.
#![deny(missing_docs)]

mod buffer;
mod command;
mod device;
mod embedded;
mod error;
mod fence;
pub mod kernels;
mod queue;
mod reactor;
mod reset;
mod wait;

/// The firmware's kernel interface, for custom kernels registered with
/// [`DeviceBuilder::kernel`] (embedded mode).
#[cfg(feature = "embedded")]
pub mod firmware {
    pub use fw_emu::kernel::{
        Arg, ArgError, ArgKind, Args, BufferArg, Checkpoint, Footprint, Kernel, Workgroup,
        WorkgroupStatus,
    };
    pub use fw_emu::kernels::need;
}

pub use buffer::{Buffer, ExportedBuffer};
pub use command::{Command, KernelArg};
pub use device::{default_socket_path, Device, DeviceBuilder, OpenMode, DEFAULT_CONTROL_TIMEOUT};
pub use error::{
    AllocError, ControlError, ErrorCode, FenceError, FenceFault, KmdStatus, OpenError,
    QueueCreateError, SignalError, SubmitError, WaitError, WatchdogError,
};
pub use fence::{ExportedFence, Fence, FencePoint};
pub use queue::{Queue, QueueBuilder, QueueStatus, DEFAULT_RING_ENTRIES};
pub use reactor::FenceFuture;
pub use reset::{ResetStats, ResetStatus};
pub use userq_uapi::ioctl::Priority;
pub use userq_uapi::packet::{Packet, WaitCondition};
pub use userq_uapi::watchdog::Watchdog;
pub use wait::{wait_all, wait_any, WaitMode};

/// The raw ABI, for tools that need to speak it directly.
pub use userq_uapi as uapi;
