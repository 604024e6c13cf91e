//! # userq-uapi: the shared-memory ABI of userq
//!
//! This crate is the single source of truth for everything that crosses a process
//! boundary in userq: the layouts of shared pages ([`layout`]), queue packets
//! ([`packet`]), the built-in kernel ids ([`kernels`]), the client ↔ kmd-shim control messages ([`ioctl`]), hang detection ([`watchdog`]), the kmd-shim ↔
//! firmware messages ([`fwmsg`]), error codes ([`error`]), on-demand paging ([`paging`]), and the wait/wake protocols on
//! shared futexes ([`sync`]). [`os`] is the small platform layer underneath: memfds,
//! mappings with typed views, and fd passing; [`shm`] the typed handles on shared objects;
//! [`msgring`] the kmd-shim ↔ firmware message rings; [`observe`] reading a device's
//! telemetry, event log and profiles; [`socket`] where a device is reached.
//!
//! The other crates never compute an offset by hand; they name a field of a layout here.
//!
//! ```
//! use userq_uapi::packet::{Command, Packet};
//! let p: Packet = Command::WriteValue { addr: 0x1_0000_0000, value: 42 }.encode();
//! assert_eq!(Command::decode(&p), Ok(Command::WriteValue { addr: 0x1_0000_0000, value: 42 }));
//! ```
#![deny(missing_docs)]

pub mod error;
pub mod fwmsg;
pub mod ioctl;
pub mod kernels;
pub mod layout;
pub mod msgring;
pub mod observe;
pub mod os;
pub mod packet;
pub mod paging;
pub mod shm;
pub mod socket;
pub mod sync;
pub mod watchdog;

pub use error::{ErrorCode, KmdStatus};
pub use layout::ABI_VERSION;

/// The firmware bumps [`layout::DeviceHealth::heartbeat`] at least this often, even idle.
pub const HEARTBEAT_PERIOD_MS: u64 = 100;

/// Base of every context's device virtual address range for buffers.
pub const VA_BASE: u64 = 0x1_0000_0000;

/// End (exclusive) of every context's device virtual address range.
pub const VA_END: u64 = 0x8000_0000_0000;
