//! DOC: reductions: sums, dot product, histogram, checksum. Each workgroup writes one
//! partial (or its own bins), so the result does not depend on the order workgroups run
//! in, and the host (or a second dispatch) combines the partials deterministically.

use super::{f, items, need, one_dimensional, set};
use crate::kernel::{
    ArgError, ArgKind, Args, Checkpoint, Footprint, Kernel, Workgroup, WorkgroupStatus,
};
use std::sync::atomic::Ordering::Relaxed;
use userq_uapi::packet::Dispatch;
use userq_uapi::paging::Access::{Read, Write};
use ArgKind::{Buffer as B, U64};

/// The footprint of a reduction: its items of `input` (elements of `size` bytes) and its
/// own partial slot in `partials`.
fn reduction(
    a: &Args,
    wg: &Workgroup,
    inputs: &[usize],
    size: u64,
    partials: usize,
    psize: u64,
    out: &mut Footprint,
) {
    let r = items(wg, a.u64(0));
    for &i in inputs {
        out.items(i, r.clone(), size, Read);
    }
    out.add(partials, wg.index * psize..(wg.index + 1) * psize, Write);
}

/// Partials need one slot per workgroup.
fn need_partials(a: &Args, i: usize, d: &Dispatch, size: u64) -> Result<(), ArgError> {
    need(a, i, d.workgroup_count(), size)
}

pub(super) struct ReduceSumF32;
impl Kernel for ReduceSumF32 {
    fn name(&self) -> &str {
        "reduce_sum_f32"
    }
    fn bounded(&self) -> bool {
        true // a constant amount per work-item
    }
    fn footprint(&self, a: &Args, wg: &Workgroup, out: &mut Footprint) {
        reduction(a, wg, &[1], 4, 2, 4, out);
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

pub(super) struct ReduceSumU64;
impl Kernel for ReduceSumU64 {
    fn name(&self) -> &str {
        "reduce_sum_u64"
    }
    fn bounded(&self) -> bool {
        true // a constant amount per work-item
    }
    fn footprint(&self, a: &Args, wg: &Workgroup, out: &mut Footprint) {
        reduction(a, wg, &[1], 8, 2, 8, out);
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

pub(super) struct Dot;
impl Kernel for Dot {
    fn name(&self) -> &str {
        "dot_f32"
    }
    fn bounded(&self) -> bool {
        true // a constant amount per work-item
    }
    fn footprint(&self, a: &Args, wg: &Workgroup, out: &mut Footprint) {
        reduction(a, wg, &[1, 2], 4, 3, 4, out);
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

pub(super) struct Histogram;
impl Kernel for Histogram {
    fn name(&self) -> &str {
        "histogram_u32"
    }
    fn bounded(&self) -> bool {
        true // a constant amount per work-item
    }
    fn footprint(&self, a: &Args, wg: &Workgroup, out: &mut Footprint) {
        out.items(2, items(wg, a.u64(0)), 4, Read);
        // Any bin may be hit: all of them (atomic adds, so replays after a fault are
        // exact only because the workgroup faults before it adds anything).
        out.add(3, 0..a.u64(1) * 4, Write);
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

pub(super) struct Checksum;
impl Kernel for Checksum {
    fn name(&self) -> &str {
        "checksum_u32"
    }
    fn bounded(&self) -> bool {
        true // a constant amount per work-item
    }
    fn footprint(&self, a: &Args, wg: &Workgroup, out: &mut Footprint) {
        reduction(a, wg, &[1], 4, 2, 4, out);
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
