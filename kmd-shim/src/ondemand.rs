//! DOC: on-demand buffers at kmd-shim's ioctls: ALLOC_BUFFER with `ON_DEMAND`,
//! FREE_BUFFER of such a buffer, closing a context, MIGRATE and PAGING_STATS. Each takes
//! the pager lock ([`crate::pager`]); a free or close has the firmware unmap first and
//! gives the slots back only once it has confirmed.

use crate::device::Device;
use crate::pager::{OdBuffer, PageLink, PagerState};
use rustix::fd::{AsFd, OwnedFd};
use userq_uapi::fwmsg::FwRequest;
use userq_uapi::paging::{MigrateTo, PagingStats, DEVICE_PAGE};
use userq_uapi::shm::ShmBytes;
use userq_uapi::KmdStatus;

impl Device {
    /// ALLOC_BUFFER with ON_DEMAND: a host copy (the memfd) and a device window with no
    /// page resident. Charged to the host budget like any buffer; device memory is
    /// charged to nobody until a kernel touches it.
    pub(crate) fn alloc_on_demand(
        &self,
        ctx: u32,
        size: u64,
        va: u64,
        fd: &OwnedFd,
    ) -> Result<(), KmdStatus> {
        let link = self.link();
        let host = ShmBytes::map(fd.as_fd(), crate::buffer::whole_pages(size) as usize)
            .map_err(|_| KmdStatus::OutOfMemory)?;
        let mut st = self.pager.lock(&link)?;
        link.call(FwRequest::MapOnDemand { ctx, va, size }, &[])?;
        let pages = size.div_ceil(DEVICE_PAGE) as usize;
        st.buffers.insert(
            (ctx, va),
            OdBuffer {
                size,
                host,
                pages: vec![None; pages],
                evicted: vec![false; pages],
            },
        );
        Ok(())
    }

    /// FREE_BUFFER of an on-demand buffer: the firmware unmaps it (stopping the queues
    /// whose dispatch still uses it, `BufferFreed`) and only then are its slots reused.
    /// If the firmware did not confirm the unmap, the slots stay out of circulation (the
    /// device is then lost or about to be, and the next generation starts over).
    pub(crate) fn free_on_demand(&self, ctx: u32, va: u64) -> Result<(), KmdStatus> {
        let link = self.link();
        let mut st = self.pager.lock(&link)?;
        match link.call(FwRequest::UnmapBuffer { ctx, va }, &[]) {
            Ok(()) | Err(KmdStatus::NotFound) => {
                forget_buffer(&mut st, ctx, va);
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// A closing context: the firmware unmaps it (`unmap` makes the call and says whether
    /// the firmware confirmed it) with the pager lock held; then its on-demand buffers'
    /// slots go back, unless the unmap was not confirmed (see [`Device::free_on_demand`]).
    pub(crate) fn close_paging(&self, ctx: u32, unmap: impl FnOnce() -> bool) {
        let link = self.link();
        let Ok(mut st) = self.pager.lock(&link) else {
            unmap();
            return;
        };
        if !unmap() {
            return;
        }
        let keys: Vec<u64> = st
            .buffers
            .range((ctx, 0)..=(ctx, u64::MAX))
            .map(|(k, _)| k.1)
            .collect();
        for va in keys {
            forget_buffer(&mut st, ctx, va);
        }
    }

    /// MIGRATE.
    pub fn migrate(&self, ctx: u32, va: u64, len: u64, to: MigrateTo) -> Result<(), KmdStatus> {
        let link = self.link();
        if link.is_lost() {
            return Err(KmdStatus::DeviceLost);
        }
        let mut st = self.pager.lock(&link)?;
        let (key, first) = st.find(ctx, va).ok_or(KmdStatus::NotFound)?;
        let size = st.buffers[&key].size;
        let end = va.saturating_add(len.max(1)).min(key.1 + size);
        let last = ((end - 1 - key.1) / DEVICE_PAGE) as usize;
        let pages: Vec<usize> = (first..=last).collect();
        let pl = PageLink::new(&link);
        st.event(
            userq_uapi::layout::EventKind::Migration,
            ctx,
            [pages.len() as u64, to as u64, va],
        );
        match to {
            MigrateTo::Host => crate::evict::take_out(&mut st, &pl, key, &pages),
            MigrateTo::Device => {
                let runs = crate::fault::bring_in(
                    &mut st,
                    &pl,
                    &self.pager.busy,
                    key,
                    &pages,
                    &[],
                    self.verbose,
                )
                .map_err(|_| KmdStatus::Busy)?;
                crate::fault::map_and_reply(&mut st, &pl, &runs, &[]);
                Ok(())
            }
        }
    }

    /// PAGING_STATS: the counters as of the last paging operation that ended (read
    /// without waiting for one that runs).
    pub fn paging_stats(&self) -> PagingStats {
        let link = self.link();
        // A device that has paged nothing yet has no snapshot: take the lock once.
        if self.pager.snapshot().budget_pages == 0 {
            drop(self.pager.lock(&link));
        }
        self.pager.snapshot()
    }
}

/// Drops an on-demand buffer the firmware no longer maps: its slots go back.
fn forget_buffer(st: &mut PagerState, ctx: u32, va: u64) {
    let Some(b) = st.buffers.remove(&(ctx, va)) else {
        return;
    };
    for slot in b.pages.iter().flatten() {
        if let Some(o) = st.owner.get_mut(*slot as usize) {
            *o = None;
        }
        if let Some(pool) = &st.pool {
            pool.release(*slot);
        }
        st.free.push(*slot);
        st.stats.resident_pages = st.stats.resident_pages.saturating_sub(1);
    }
}
