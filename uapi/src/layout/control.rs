//! DOC: the kmd↔fw transport's object, [`ControlRegion`]: never mapped into a client.

use super::{page_round_up, KickLine, ObjectHeader, PaddedU64, SleepFlag};
use core::sync::atomic::AtomicU64;

/// Entries in each kmd↔fw message ring.
pub const CONTROL_RING_ENTRIES: usize = 256;

/// The kmd↔fw transport (like GuC CT): one message ring each way, plus the futex line kmd's
/// event thread sleeps on. Never mapped into a client.
#[repr(C, align(4096))]
#[derive(Debug)]
pub struct ControlRegion {
    /// [`magic::CONTROL`](super::magic::CONTROL).
    pub header: ObjectHeader,
    /// kmd → firmware requests.
    pub to_fw: MsgRing,
    /// firmware → kmd events and acknowledgements.
    pub to_kmd: MsgRing,
    /// kmd's NEED_WAKEUP flag for the `to_kmd` ring.
    pub kmd_sleep: SleepFlag,
    /// kmd's wake word.
    pub kmd_kick: KickLine,
}

/// A single-producer single-consumer ring of 64-byte messages.
#[repr(C, align(64))]
#[derive(Debug)]
pub struct MsgRing {
    /// Messages ever pushed; written by the producer only. `head ≤ tail ≤ head + entries`;
    /// a consumer that sees otherwise treats the ring as empty.
    pub tail: PaddedU64,
    /// Messages ever popped; written by the consumer only.
    pub head: PaddedU64,
    /// The slots, each one 64-byte message.
    pub slots: [[AtomicU64; 8]; CONTROL_RING_ENTRIES],
}

/// Size of the control object.
pub const CONTROL_REGION_SIZE: usize = page_round_up(core::mem::size_of::<ControlRegion>());
