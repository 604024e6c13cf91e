//! DOC: the built-in kernel library (ids and layouts in `userq_uapi::kernels`).
//!
//! Each kernel validates that its buffers hold what the arguments promise before it runs,
//! and touches memory only through atomic views (relaxed loads and stores compile to plain
//! moves). f32 values travel as their bit patterns.

use crate::kernel::{ArgError, ArgKind, Args, Checkpoint, Kernel, Workgroup, WorkgroupStatus};
use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;
use userq_uapi::kernels as id;
use userq_uapi::packet::Dispatch;

use ArgKind::{Buffer as B, F32, U64};

/// Kernels by id.
#[derive(Clone, Default)]
pub struct KernelLibrary {
    kernels: HashMap<u32, Arc<dyn Kernel>>,
}

impl std::fmt::Debug for KernelLibrary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names: Vec<_> = self
            .kernels
            .iter()
            .map(|(i, k)| (*i, k.name().to_owned()))
            .collect();
        names.sort();
        f.debug_map().entries(names).finish()
    }
}

impl KernelLibrary {
    /// The built-in kernels.
    pub fn builtin() -> Self {
        let mut l = KernelLibrary::default();
        let all: [(u32, Arc<dyn Kernel>); 17] = [
            (id::FILL_U32, Arc::new(Fill)),
            (id::COPY_U32, Arc::new(Copy)),
            (id::AXPY_F32, Arc::new(Axpy)),
            (id::SCALE_F32, Arc::new(Scale)),
            (
                id::ADD_F32,
                Arc::new(Binary {
                    name: "add_f32",
                    op: |a, b| a + b,
                }),
            ),
            (
                id::MUL_F32,
                Arc::new(Binary {
                    name: "mul_f32",
                    op: |a, b| a * b,
                }),
            ),
            (id::REDUCE_SUM_F32, Arc::new(ReduceSumF32)),
            (id::REDUCE_SUM_U64, Arc::new(ReduceSumU64)),
            (id::DOT_F32, Arc::new(Dot)),
            (id::GEMM_F32, Arc::new(Gemm)),
            (id::EXCLUSIVE_SCAN_U32, Arc::new(ExclusiveScan)),
            (id::HISTOGRAM_U32, Arc::new(Histogram)),
            (id::CHECKSUM_U32, Arc::new(Checksum)),
            (id::SPIN, Arc::new(Spin)),
            (id::PERSISTENT, Arc::new(Persistent)),
            (id::NO_PROGRESS, Arc::new(NoProgress)),
            (id::SPIN_COUNTED, Arc::new(SpinCounted)),
        ];
        for (i, k) in all {
            l.kernels.insert(i, k);
        }
        l
    }

    /// Adds (or replaces) a kernel.
    pub fn register(&mut self, id: u32, kernel: Arc<dyn Kernel>) {
        self.kernels.insert(id, kernel);
    }

    /// The kernel with an id.
    pub fn get(&self, id: u32) -> Option<&Arc<dyn Kernel>> {
        self.kernels.get(&id)
    }
}

/// Requires a 1-D dispatch (grid and workgroup of extent 1 in y and z): the element-wise
/// kernels and reductions index by x alone, and rows in y or z would run the same items
/// twice at once.
pub fn one_dimensional(d: &Dispatch) -> Result<(), ArgError> {
    if d.grid[1..] != [1, 1] || d.workgroup[1..] != [1, 1] {
        return Err(ArgError {
            index: u32::MAX,
            value: d.grid[1] as u64 * d.grid[2] as u64,
        });
    }
    Ok(())
}

/// Requires buffer argument `i` to hold `count` elements of `size` bytes.
pub fn need(args: &Args, i: usize, count: u64, size: u64) -> Result<(), ArgError> {
    let b = args.buffer(i);
    match count.checked_mul(size) {
        Some(bytes) if bytes <= b.len() as u64 => Ok(()),
        _ => Err(ArgError::at(i, b.address)),
    }
}

fn f(w: &std::sync::atomic::AtomicU32) -> f32 {
    f32::from_bits(w.load(Relaxed))
}

fn set(w: &std::sync::atomic::AtomicU32, v: f32) {
    w.store(v.to_bits(), Relaxed)
}

/// The 1-D items of a workgroup below `n`.
fn items(wg: &Workgroup, n: u64) -> std::ops::Range<usize> {
    let r = wg.range(0);
    (r.start.min(n) as usize)..(r.end.min(n) as usize)
}

struct Fill;
impl Kernel for Fill {
    fn name(&self) -> &str {
        "fill_u32"
    }
    fn signature(&self) -> &[ArgKind] {
        &[U64, U64, B]
    }
    fn validate(&self, a: &Args, d: &Dispatch) -> Result<(), ArgError> {
        one_dimensional(d)?;
        if a.u64(1) > u32::MAX as u64 {
            return Err(ArgError::at(1, a.u64(1)));
        }
        need(a, 2, a.u64(0), 4)
    }
    fn run(&self, a: &Args, wg: &mut Workgroup, _: &Checkpoint<'_>) -> WorkgroupStatus {
        let out = a.buffer(2).words32();
        let v = a.u64(1) as u32;
        for i in items(wg, a.u64(0)) {
            out[i].store(v, Relaxed);
        }
        WorkgroupStatus::Done
    }
}

struct Copy;
impl Kernel for Copy {
    fn name(&self) -> &str {
        "copy_u32"
    }
    fn signature(&self) -> &[ArgKind] {
        &[U64, B, B]
    }
    fn validate(&self, a: &Args, d: &Dispatch) -> Result<(), ArgError> {
        one_dimensional(d)?;
        need(a, 1, a.u64(0), 4)?;
        need(a, 2, a.u64(0), 4)
    }
    fn run(&self, a: &Args, wg: &mut Workgroup, _: &Checkpoint<'_>) -> WorkgroupStatus {
        let (src, dst) = (a.buffer(1).words32(), a.buffer(2).words32());
        for i in items(wg, a.u64(0)) {
            dst[i].store(src[i].load(Relaxed), Relaxed);
        }
        WorkgroupStatus::Done
    }
}

struct Axpy;
impl Kernel for Axpy {
    fn name(&self) -> &str {
        "axpy_f32"
    }
    fn signature(&self) -> &[ArgKind] {
        &[U64, F32, B, B]
    }
    fn validate(&self, a: &Args, d: &Dispatch) -> Result<(), ArgError> {
        one_dimensional(d)?;
        need(a, 2, a.u64(0), 4)?;
        need(a, 3, a.u64(0), 4)
    }
    fn run(&self, a: &Args, wg: &mut Workgroup, _: &Checkpoint<'_>) -> WorkgroupStatus {
        let (s, x, y) = (a.f32(1), a.buffer(2).words32(), a.buffer(3).words32());
        for i in items(wg, a.u64(0)) {
            set(&y[i], s * f(&x[i]) + f(&y[i]));
        }
        WorkgroupStatus::Done
    }
}

struct Scale;
impl Kernel for Scale {
    fn name(&self) -> &str {
        "scale_f32"
    }
    fn signature(&self) -> &[ArgKind] {
        &[U64, F32, B]
    }
    fn validate(&self, a: &Args, d: &Dispatch) -> Result<(), ArgError> {
        one_dimensional(d)?;
        need(a, 2, a.u64(0), 4)
    }
    fn run(&self, a: &Args, wg: &mut Workgroup, _: &Checkpoint<'_>) -> WorkgroupStatus {
        let (s, x) = (a.f32(1), a.buffer(2).words32());
        for i in items(wg, a.u64(0)) {
            set(&x[i], s * f(&x[i]));
        }
        WorkgroupStatus::Done
    }
}

struct Binary {
    name: &'static str,
    op: fn(f32, f32) -> f32,
}
impl Kernel for Binary {
    fn name(&self) -> &str {
        self.name
    }
    fn signature(&self) -> &[ArgKind] {
        &[U64, B, B, B]
    }
    fn validate(&self, a: &Args, d: &Dispatch) -> Result<(), ArgError> {
        one_dimensional(d)?;
        (1..4).try_for_each(|i| need(a, i, a.u64(0), 4))
    }
    fn run(&self, a: &Args, wg: &mut Workgroup, _: &Checkpoint<'_>) -> WorkgroupStatus {
        let (x, y, out) = (
            a.buffer(1).words32(),
            a.buffer(2).words32(),
            a.buffer(3).words32(),
        );
        for i in items(wg, a.u64(0)) {
            set(&out[i], (self.op)(f(&x[i]), f(&y[i])));
        }
        WorkgroupStatus::Done
    }
}

/// Partials need one slot per workgroup.
fn need_partials(a: &Args, i: usize, d: &Dispatch, size: u64) -> Result<(), ArgError> {
    need(a, i, d.workgroup_count(), size)
}

struct ReduceSumF32;
impl Kernel for ReduceSumF32 {
    fn name(&self) -> &str {
        "reduce_sum_f32"
    }
    fn signature(&self) -> &[ArgKind] {
        &[U64, B, B]
    }
    fn validate(&self, a: &Args, d: &Dispatch) -> Result<(), ArgError> {
        one_dimensional(d)?;
        need(a, 1, a.u64(0), 4)?;
        need_partials(a, 2, d, 4)
    }
    fn run(&self, a: &Args, wg: &mut Workgroup, _: &Checkpoint<'_>) -> WorkgroupStatus {
        let x = a.buffer(1).words32();
        let sum: f32 = items(wg, a.u64(0)).map(|i| f(&x[i])).sum();
        set(&a.buffer(2).words32()[wg.index as usize], sum);
        WorkgroupStatus::Done
    }
}

struct ReduceSumU64;
impl Kernel for ReduceSumU64 {
    fn name(&self) -> &str {
        "reduce_sum_u64"
    }
    fn signature(&self) -> &[ArgKind] {
        &[U64, B, B]
    }
    fn validate(&self, a: &Args, d: &Dispatch) -> Result<(), ArgError> {
        one_dimensional(d)?;
        need(a, 1, a.u64(0), 8)?;
        need_partials(a, 2, d, 8)
    }
    fn run(&self, a: &Args, wg: &mut Workgroup, _: &Checkpoint<'_>) -> WorkgroupStatus {
        let x = a.buffer(1).words64();
        let sum = items(wg, a.u64(0)).fold(0u64, |s, i| s.wrapping_add(x[i].load(Relaxed)));
        a.buffer(2).words64()[wg.index as usize].store(sum, Relaxed);
        WorkgroupStatus::Done
    }
}

struct Dot;
impl Kernel for Dot {
    fn name(&self) -> &str {
        "dot_f32"
    }
    fn signature(&self) -> &[ArgKind] {
        &[U64, B, B, B]
    }
    fn validate(&self, a: &Args, d: &Dispatch) -> Result<(), ArgError> {
        one_dimensional(d)?;
        need(a, 1, a.u64(0), 4)?;
        need(a, 2, a.u64(0), 4)?;
        need_partials(a, 3, d, 4)
    }
    fn run(&self, a: &Args, wg: &mut Workgroup, _: &Checkpoint<'_>) -> WorkgroupStatus {
        let (x, y) = (a.buffer(1).words32(), a.buffer(2).words32());
        let dot: f32 = items(wg, a.u64(0)).map(|i| f(&x[i]) * f(&y[i])).sum();
        set(&a.buffer(3).words32()[wg.index as usize], dot);
        WorkgroupStatus::Done
    }
}

/// Tile edge of the GEMM's inner blocking.
const TILE: usize = 16;

struct Gemm;
impl Kernel for Gemm {
    fn name(&self) -> &str {
        "gemm_f32"
    }
    fn signature(&self) -> &[ArgKind] {
        &[U64, U64, U64, B, B, B]
    }
    fn validate(&self, a: &Args, _: &Dispatch) -> Result<(), ArgError> {
        let (m, n, k) = (a.u64(0), a.u64(1), a.u64(2));
        for (i, v) in [(0, m), (1, n), (2, k)] {
            if v == 0 || v > u32::MAX as u64 {
                return Err(ArgError::at(i, v));
            }
        }
        need(a, 3, m * k, 4)?;
        need(a, 4, k * n, 4)?;
        need(a, 5, m * n, 4)
    }
    fn run(&self, a: &Args, wg: &mut Workgroup, cp: &Checkpoint<'_>) -> WorkgroupStatus {
        let (m, n, k) = (a.u64(0) as usize, a.u64(1) as usize, a.u64(2) as usize);
        let (ma, mb, mc) = (
            a.buffer(3).words32(),
            a.buffer(4).words32(),
            a.buffer(5).words32(),
        );
        let cols = wg.range(0);
        let rows = wg.range(1);
        let cols = (cols.start as usize).min(n)..(cols.end as usize).min(n);
        let rows = (rows.start as usize).min(m)..(rows.end as usize).min(m);
        if cols.is_empty() || rows.is_empty() {
            return WorkgroupStatus::Done;
        }
        // Accumulate the workgroup's tile of C in registers-to-be, walking K in tiles so
        // that the A and B panels stay in cache.
        let (w, h) = (cols.len(), rows.len());
        let mut acc = vec![0f32; w * h];
        // Resuming after a checkpoint: the partial sums were parked in C itself, and the
        // state word says which K-tile comes next (0: a fresh start).
        let first_k = wg.state as usize;
        if first_k > 0 {
            for (i, r) in rows.clone().enumerate() {
                for (j, c) in cols.clone().enumerate() {
                    acc[i * w + j] = f(&mc[r * n + c]);
                }
            }
        }
        let mut bt = vec![0f32; TILE * w];
        for k0 in (first_k..k).step_by(TILE) {
            if k0 > first_k && cp.should_yield() {
                for (i, r) in rows.clone().enumerate() {
                    for (j, c) in cols.clone().enumerate() {
                        set(&mc[r * n + c], acc[i * w + j]);
                    }
                }
                wg.state = k0 as u64;
                return WorkgroupStatus::Yielded;
            }
            let kt = TILE.min(k - k0);
            for kk in 0..kt {
                for (j, c) in cols.clone().enumerate() {
                    bt[kk * w + j] = f(&mb[(k0 + kk) * n + c]);
                }
            }
            for (i, r) in rows.clone().enumerate() {
                for kk in 0..kt {
                    let av = f(&ma[r * k + k0 + kk]);
                    let brow = &bt[kk * w..kk * w + w];
                    let arow = &mut acc[i * w..i * w + w];
                    for j in 0..w {
                        arow[j] += av * brow[j];
                    }
                }
            }
        }
        for (i, r) in rows.enumerate() {
            for (j, c) in cols.clone().enumerate() {
                set(&mc[r * n + c], acc[i * w + j]);
            }
        }
        WorkgroupStatus::Done
    }
}

struct ExclusiveScan;
impl Kernel for ExclusiveScan {
    fn name(&self) -> &str {
        "exclusive_scan_u32"
    }
    fn signature(&self) -> &[ArgKind] {
        &[U64, B, B]
    }
    fn validate(&self, a: &Args, d: &Dispatch) -> Result<(), ArgError> {
        if d.workgroup_count() != 1 {
            return Err(ArgError::at(0, d.workgroup_count()));
        }
        // The index and the running sum must fit the workgroup's state word.
        if a.u64(0) > u32::MAX as u64 {
            return Err(ArgError::at(0, a.u64(0)));
        }
        need(a, 1, a.u64(0), 4)?;
        need(a, 2, a.u64(0), 4)
    }
    fn run(&self, a: &Args, wg: &mut Workgroup, cp: &Checkpoint<'_>) -> WorkgroupStatus {
        let (input, out) = (a.buffer(1).words32(), a.buffer(2).words32());
        let n = a.u64(0) as usize;
        // Saved state: next index in the high half, running sum in the low half.
        let (mut i, mut acc) = ((wg.state >> 32) as usize, wg.state as u32);
        while i < n {
            let v = input[i].load(Relaxed);
            out[i].store(acc, Relaxed);
            acc = acc.wrapping_add(v);
            i += 1;
            if i % 4096 == 0 && i < n && cp.should_yield() {
                wg.state = (i as u64) << 32 | acc as u64;
                return WorkgroupStatus::Yielded;
            }
        }
        WorkgroupStatus::Done
    }
}

struct Histogram;
impl Kernel for Histogram {
    fn name(&self) -> &str {
        "histogram_u32"
    }
    fn signature(&self) -> &[ArgKind] {
        &[U64, U64, B, B]
    }
    fn validate(&self, a: &Args, d: &Dispatch) -> Result<(), ArgError> {
        one_dimensional(d)?;
        if a.u64(1) == 0 {
            return Err(ArgError::at(1, 0));
        }
        need(a, 2, a.u64(0), 4)?;
        need(a, 3, a.u64(1), 4)
    }
    fn run(&self, a: &Args, wg: &mut Workgroup, _: &Checkpoint<'_>) -> WorkgroupStatus {
        let (input, hist, bins) = (a.buffer(2).words32(), a.buffer(3).words32(), a.u64(1));
        for i in items(wg, a.u64(0)) {
            let bin = (input[i].load(Relaxed) as u64 % bins) as usize;
            hist[bin].fetch_add(1, Relaxed);
        }
        WorkgroupStatus::Done
    }
}

struct Checksum;
impl Kernel for Checksum {
    fn name(&self) -> &str {
        "checksum_u32"
    }
    fn signature(&self) -> &[ArgKind] {
        &[U64, B, B]
    }
    fn validate(&self, a: &Args, d: &Dispatch) -> Result<(), ArgError> {
        one_dimensional(d)?;
        need(a, 1, a.u64(0), 4)?;
        need_partials(a, 2, d, 4)
    }
    fn run(&self, a: &Args, wg: &mut Workgroup, _: &Checkpoint<'_>) -> WorkgroupStatus {
        let input = a.buffer(1).words32();
        let mut h: u32 = 0x811c_9dc5;
        for i in items(wg, a.u64(0)) {
            for b in input[i].load(Relaxed).to_le_bytes() {
                h = (h ^ b as u32).wrapping_mul(0x0100_0193);
            }
        }
        a.buffer(2).words32()[wg.index as usize].store(h, Relaxed);
        WorkgroupStatus::Done
    }
}

/// FNV-1a over the little-endian bytes of `words`: the CPU reference of the checksum
/// kernel for one workgroup's range.
pub fn fnv1a(words: &[u32]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for w in words {
        for b in w.to_le_bytes() {
            h = (h ^ b as u32).wrapping_mul(0x0100_0193);
        }
    }
    h
}

struct Spin;
impl Kernel for Spin {
    fn name(&self) -> &str {
        "spin"
    }
    fn signature(&self) -> &[ArgKind] {
        &[U64]
    }
    fn validate(&self, _: &Args, _: &Dispatch) -> Result<(), ArgError> {
        Ok(())
    }
    fn run(&self, a: &Args, wg: &mut Workgroup, cp: &Checkpoint<'_>) -> WorkgroupStatus {
        // `wg.state` holds the nanoseconds already spun: a long spin yields at checkpoints
        // and resumes where it stopped.
        let total = a.u64(0);
        let start = Instant::now();
        let done_before = wg.state;
        loop {
            let spun = done_before.saturating_add(start.elapsed().as_nanos() as u64);
            if spun >= total {
                return WorkgroupStatus::Done;
            }
            for _ in 0..64 {
                std::hint::spin_loop();
            }
            if cp.should_yield() {
                wg.state = done_before.saturating_add(start.elapsed().as_nanos() as u64);
                return WorkgroupStatus::Yielded;
            }
        }
    }
}

pub use userq_uapi::kernels::mailbox;

/// The classic persistent kernel: one workgroup that serves a mailbox in device memory
/// until told to stop, yielding its engine at checkpoints while idle or when its slice is
/// used.
struct Persistent;
impl Kernel for Persistent {
    fn name(&self) -> &str {
        "persistent"
    }
    fn signature(&self) -> &[ArgKind] {
        &[B]
    }
    fn validate(&self, a: &Args, d: &Dispatch) -> Result<(), ArgError> {
        if d.workgroup_count() != 1 {
            return Err(ArgError::at(0, d.workgroup_count()));
        }
        need(a, 0, mailbox::WORDS as u64, 8)
    }
    fn run(&self, a: &Args, _: &mut Workgroup, cp: &Checkpoint<'_>) -> WorkgroupStatus {
        use std::sync::atomic::Ordering::{Acquire, Release};
        let m = a.buffer(0).words64();
        loop {
            if cp.cancelled() || m[mailbox::STOP].load(Acquire) != 0 {
                return WorkgroupStatus::Done;
            }
            let req = m[mailbox::REQUEST_SEQ].load(Acquire);
            if req != m[mailbox::RESPONSE_SEQ].load(Relaxed) {
                let v = m[mailbox::REQUEST_VALUE].load(Relaxed);
                m[mailbox::RESPONSE_VALUE].store(v.wrapping_mul(3).wrapping_add(1), Relaxed);
                m[mailbox::RESPONSE_SEQ].store(req, Release);
            } else {
                std::hint::spin_loop();
            }
            // Every iteration: a stream of requests must not keep the engine forever.
            if cp.should_yield() {
                return WorkgroupStatus::Yielded;
            }
        }
    }
}

/// A cooperative kernel that never reaches a checkpoint of progress: it holds its engine
/// until its dispatch is cancelled (its queue destroyed, or later reset). It exists to test
/// hang handling.
struct NoProgress;
impl Kernel for NoProgress {
    fn name(&self) -> &str {
        "no_progress"
    }
    fn signature(&self) -> &[ArgKind] {
        &[]
    }
    fn validate(&self, _: &Args, _: &Dispatch) -> Result<(), ArgError> {
        Ok(())
    }
    fn run(&self, _: &Args, _: &mut Workgroup, cp: &Checkpoint<'_>) -> WorkgroupStatus {
        while !cp.cancelled() {
            std::hint::spin_loop();
        }
        WorkgroupStatus::Done
    }
}

/// Spins `ns` per workgroup, then counts the workgroup in `counter[0]`: engine time made
/// visible to the host, for fairness probes.
struct SpinCounted;
impl Kernel for SpinCounted {
    fn name(&self) -> &str {
        "spin_counted"
    }
    fn signature(&self) -> &[ArgKind] {
        &[U64, B]
    }
    fn validate(&self, a: &Args, _: &Dispatch) -> Result<(), ArgError> {
        if a.u64(0) > 1_000_000_000 {
            return Err(ArgError::at(0, a.u64(0)));
        }
        need(a, 1, 1, 8)
    }
    fn run(&self, a: &Args, _: &mut Workgroup, _: &Checkpoint<'_>) -> WorkgroupStatus {
        let until = Instant::now() + std::time::Duration::from_nanos(a.u64(0));
        while Instant::now() < until {
            std::hint::spin_loop();
        }
        a.buffer(1).words64()[0].fetch_add(1, Relaxed);
        WorkgroupStatus::Done
    }
}
