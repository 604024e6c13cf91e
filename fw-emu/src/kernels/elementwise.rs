//! DOC: element-wise kernels: fill, copy, axpy, scale, add, mul. One work-item per
//! element, each workgroup a contiguous range; no workgroup reads another's output.

use super::{f, items, need, one_dimensional, set};
use crate::kernel::{
    ArgError, ArgKind, Args, Checkpoint, Footprint, Kernel, Workgroup, WorkgroupStatus,
};
use std::sync::atomic::Ordering::Relaxed;
use userq_uapi::packet::Dispatch;
use userq_uapi::paging::Access::{Read, Write};
use ArgKind::{Buffer as B, F32, U64};

pub(super) struct Fill;
impl Kernel for Fill {
    fn name(&self) -> &str {
        "fill_u32"
    }
    fn bounded(&self) -> bool {
        true // a constant amount per work-item
    }
    fn signature(&self) -> &[ArgKind] {
        &[U64, U64, B]
    }
    fn footprint(&self, a: &Args, wg: &Workgroup, out: &mut Footprint) {
        let r = items(wg, a.u64(0));
        out.items(2, r, 4, Write);
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

pub(super) struct Copy;
impl Kernel for Copy {
    fn name(&self) -> &str {
        "copy_u32"
    }
    fn bounded(&self) -> bool {
        true // a constant amount per work-item
    }
    fn signature(&self) -> &[ArgKind] {
        &[U64, B, B]
    }
    fn footprint(&self, a: &Args, wg: &Workgroup, out: &mut Footprint) {
        let r = items(wg, a.u64(0));
        out.items(1, r.clone(), 4, Read);
        out.items(2, r, 4, Write);
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

pub(super) struct Axpy;
impl Kernel for Axpy {
    fn name(&self) -> &str {
        "axpy_f32"
    }
    fn bounded(&self) -> bool {
        true // a constant amount per work-item
    }
    fn signature(&self) -> &[ArgKind] {
        &[U64, F32, B, B]
    }
    fn footprint(&self, a: &Args, wg: &Workgroup, out: &mut Footprint) {
        let r = items(wg, a.u64(0));
        out.items(2, r.clone(), 4, Read);
        out.items(3, r, 4, Write);
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

pub(super) struct Scale;
impl Kernel for Scale {
    fn name(&self) -> &str {
        "scale_f32"
    }
    fn bounded(&self) -> bool {
        true // a constant amount per work-item
    }
    fn signature(&self) -> &[ArgKind] {
        &[U64, F32, B]
    }
    fn footprint(&self, a: &Args, wg: &Workgroup, out: &mut Footprint) {
        let r = items(wg, a.u64(0));
        out.items(2, r, 4, Write);
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

/// An element-wise binary operation on f32 vectors.
pub(super) struct Binary {
    pub(super) name: &'static str,
    pub(super) op: fn(f32, f32) -> f32,
}
impl Kernel for Binary {
    fn name(&self) -> &str {
        self.name
    }
    fn bounded(&self) -> bool {
        true // a constant amount per work-item
    }
    fn signature(&self) -> &[ArgKind] {
        &[U64, B, B, B]
    }
    fn footprint(&self, a: &Args, wg: &Workgroup, out: &mut Footprint) {
        let r = items(wg, a.u64(0));
        out.items(1, r.clone(), 4, Read);
        out.items(2, r.clone(), 4, Read);
        out.items(3, r, 4, Write);
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
