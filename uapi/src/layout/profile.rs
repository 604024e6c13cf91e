//! DOC: per-packet profiling timestamps (as HSA profiling signals), for queues created
//! with profiling on.
//!
//! A queue's profile object holds one 64-byte record per ring slot; packet `i` uses
//! record `i % entries`. The firmware writes the packet's start and end times (for a
//! DISPATCH, when it is handed to the engines and when its last workgroup finishes; for
//! a WAIT_FENCE, when it parks and when the wait ends), its opcode, and for
//! SIGNAL/SET/WAIT_FENCE the global fence id and value, then publishes the record's
//! sequence number (`i + 1`, release). The client writes the submit time into its own
//! word of the record before it publishes the packet. Off by default, and then free: the
//! firmware tests one `Option` per packet, the client one per submit.

use super::{page_round_up, CACHE_LINE};

/// Words of a record.
pub mod word {
    /// `index + 1` once the firmware has written the record (release).
    pub const SEQ: usize = 0;
    /// The opcode (low 32 bits) and, for DISPATCH, the kernel id (high 32 bits).
    pub const OP: usize = 1;
    /// `CLOCK_MONOTONIC` ns when the firmware took the packet.
    pub const START: usize = 2;
    /// `CLOCK_MONOTONIC` ns when it completed.
    pub const END: usize = 3;
    /// For SIGNAL/SET/WAIT_FENCE: the global fence id (0: none).
    pub const FENCE: usize = 4;
    /// For SIGNAL/SET/WAIT_FENCE: the value.
    pub const VALUE: usize = 5;
    /// `CLOCK_MONOTONIC` ns when the client submitted it (written by the client, which
    /// may overwrite it for the next lap as soon as the firmware took the packet).
    pub const SUBMIT: usize = 6;
    /// The submit time as the firmware copied it when it took the packet: what readers
    /// use.
    pub const SUBMITTED: usize = 7;
    /// Words per record.
    pub const COUNT: usize = 8;
}

/// Bytes of a profile object for a ring of `entries` packets: a header line, then the
/// records.
pub const fn profile_object_size(entries: u32) -> usize {
    page_round_up(CACHE_LINE + entries as usize * word::COUNT * 8)
}

/// Byte offset of the record of packet `index`.
pub const fn profile_record_offset(entries: u32, index: u64) -> usize {
    CACHE_LINE + (index % entries as u64) as usize * word::COUNT * 8
}
