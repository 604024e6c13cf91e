//! DOC: ids and argument layouts of the firmware's built-in kernels.
//!
//! Every argument is one 64-bit word: `n`/`m`/`k`/`bins`/`ns` are integers, `a` is an f32
//! bit pattern in the low half, buffers are device addresses (8-aligned). Element-wise
//! kernels process item `i` (the global x id) for `i < n`; their buffers must hold `n`
//! elements. Reductions write one partial result per workgroup, in workgroup order, so that
//! the result does not depend on which engine ran what: sum the partials (another dispatch
//! with one workgroup, or the host) for the total.
//!
//! | id | kernel | arguments |
//! |---|---|---|
//! | 1 | fill u32 | n, value, out |
//! | 2 | copy u32 | n, src, dst |
//! | 3 | axpy f32: y = a·x + y | n, a, x, y |
//! | 4 | scale f32: x = a·x | n, a, x |
//! | 5 | add f32: c = a + b | n, a, b, c |
//! | 6 | mul f32: c = a · b | n, a, b, c |
//! | 7 | reduce-sum f32, partial per workgroup, in index order | n, x, partials |
//! | 8 | reduce-sum u64 (wrapping), partial per workgroup | n, x, partials |
//! | 9 | dot f32, partial per workgroup, in index order | n, x, y, partials |
//! | 10 | gemm f32, row-major C(m×n) = A(m×k)·B(k×n); grid (n, m) | m, n, k, a, b, c |
//! | 11 | exclusive prefix sum u32 (one workgroup: grid = workgroup) | n, in, out |
//! | 12 | histogram u32: hist[v % bins] += 1 | n, bins, in, hist |
//! | 13 | checksum (FNV-1a of the u32 words), partial per workgroup | n, in, partials |
//! | 14 | spin: every workgroup busy-waits `ns` nanoseconds, yielding at checkpoints | ns |
//! | 15 | persistent: one workgroup serving a mailbox until told to stop (see below) | mailbox |
//! | 16 | no progress: spins without a checkpoint until its dispatch is cancelled (queue destroyed or reset) | |
//! | 17 | counted spin: every workgroup spins `ns`, then adds 1 to `counter[0]` (u64): engine time made visible, for fairness probes | ns, counter |
//! | 18 | runaway: every workgroup spins `ns` (at most 60 s) ignoring checkpoints and cancellation: a workgroup the firmware cannot take back | ns |
//!
//! The persistent kernel's mailbox is five u64 words: request sequence, request value,
//! response sequence, response value (`3·value + 1`), stop. The host writes the value, then
//! bumps the request sequence (release); the kernel writes the answer, then sets the
//! response sequence to the request's (release); a non-zero stop word ends the kernel.

/// Fill 32-bit words with a value.
pub const FILL_U32: u32 = 1;
/// Copy 32-bit words.
pub const COPY_U32: u32 = 2;
/// y = a·x + y.
pub const AXPY_F32: u32 = 3;
/// x = a·x.
pub const SCALE_F32: u32 = 4;
/// c = a + b.
pub const ADD_F32: u32 = 5;
/// c = a · b.
pub const MUL_F32: u32 = 6;
/// Per-workgroup sums of f32.
pub const REDUCE_SUM_F32: u32 = 7;
/// Per-workgroup wrapping sums of u64.
pub const REDUCE_SUM_U64: u32 = 8;
/// Per-workgroup dot products of f32.
pub const DOT_F32: u32 = 9;
/// Tiled single-precision matrix multiply.
pub const GEMM_F32: u32 = 10;
/// Exclusive prefix sum of u32 (wrapping), one workgroup.
pub const EXCLUSIVE_SCAN_U32: u32 = 11;
/// Histogram of u32 values.
pub const HISTOGRAM_U32: u32 = 12;
/// Per-workgroup FNV-1a checksums.
pub const CHECKSUM_U32: u32 = 13;
/// Busy work for a given time per workgroup, preemptible at checkpoints.
pub const SPIN: u32 = 14;
/// A persistent kernel serving a mailbox.
pub const PERSISTENT: u32 = 15;
/// A kernel that never reports progress (for hang handling).
pub const NO_PROGRESS: u32 = 16;
/// Busy work that counts its finished workgroups.
pub const SPIN_COUNTED: u32 = 17;
/// Busy work that ignores checkpoints and cancellation (for engine recovery).
pub const RUNAWAY: u32 = 18;
/// A long-running streaming kernel: `passes` times over its workgroup's range of u32
/// words (workgroup `i` takes `per` words from `i · per`), adding 1 to each, one device
/// page at a time (its footprint is the page it is in), with a checkpoint every 1024
/// words. Args: element count, passes, `per`, buffer.
pub const STREAM_ADD_U32: u32 = 19;

/// Longest spin the runaway kernel accepts, in nanoseconds.
pub const RUNAWAY_MAX_NS: u64 = 60_000_000_000;

/// First id free for custom kernels.
pub const FIRST_CUSTOM: u32 = 1 << 16;

/// The mailbox words of the persistent kernel.
pub mod mailbox {
    /// Requests posted by the host (it writes the value first, then bumps this, release).
    pub const REQUEST_SEQ: usize = 0;
    /// The request's value.
    pub const REQUEST_VALUE: usize = 1;
    /// Requests answered (the kernel writes the answer first, then this, release).
    pub const RESPONSE_SEQ: usize = 2;
    /// The answer: `3·value + 1` (wrapping).
    pub const RESPONSE_VALUE: usize = 3;
    /// Non-zero: the kernel returns.
    pub const STOP: usize = 4;
    /// Words in a mailbox.
    pub const WORDS: usize = 5;
}
