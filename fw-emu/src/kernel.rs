//! DOC: kernels: what a DISPATCH runs.
//!
//! A [`Kernel`] declares its argument kinds ([`ArgKind`]), checks that the arguments fit
//! the grid before anything runs ([`Kernel::validate`]), and runs one workgroup at a time
//! ([`Kernel::run`]). The firmware resolves every argument once, when it takes the DISPATCH
//! packet: scalars are copied, buffer addresses are looked up in the queue's VM and become
//! [`BufferArg`]s, views of the mapped memory from that address to the end of its buffer.
//! A kernel can only reach memory through those views, so it cannot touch anything outside
//! the queue's VM. Views are made of atomics: the host may read or write the same memory
//! while the kernel runs.
//!
//! On-demand buffers are paged: before a workgroup runs (and again whenever it resumes
//! from a checkpoint), the engine (or the command processor, for a dispatch it runs
//! itself) asks the kernel for its [`Kernel::footprint`], the byte
//! ranges of its buffers it will touch until its next checkpoint, and pins those pages. A
//! page that is not resident makes the workgroup *fault before it starts*: it has done
//! nothing since its last checkpoint, so replaying it after the fault is serviced is
//! exact, for histograms and reductions as for anything else. A kernel must touch only
//! what its footprint names; the default names every buffer argument whole.
//!
//! Workgroups are the unit of scheduling: engines run them in any order and in parallel,
//! and the scheduler may switch to another queue's work between two of them. A kernel must
//! therefore make each workgroup independent, and write results that do not depend on the
//! order (reductions write one partial per workgroup; see `kernels`).

pub use crate::vm::BufferArg;
use crate::vm::Vm;
use userq_uapi::packet::Dispatch;

/// The kind of one argument word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArgKind {
    /// An unsigned integer (the whole word).
    U64,
    /// An f32 in the low 32 bits; the high bits must be zero.
    F32,
    /// A device address of a buffer (8-aligned), seen from that address to its end.
    Buffer,
}

/// One resolved argument.
#[derive(Debug, Clone)]
pub enum Arg {
    /// [`ArgKind::U64`].
    U64(u64),
    /// [`ArgKind::F32`].
    F32(f32),
    /// [`ArgKind::Buffer`].
    Buffer(BufferArg),
}

/// The resolved arguments of one dispatch.
#[derive(Debug, Clone)]
pub struct Args(pub Vec<Arg>);

impl Args {
    /// Argument `i` as an integer (0 if it is not one: `validate` has checked the kinds).
    pub fn u64(&self, i: usize) -> u64 {
        match self.0.get(i) {
            Some(Arg::U64(v)) => *v,
            _ => 0,
        }
    }

    /// Argument `i` as an f32.
    pub fn f32(&self, i: usize) -> f32 {
        match self.0.get(i) {
            Some(Arg::F32(v)) => *v,
            _ => 0.0,
        }
    }

    /// Argument `i` as a buffer.
    pub fn buffer(&self, i: usize) -> &BufferArg {
        match self.0.get(i) {
            Some(Arg::Buffer(b)) => b,
            _ => panic!("argument {i} is not a buffer (checked by resolve)"),
        }
    }
}

/// Why a dispatch's arguments were refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArgError {
    /// Index of the offending argument (`u32::MAX` for the count).
    pub index: u32,
    /// The argument word.
    pub value: u64,
}

impl ArgError {
    /// An error about argument `index` with word `value`.
    pub fn at(index: usize, value: u64) -> Self {
        ArgError {
            index: index as u32,
            value,
        }
    }
}

/// One workgroup of a dispatch.
#[derive(Debug, Clone, Copy)]
pub struct Workgroup {
    /// Saved state of a workgroup that yielded at a checkpoint (0 on its first run): the
    /// kernel's own "registers", kept by the engine until the workgroup runs again.
    pub state: u64,
    /// Workgroup id per dimension.
    pub id: [u32; 3],
    /// Workgroup size per dimension.
    pub size: [u32; 3],
    /// Grid size (work-items) per dimension.
    pub grid: [u32; 3],
    /// Linear index of this workgroup, x fastest.
    pub index: u64,
}

impl Workgroup {
    /// The workgroup with linear index `index` of a dispatch.
    pub fn of(d: &Dispatch, index: u64) -> Self {
        let n = d.workgroups();
        let x = (index % n[0] as u64) as u32;
        let y = ((index / n[0] as u64) % n[1] as u64) as u32;
        let z = (index / (n[0] as u64 * n[1] as u64)) as u32;
        Workgroup {
            state: 0,
            id: [x, y, z],
            size: d.workgroup,
            grid: d.grid,
            index,
        }
    }

    /// Global work-item range of dimension `dim`, clipped to the grid.
    pub fn range(&self, dim: usize) -> std::ops::Range<u64> {
        let start = self.id[dim] as u64 * self.size[dim] as u64;
        let end = (start + self.size[dim] as u64).min(self.grid[dim] as u64);
        start..end
    }
}

/// How a workgroup's run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkgroupStatus {
    /// The workgroup finished.
    Done,
    /// The workgroup stopped at a checkpoint; its progress is in [`Workgroup::state`] (and
    /// in device memory). It runs again later.
    Yielded,
}

/// The byte ranges of its buffer arguments a workgroup touches before its next
/// checkpoint, as [`Kernel::footprint`] reports them.
#[derive(Debug, Default)]
pub struct Footprint {
    /// (argument index, byte range within the argument's view, access).
    pub ranges: Vec<(usize, std::ops::Range<u64>, userq_uapi::paging::Access)>,
}

impl Footprint {
    /// Buffer argument `arg`, bytes `range` of its view, touched as `access`.
    pub fn add(
        &mut self,
        arg: usize,
        range: std::ops::Range<u64>,
        access: userq_uapi::paging::Access,
    ) {
        if range.start < range.end {
            self.ranges.push((arg, range, access));
        }
    }

    /// Elements `items` of `size` bytes of buffer argument `arg`.
    pub fn items(
        &mut self,
        arg: usize,
        items: std::ops::Range<usize>,
        size: u64,
        access: userq_uapi::paging::Access,
    ) {
        self.add(
            arg,
            items.start as u64 * size..items.end as u64 * size,
            access,
        );
    }
}

/// A running workgroup's line to its engine: preemption and cancellation points inside a
/// long kernel.
pub struct Checkpoint<'a> {
    pub(crate) wants_engine: &'a dyn Fn() -> bool,
    pub(crate) cancelled: &'a std::sync::atomic::AtomicBool,
    /// Records that the workgroup reached a checkpoint (progress, for the no-progress
    /// watchdog).
    pub(crate) reached: &'a dyn Fn(),
}

impl Checkpoint<'_> {
    /// Whether the kernel should yield now: its time slice is used, work of higher priority
    /// is waiting, or the dispatch was cancelled. A kernel that sees `true` saves its
    /// progress (in [`Workgroup::state`] or device memory) and returns
    /// [`WorkgroupStatus::Yielded`].
    pub fn should_yield(&self) -> bool {
        (self.reached)();
        self.cancelled() || (self.wants_engine)()
    }

    /// Whether the dispatch was cancelled (its queue is gone or was reset): return at
    /// once. Not a checkpoint: it does not count as progress.
    pub fn cancelled(&self) -> bool {
        self.cancelled.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// A kernel: what DISPATCH runs, one workgroup at a time, on the firmware's engines.
pub trait Kernel: Send + Sync {
    /// A short name, for logs.
    fn name(&self) -> &str;

    /// The kinds of its argument words, in order.
    fn signature(&self) -> &[ArgKind];

    /// Checks resolved arguments against the dispatch before anything runs: buffers large
    /// enough for what the grid will touch, sizes that make sense. An error stops the queue
    /// with `BadKernelArgs`; nothing is written.
    fn validate(&self, args: &Args, dispatch: &Dispatch) -> Result<(), ArgError>;

    /// Runs one workgroup. Must only touch memory through `args`, and only where `validate`
    /// said it may. Short kernels ignore `cp` and return [`WorkgroupStatus::Done`]; a long
    /// one calls [`Checkpoint::should_yield`] now and then and yields when told to, so the
    /// scheduler can share its engine. A panic here (an index out of range, say) is the
    /// kernel's exception: its queue stops with `KernelException` naming the workgroup,
    /// the dispatch's other workgroups are cancelled, and the engine serves on; the same
    /// holds for `signature`, `validate`, `bounded` and `footprint`.
    fn run(&self, args: &Args, wg: &mut Workgroup, cp: &Checkpoint<'_>) -> WorkgroupStatus;

    /// Whether a workgroup's work is bounded by its work-items, whatever the arguments:
    /// a constant amount per item, no loop over an argument-sized range, no checkpoint.
    /// The command processor may then run a dispatch of at most one workgroup's worth of
    /// items itself instead of waking an engine (see `engine::Engines::run_inline`).
    /// Claiming it falsely lets a dispatch hold the command processor. Default: `false`.
    fn bounded(&self) -> bool {
        false
    }

    /// What the workgroup will touch, from its saved state, until its next checkpoint
    /// (only on-demand buffers use it). The default: every buffer argument, whole,
    /// written. A kernel that streams through a buffer larger than device memory names
    /// only its current chunk, and yields at a checkpoint before it moves on.
    fn footprint(&self, args: &Args, _wg: &Workgroup, out: &mut Footprint) {
        for (i, a) in args.0.iter().enumerate() {
            if let Arg::Buffer(b) = a {
                out.add(i, 0..b.len() as u64, userq_uapi::paging::Access::Write);
            }
        }
    }
}

/// Runs kernel code (its signature, argument check, `bounded`, footprint or a workgroup:
/// every call the firmware makes into a kernel while serving; `name` only formats a job
/// for debugging) and catches a panic in it: a kernel that panics raises an exception,
/// which stops its queue ([`ErrorCode::KernelException`]) as a shader exception stops a
/// GPU queue, and the thread that ran it (an engine or the command processor) goes on
/// serving everyone else. `None`: it panicked (the panic hook has printed the message). A firmware built
/// with `panic = "abort"` cannot catch it and aborts instead.
///
/// [`ErrorCode::KernelException`]: userq_uapi::error::ErrorCode::KernelException
pub(crate) fn contain<T>(kernel_code: impl FnOnce() -> T) -> Option<T> {
    // AssertUnwindSafe: what the kernel leaves half-written is its dispatch's buffers
    // (its queue stops) and the job's counters, which the job's cancellation retires.
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(kernel_code)) {
        Ok(v) => Some(v),
        Err(payload) => {
            // The payload is the kernel's value too: its drop could panic again, outside
            // any catch. Leaked instead (a panic message, once per exception).
            std::mem::forget(payload);
            None
        }
    }
}

/// Copies a dispatch's argument words out of the VM once and resolves them against the
/// kernel's signature.
pub fn resolve(kernel: &dyn Kernel, d: &Dispatch, vm: &Vm) -> Result<Args, ArgError> {
    let sig = kernel.signature();
    if d.arg_count as usize != sig.len() {
        return Err(ArgError {
            index: u32::MAX,
            value: d.arg_count as u64,
        });
    }
    let mut out = Vec::with_capacity(sig.len());
    for (i, kind) in sig.iter().enumerate() {
        let addr = d
            .args
            .checked_add(8 * i as u64)
            .ok_or(ArgError::at(i, d.args))?;
        let word = vm
            .word(addr)
            .map_err(|_| ArgError::at(i, addr))?
            .load(std::sync::atomic::Ordering::Acquire);
        out.push(match kind {
            ArgKind::U64 => Arg::U64(word),
            ArgKind::F32 if word >> 32 == 0 => Arg::F32(f32::from_bits(word as u32)),
            ArgKind::F32 => return Err(ArgError::at(i, word)),
            ArgKind::Buffer => {
                let b = vm.buffer_from(word).ok_or(ArgError::at(i, word))?;
                Arg::Buffer(b)
            }
        });
    }
    let args = Args(out);
    kernel.validate(&args, d)?;
    Ok(args)
}
