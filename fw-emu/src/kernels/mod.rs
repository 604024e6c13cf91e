//! DOC: the built-in kernel library (ids and layouts in `userq_uapi::kernels`).
//!
//! Each kernel validates that its buffers hold what the arguments promise before it runs,
//! and touches memory only through atomic views (relaxed loads and stores compile to plain
//! moves). f32 values travel as their bit patterns. By family: `elementwise.rs` (fill, copy,
//! axpy, scale, add, mul), `reduce.rs` (sums, dot, histogram, checksum: one partial per
//! workgroup), `tiled.rs` (GEMM and scan, checkpointed inside a workgroup), `long.rs` (spin,
//! persistent, no_progress, spin_counted, runaway, stream_add). This file is the library and the helpers they
//! share.

mod elementwise;
mod long;
mod reduce;
mod tiled;

pub use long::mailbox;
pub use reduce::fnv1a;

use crate::kernel::{ArgError, Args, Kernel, Workgroup};
use elementwise::{Axpy, Binary, Copy, Fill, Scale};
use long::{NoProgress, Persistent, Runaway, Spin, SpinCounted, StreamAdd};
use reduce::{Checksum, Dot, Histogram, ReduceSumF32, ReduceSumU64};
use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use tiled::{ExclusiveScan, Gemm};
use userq_uapi::kernels as id;
use userq_uapi::packet::Dispatch;

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
        let all: [(u32, Arc<dyn Kernel>); 19] = [
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
            (id::RUNAWAY, Arc::new(Runaway)),
            (id::STREAM_ADD_U32, Arc::new(StreamAdd)),
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
