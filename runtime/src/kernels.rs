//! Launching the firmware's built-in kernels (ids and layouts in
//! [`userq_uapi::kernels`]), with buffers checked for size on the host before anything is
//! submitted.
//!
//! Each function returns a [`Command`] to submit; 1-D kernels use workgroups of
//! [`WORKGROUP`] items over a grid of `n` items. Reductions write one partial result per
//! workgroup ([`workgroups`] of them, in order): sum them for the total, on the host or with
//! a second dispatch.
//!
//! Custom kernels implement [`crate::firmware::Kernel`] and are registered with
//! [`crate::DeviceBuilder::kernel`] (embedded mode) or built into a firmware program of
//! one's own (daemon mode; see `examples/examples/custom_kernel.rs`).

use crate::{AllocError, Buffer, Command, Device, KernelArg};
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::time::{Duration, Instant};
pub use userq_uapi::kernels::*;
use userq_uapi::sync::{Backoff, BackoffStep};

/// Work-items per workgroup of the 1-D helpers.
pub const WORKGROUP: u32 = 256;

/// Workgroups of a 1-D dispatch over `n` items (the length reductions' partials need).
pub fn workgroups(n: u32) -> usize {
    n.div_ceil(WORKGROUP) as usize
}

/// Why a launch helper refused its buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LaunchError {
    /// `n` is zero.
    #[error("empty launch")]
    Empty,
    /// Buffer argument `arg` holds fewer elements than the launch touches.
    #[error("buffer argument {arg} holds {len} elements, the launch needs {needed}")]
    BufferTooSmall {
        /// Position of the argument.
        arg: usize,
        /// Its length.
        len: usize,
        /// What the launch needs.
        needed: usize,
    },
    /// A busy-wait longer than the kernel accepts.
    #[error("spin of {0:?} is longer than the kernel accepts")]
    TooLong(Duration),
}

fn check<T>(arg: usize, b: &Buffer<T>, needed: usize) -> Result<KernelArg, LaunchError>
where
    T: bytemuck::Pod,
{
    if b.len() < needed {
        return Err(LaunchError::BufferTooSmall {
            arg,
            len: b.len(),
            needed,
        });
    }
    Ok(KernelArg::Address(b.device_address()))
}

fn linear(kernel: u32, n: u32, args: &[KernelArg]) -> Result<Command, LaunchError> {
    if n == 0 {
        return Err(LaunchError::Empty);
    }
    Ok(Command::dispatch(
        kernel,
        [n, 1, 1],
        [WORKGROUP, 1, 1],
        args,
    ))
}

/// `out[i] = value` for `i < n`.
pub fn fill_u32(n: u32, value: u32, out: &Buffer<u32>) -> Result<Command, LaunchError> {
    let o = check(2, out, n as usize)?;
    linear(
        FILL_U32,
        n,
        &[KernelArg::U64(n as u64), KernelArg::U64(value as u64), o],
    )
    .map(|cmd| cmd.holding(out))
}

/// `dst[i] = src[i]` for `i < n`.
pub fn copy_u32(n: u32, src: &Buffer<u32>, dst: &Buffer<u32>) -> Result<Command, LaunchError> {
    let (s, d) = (check(1, src, n as usize)?, check(2, dst, n as usize)?);
    linear(COPY_U32, n, &[KernelArg::U64(n as u64), s, d]).map(|cmd| cmd.holding(src).holding(dst))
}

/// `y[i] = a·x[i] + y[i]` for `i < n`.
pub fn axpy(n: u32, a: f32, x: &Buffer<f32>, y: &Buffer<f32>) -> Result<Command, LaunchError> {
    let (xa, ya) = (check(2, x, n as usize)?, check(3, y, n as usize)?);
    linear(
        AXPY_F32,
        n,
        &[KernelArg::U64(n as u64), KernelArg::F32(a), xa, ya],
    )
    .map(|cmd| cmd.holding(x).holding(y))
}

/// `x[i] = a·x[i]` for `i < n`.
pub fn scale(n: u32, a: f32, x: &Buffer<f32>) -> Result<Command, LaunchError> {
    let xa = check(2, x, n as usize)?;
    linear(
        SCALE_F32,
        n,
        &[KernelArg::U64(n as u64), KernelArg::F32(a), xa],
    )
    .map(|cmd| cmd.holding(x))
}

/// `c[i] = a[i] + b[i]` for `i < n`.
pub fn add(
    n: u32,
    a: &Buffer<f32>,
    b: &Buffer<f32>,
    c: &Buffer<f32>,
) -> Result<Command, LaunchError> {
    binary(ADD_F32, n, a, b, c).map(|cmd| cmd.holding(a).holding(b).holding(c))
}

/// `c[i] = a[i] · b[i]` for `i < n`.
pub fn mul(
    n: u32,
    a: &Buffer<f32>,
    b: &Buffer<f32>,
    c: &Buffer<f32>,
) -> Result<Command, LaunchError> {
    binary(MUL_F32, n, a, b, c).map(|cmd| cmd.holding(a).holding(b).holding(c))
}

fn binary(
    kernel: u32,
    n: u32,
    a: &Buffer<f32>,
    b: &Buffer<f32>,
    c: &Buffer<f32>,
) -> Result<Command, LaunchError> {
    let args = [
        check(1, a, n as usize)?,
        check(2, b, n as usize)?,
        check(3, c, n as usize)?,
    ];
    linear(
        kernel,
        n,
        &[KernelArg::U64(n as u64), args[0], args[1], args[2]],
    )
}

/// `partials[w]` = sum of `x` over workgroup `w`'s items, in index order.
pub fn reduce_sum_f32(
    n: u32,
    x: &Buffer<f32>,
    partials: &Buffer<f32>,
) -> Result<Command, LaunchError> {
    let (xa, p) = (check(1, x, n as usize)?, check(2, partials, workgroups(n))?);
    linear(REDUCE_SUM_F32, n, &[KernelArg::U64(n as u64), xa, p])
        .map(|cmd| cmd.holding(x).holding(partials))
}

/// `partials[w]` = wrapping sum of `x` over workgroup `w`'s items.
pub fn reduce_sum_u64(
    n: u32,
    x: &Buffer<u64>,
    partials: &Buffer<u64>,
) -> Result<Command, LaunchError> {
    let (xa, p) = (check(1, x, n as usize)?, check(2, partials, workgroups(n))?);
    linear(REDUCE_SUM_U64, n, &[KernelArg::U64(n as u64), xa, p])
        .map(|cmd| cmd.holding(x).holding(partials))
}

/// `partials[w]` = dot product of `x` and `y` over workgroup `w`'s items, in index order.
pub fn dot(
    n: u32,
    x: &Buffer<f32>,
    y: &Buffer<f32>,
    partials: &Buffer<f32>,
) -> Result<Command, LaunchError> {
    let args = [
        check(1, x, n as usize)?,
        check(2, y, n as usize)?,
        check(3, partials, workgroups(n))?,
    ];
    linear(
        DOT_F32,
        n,
        &[KernelArg::U64(n as u64), args[0], args[1], args[2]],
    )
    .map(|cmd| cmd.holding(x).holding(y).holding(partials))
}

/// Row-major `C(m×n) = A(m×k) · B(k×n)`, 16×16 tiles per workgroup.
pub fn gemm(
    m: u32,
    n: u32,
    k: u32,
    a: &Buffer<f32>,
    b: &Buffer<f32>,
    c: &Buffer<f32>,
) -> Result<Command, LaunchError> {
    if m == 0 || n == 0 || k == 0 {
        return Err(LaunchError::Empty);
    }
    let (m_, n_, k_) = (m as usize, n as usize, k as usize);
    let args = [
        check(3, a, m_ * k_)?,
        check(4, b, k_ * n_)?,
        check(5, c, m_ * n_)?,
    ];
    Ok(Command::dispatch(
        GEMM_F32,
        [n, m, 1],
        [16, 16, 1],
        &[
            KernelArg::U64(m as u64),
            KernelArg::U64(n as u64),
            KernelArg::U64(k as u64),
            args[0],
            args[1],
            args[2],
        ],
    ))
    .map(|cmd| cmd.holding(a).holding(b).holding(c))
}

/// `out[i] = input[0] + … + input[i-1]` (wrapping), run as one workgroup.
pub fn exclusive_scan_u32(
    n: u32,
    input: &Buffer<u32>,
    out: &Buffer<u32>,
) -> Result<Command, LaunchError> {
    let (i, o) = (check(1, input, n as usize)?, check(2, out, n as usize)?);
    if n == 0 {
        return Err(LaunchError::Empty);
    }
    Ok(Command::dispatch(
        EXCLUSIVE_SCAN_U32,
        [1, 1, 1],
        [1, 1, 1],
        &[KernelArg::U64(n as u64), i, o],
    ))
    .map(|cmd| cmd.holding(input).holding(out))
}

/// `hist[input[i] % bins] += 1` for `i < n`.
pub fn histogram_u32(
    n: u32,
    input: &Buffer<u32>,
    hist: &Buffer<u32>,
) -> Result<Command, LaunchError> {
    let bins = hist.len();
    let (i, h) = (check(2, input, n as usize)?, check(3, hist, bins.max(1))?);
    linear(
        HISTOGRAM_U32,
        n,
        &[KernelArg::U64(n as u64), KernelArg::U64(bins as u64), i, h],
    )
    .map(|cmd| cmd.holding(input).holding(hist))
}

/// `partials[w]` = FNV-1a over the bytes of workgroup `w`'s words.
pub fn checksum_u32(
    n: u32,
    input: &Buffer<u32>,
    partials: &Buffer<u32>,
) -> Result<Command, LaunchError> {
    let (i, p) = (
        check(1, input, n as usize)?,
        check(2, partials, workgroups(n))?,
    );
    linear(CHECKSUM_U32, n, &[KernelArg::U64(n as u64), i, p])
        .map(|cmd| cmd.holding(input).holding(partials))
}

/// Busy work: `workgroups` workgroups that each spin for `ns` nanoseconds (at most 1 s).
pub fn spin(workgroups: u32, ns: u64) -> Result<Command, LaunchError> {
    if workgroups == 0 {
        return Err(LaunchError::Empty);
    }
    Ok(Command::dispatch(
        SPIN,
        [workgroups, 1, 1],
        [1, 1, 1],
        &[KernelArg::U64(ns)],
    ))
}

/// Busy work that counts itself: `workgroups` workgroups that each spin `ns` nanoseconds
/// (at most 1 s) and then add 1 to `counter[0]`, so the host can see engine time.
pub fn spin_counted(
    workgroups: u32,
    ns: u64,
    counter: &Buffer<u64>,
) -> Result<Command, LaunchError> {
    let c = check(1, counter, 1)?;
    if workgroups == 0 {
        return Err(LaunchError::Empty);
    }
    Ok(Command::dispatch(
        SPIN_COUNTED,
        [workgroups, 1, 1],
        [1, 1, 1],
        &[KernelArg::U64(ns), c],
    ))
    .map(|cmd| cmd.holding(counter))
}

/// A kernel that never reports progress: it holds its engine until its queue is destroyed
/// or reset (see [`crate::Watchdog`]). For testing hang handling.
pub fn no_progress() -> Command {
    no_progress_wide(1)
}

/// [`no_progress`] with `workgroups` workgroups: one on every engine, or more.
pub fn no_progress_wide(workgroups: u32) -> Command {
    Command::dispatch(NO_PROGRESS, [workgroups.max(1), 1, 1], [1, 1, 1], &[])
}

/// `workgroups` workgroups that each spin for `time` (at most 60 s) without a checkpoint and
/// without looking at cancellation: a reset cannot take their engines back, so the
/// firmware starts replacement engine threads. For testing engine recovery.
pub fn runaway(workgroups: u32, time: Duration) -> Result<Command, LaunchError> {
    let ns = u64::try_from(time.as_nanos()).unwrap_or(u64::MAX);
    if workgroups == 0 {
        return Err(LaunchError::Empty);
    }
    if ns > userq_uapi::kernels::RUNAWAY_MAX_NS {
        return Err(LaunchError::TooLong(time));
    }
    Ok(Command::dispatch(
        RUNAWAY,
        [workgroups, 1, 1],
        [1, 1, 1],
        &[KernelArg::U64(ns)],
    ))
}

/// The host side of the persistent kernel: a mailbox in device memory that one
/// long-running workgroup serves (see [`mailbox`] for the words and the protocol).
#[derive(Debug)]
pub struct Mailbox {
    words: Buffer<u64>,
    seq: u64,
}

impl Mailbox {
    /// A fresh mailbox in `dev`'s memory.
    pub fn new(dev: &Device) -> Result<Mailbox, AllocError> {
        Ok(Mailbox {
            words: dev.alloc::<u64>(mailbox::WORDS)?,
            seq: 0,
        })
    }

    /// The DISPATCH that starts the persistent kernel on this mailbox. It runs until
    /// [`Mailbox::stop`] (or its queue is destroyed). Submit it on a long-running queue
    /// ([`crate::QueueBuilder::long_running`]): an ordinary queue's job timeout would
    /// reset it.
    pub fn launch(&self) -> Command {
        Command::dispatch(
            PERSISTENT,
            [1, 1, 1],
            [1, 1, 1],
            &[KernelArg::Address(self.words.device_address())],
        )
        .holding(&self.words)
    }

    /// Posts `value` and waits (spinning, yielding, then sleeping in 50 µs slices) for the
    /// kernel's answer; `None` if none came within `timeout`.
    pub fn ask(&mut self, value: u64, timeout: Duration) -> Option<u64> {
        self.seq += 1;
        self.words
            .atomic(mailbox::REQUEST_VALUE)
            .store(value, Relaxed);
        self.words
            .atomic(mailbox::REQUEST_SEQ)
            .store(self.seq, Release);
        let deadline = Instant::now() + timeout;
        // Spin, then yield, then sleep in short slices: the kernel answers in memory, with
        // no futex to wait on.
        let mut backoff = Backoff::new(Duration::from_micros(50), Duration::from_millis(1));
        while self.words.atomic(mailbox::RESPONSE_SEQ).load(Acquire) != self.seq {
            if Instant::now() >= deadline {
                return None;
            }
            if backoff.step() == BackoffStep::Sleep {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
        Some(self.words.atomic(mailbox::RESPONSE_VALUE).load(Relaxed))
    }

    /// Tells the kernel to return; its dispatch then completes.
    pub fn stop(&self) {
        self.words.atomic(mailbox::STOP).store(1, Release);
    }
}

/// A long-running streaming kernel: `passes` times over `x[..n]`, adding 1 to each word,
/// in workgroups of `per_workgroup` words (one workgroup each runs its range as a
/// persistent loop). It touches one device page at a time and checkpoints every 1024
/// words, so on an on-demand buffer larger than device memory it streams, faulting and
/// refaulting pages, and finishes with every word exactly `passes` higher. Run it on a
/// long-running queue ([`crate::QueueBuilder::long_running`]).
pub fn stream_add_u32(
    n: u32,
    passes: u32,
    per_workgroup: u32,
    x: &Buffer<u32>,
) -> Result<Command, LaunchError> {
    let xa = check(3, x, n as usize)?;
    if n == 0 || passes == 0 || per_workgroup == 0 {
        return Err(LaunchError::Empty);
    }
    Ok(Command::dispatch(
        userq_uapi::kernels::STREAM_ADD_U32,
        [n.div_ceil(per_workgroup), 1, 1],
        [1, 1, 1],
        &[
            KernelArg::U64(n as u64),
            KernelArg::U64(passes as u64),
            KernelArg::U64(per_workgroup as u64),
            xa,
        ],
    )
    .holding(x))
}
