//! DOC: a paged job's footprints: pinning the pages a workgroup will touch before it
//! runs, and the fault it raises when one is missing.
//!
//! `pin_footprint` pins every on-demand page of a workgroup's [`Kernel::footprint`]
//! (see [`crate::window::PageEntry::pin`]) and stamps its pool slot in the use table, or
//! returns a [`FaultNote`] with every page missing (its pins dropped: a faulted workgroup
//! holds nothing). `fault_ahead` adds the missing pages of the job's next workgroups, so
//! that a batch carries what a GPU's concurrently running waves would fault on.
//!
//! [`Kernel::footprint`]: crate::kernel::Kernel::footprint

use crate::job::Job;
use crate::kernel::{contain, Arg, Footprint, Workgroup};
use crate::window::Window;
use crate::QueueId;
use std::sync::Arc;
use userq_uapi::paging::{Access, DEVICE_PAGE, FAULT_BATCH_MAX};

/// A workgroup's fault, for the command processor to batch to kmd-shim.
#[derive(Debug, Clone)]
pub struct FaultNote {
    /// The faulting queue.
    pub queue: QueueId,
    /// Its job.
    pub job: u64,
    /// The pages missing: (device address of the page, access).
    pub pages: Vec<(u64, Access)>,
    /// Pages the job's next workgroups will miss ("fault-ahead"), not among `pages`.
    pub ahead: Vec<(u64, Access)>,
    /// The footprint needs more pages than the pool has: it can never run. The pages
    /// needed, and the first one's address.
    pub too_large: Option<(u64, u64)>,
}

/// Pages a workgroup pinned; unpinned on drop.
pub(crate) struct Pins<'a>(Vec<(&'a Window, usize, u32)>);

impl Drop for Pins<'_> {
    fn drop(&mut self) {
        for (w, page, gen) in &self.0 {
            if let Some(e) = w.entry(*page) {
                e.unpin(*gen);
            }
        }
    }
}

/// Calls `f(window, page, page address, access)` for every on-demand page `fp` names,
/// range by range (a page two ranges name comes twice).
fn each_page<'a>(
    job: &'a Job,
    fp: &Footprint,
    mut f: impl FnMut(&'a Arc<Window>, u64, u64, Access),
) {
    for (arg, range, access) in &fp.ranges {
        let Some(Arg::Buffer(b)) = job.args().0.get(*arg) else {
            continue;
        };
        let Some((w, offset)) = b.window() else {
            continue;
        };
        let end = range.end.min(b.len() as u64);
        if range.start >= end {
            continue;
        }
        let base_va = b.address - offset as u64;
        let first = (offset as u64 + range.start) / DEVICE_PAGE;
        let last = (offset as u64 + end - 1) / DEVICE_PAGE;
        for page in first..=last {
            f(w, page, base_va + page * DEVICE_PAGE, *access);
        }
    }
}

/// The distinct on-demand pages a footprint names, and the first one's address.
fn distinct_pages(job: &Job, fp: &Footprint) -> (u64, u64) {
    let mut vas = Vec::new();
    each_page(job, fp, |_, _, va, _| vas.push(va));
    let first = vas.first().copied().unwrap_or(0);
    vas.sort_unstable();
    vas.dedup();
    (vas.len() as u64, first)
}

/// Pins every page of the workgroup's footprint in on-demand buffers, or returns the
/// fault: every page of it not resident (the pins taken are released).
pub(crate) fn pin_footprint<'a>(job: &'a Job, wg: &Workgroup) -> Result<Pins<'a>, FaultNote> {
    let mut fp = Footprint::default();
    job.kernel().footprint(job.args(), wg, &mut fp);
    let mut pins = Pins(Vec::new());
    let mut missing = Vec::new();
    // Counts a page once per range naming it: an upper bound of the distinct pages.
    let mut named = 0u64;
    let mut now = None;
    let mut slots = None;
    each_page(job, &fp, |w, page, va, access| {
        named += 1;
        slots.get_or_insert(w.pool().slots() as u64);
        let Some(e) = w.entry(page as usize) else {
            return;
        };
        match e.pin() {
            Some((gen, slot)) => {
                let t = *now.get_or_insert_with(|| w.pool().tick());
                w.pool().touch(slot, t);
                pins.0.push((&**w, page as usize, gen));
            }
            None => missing.push((va, access)),
        }
    });
    let too_large = slots
        .filter(|&slots| named > slots)
        .map(|_| distinct_pages(job, &fp))
        .filter(|&(n, _)| n > slots.unwrap_or(u64::MAX));
    if missing.is_empty() && too_large.is_none() {
        return Ok(pins);
    }
    missing.sort_unstable_by_key(|m| m.0);
    missing.dedup_by_key(|m| m.0);
    Err(FaultNote {
        queue: job.queue,
        job: job.id,
        pages: missing,
        ahead: Vec::new(),
        too_large,
    })
}

/// Workgroups looked at past a faulting one, at most, on an engine.
pub(crate) const FAULT_AHEAD: u64 = 1 << 16;

/// The same on the command processor (a dispatch it runs itself): a look-ahead of
/// thousands of footprints would hold it for a millisecond, where it runs a dispatch's
/// workgroups only a few microseconds at a time. 64 footprints take about as long.
pub(crate) const FAULT_AHEAD_ON_CP: u64 = 64;

/// Adds to a fault the missing pages of the job's workgroups that have not started yet
/// (until a batch of pages is missing, twice that many were looked at, or `limit`
/// workgroups): on a GPU they would all be in flight and fault together,
/// so their faults go in the same batch instead of one round trip each (UVM services its
/// batches, and prefetches, the same way).
pub(crate) fn fault_ahead(job: &Job, note: &mut FaultNote, limit: u64) {
    if note.too_large.is_some() {
        return;
    }
    let (from, to) = job.unstarted(limit);
    let mut fp = Footprint::default();
    let mut seen = 0usize;
    let mut last_seen = u64::MAX;
    for index in from..to {
        if note.pages.len() + note.ahead.len() >= FAULT_BATCH_MAX || seen >= 2 * FAULT_BATCH_MAX {
            break;
        }
        fp.ranges.clear();
        let wg = Workgroup::of(job.dispatch(), index);
        // Kernel code: a panic here only ends the look-ahead (that workgroup raises its
        // exception when it runs, see `kernel::contain`).
        if contain(|| job.kernel().footprint(job.args(), &wg, &mut fp)).is_none() {
            break;
        }
        each_page(job, &fp, |w, page, va, access| {
            let resident = w
                .entry(page as usize)
                .is_some_and(|e| e.state() == crate::window::state::RESIDENT);
            if va != last_seen {
                seen += 1;
                last_seen = va;
            }
            // Neighbouring workgroups share pages: skip the repeat of the last one.
            if !resident && note.ahead.last().map(|p| p.0) != Some(va) {
                note.ahead.push((va, access));
            }
        });
    }
    note.ahead.sort_unstable_by_key(|m| m.0);
    note.ahead.dedup_by_key(|m| m.0);
    let own = &note.pages;
    note.ahead
        .retain(|a| own.binary_search_by_key(&a.0, |p| p.0).is_err());
}
