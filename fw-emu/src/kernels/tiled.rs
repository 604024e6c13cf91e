//! DOC: tiled kernels with checkpoints inside a workgroup: GEMM (per K-tile) and the
//! exclusive scan (per block), each saving its progress in the workgroup's state word.

use super::{f, need, set};
use crate::kernel::{ArgError, ArgKind, Args, Checkpoint, Kernel, Workgroup, WorkgroupStatus};
use std::sync::atomic::Ordering::Relaxed;
use userq_uapi::packet::Dispatch;
use ArgKind::{Buffer as B, U64};

/// Tile edge of the GEMM's inner blocking.
const TILE: usize = 16;

pub(super) struct Gemm;
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

pub(super) struct ExclusiveScan;
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
