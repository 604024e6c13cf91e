//! DOC: the firmware's half of on-demand paging: fault batches out, kmd-shim's paging
//! requests in.
//!
//! - **Faults**: engines (or the command processor, running a dispatch itself) note the
//!   pages a workgroup missed ([`crate::engine::FaultNote`]).
//!   Each loop turn the command processor takes the notes, drops duplicates, sorts them
//!   by context and address (so the pages of one 2 MiB region travel together) and emits
//!   them as [`FwEvent::Fault`]s in batches of at most [`FAULT_BATCH_MAX`], the last one
//!   of each batch marked. A footprint larger than the whole pool stops its queue
//!   (`WorkingSetTooLarge`) instead: no service could ever make it fit.
//! - **MapOnDemand / MapPages**: a window per on-demand buffer; pool slots mapped into it.
//! - **Invalidate**: marks the pages, and acknowledges once their pins have drained
//!   (workgroups of paged jobs yield at their next checkpoint meanwhile). This is a wait
//!   for workgroups to leave *pages*, bounded by [`PREEMPT_TIMEOUT`], never for a job to
//!   complete: a workgroup that has not yielded by then gets its queue reset
//!   (`PreemptTimeout`), its pins are forgiven and the pages are taken anyway (the wedged
//!   workgroup sees scratch memory from then on).
//! - **FaultReply**: resumes the faulted job (on the command processor first while the
//!   engines are parked: `Engines::resume`), or stops its queue with the error kmd-shim
//!   found (a memory violation, with the address).
//! - **WaitJobs**: the counterfactual policy's wait for jobs to finish, bounded by the
//!   timeout kmd-shim gives; on timeout it names the jobs still using the buffer.
//! - **Unmapping an on-demand buffer** stops the queues whose dispatch still uses it
//!   (`BufferFreed`) and points its pages at scratch at once, so a pool slot can be
//!   reused as soon as the unmap is acknowledged.

use crate::job::Job;
use crate::window::{state, Pool, Window};
use crate::{Firmware, QueueId, PREEMPT_TIMEOUT};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};
use userq_uapi::error::ErrorCode;
use userq_uapi::fwmsg::{FwEvent, FwStatus};
use userq_uapi::paging::{Access, DEVICE_PAGE, FAULT_BATCH_MAX};

/// An invalidation whose ack waits for pins to drain.
#[derive(Debug)]
pub(crate) struct PendingInvalidate {
    seq: u32,
    ctx: u32,
    window: Arc<Window>,
    first: usize,
    count: usize,
    deadline: Instant,
}

/// A WaitJobs whose ack waits for jobs to finish.
#[derive(Debug)]
pub(crate) struct PendingWait {
    seq: u32,
    va: u64,
    jobs: Vec<(QueueId, Arc<Job>)>,
    deadline: Instant,
}

/// The firmware's paging state.
#[derive(Debug, Default)]
pub(crate) struct Paging {
    /// The pool kmd-shim sent at boot.
    pub(crate) pool: Option<Arc<Pool>>,
    invalidations: Vec<PendingInvalidate>,
    waits: Vec<PendingWait>,
    next_batch: u64,
    /// Jobs stopped on a fault whose reply has not come: (queue, job id, replies owed).
    /// kmd-shim replies once per job per batch, and a job's faults can go in several
    /// batches (a flush larger than a batch; another workgroup of the job faulting
    /// later). Their count is `DeviceHealth::faults_in_service`.
    awaiting: Vec<(QueueId, u64, u32)>,
    /// The count and the context mask last stored there.
    published: (u32, u64),
}

impl Paging {
    /// Paging over the pool kmd-shim sent.
    pub(crate) fn new(pool: Arc<Pool>) -> Self {
        Paging {
            pool: Some(pool),
            ..Default::default()
        }
    }

    /// Whether an ack waits on pins or jobs.
    pub(crate) fn pending(&self) -> bool {
        !self.invalidations.is_empty() || !self.waits.is_empty()
    }
}

impl Firmware {
    /// Batches the faults engines noted to kmd-shim. Returns whether there were any.
    pub(crate) fn flush_faults(&mut self) -> bool {
        let notes = self.engines.take_faults();
        if notes.is_empty() {
            return false;
        }
        // (ctx, address, slot, job, ahead, access)
        let mut faults: Vec<(u32, u64, u32, u64, bool, Access)> = Vec::new();
        for n in notes {
            if let Some((pages, first)) = n.too_large {
                self.stop_queue(n.queue, ErrorCode::WorkingSetTooLarge, first, pages as u32);
                continue;
            }
            let (q, job) = (n.queue, n.job);
            let own = n
                .pages
                .into_iter()
                .map(|(va, a)| (q.ctx, va, q.slot, job, false, a));
            let ahead = n
                .ahead
                .into_iter()
                .map(|(va, a)| (q.ctx, va, q.slot, job, true, a));
            faults.extend(own.chain(ahead));
        }
        // By context and address; a page two workgroups of one job missed goes once
        // (needed rather than ahead, written if either writes it).
        faults.sort_unstable_by_key(|f| (f.0, f.1, f.2, f.3, f.4, f.5 as u32 == 0));
        faults.dedup_by_key(|f| (f.0, f.1, f.2, f.3));
        // One reply owed per job per batch; published before the batches go, so that the
        // faulting context's spinners give way from the start.
        for batch in faults.chunks(FAULT_BATCH_MAX) {
            let mut jobs: Vec<(u32, u32, u64)> = batch.iter().map(|f| (f.0, f.2, f.3)).collect();
            jobs.sort_unstable();
            jobs.dedup();
            for (ctx, slot, job) in jobs {
                let q = QueueId { ctx, slot };
                match self
                    .paging
                    .awaiting
                    .iter_mut()
                    .find(|a| (a.0, a.1) == (q, job))
                {
                    Some(a) => a.2 += 1,
                    None => self.paging.awaiting.push((q, job, 1)),
                }
            }
        }
        self.publish_faults();
        for batch in faults.chunks(FAULT_BATCH_MAX) {
            let id = self.paging.next_batch;
            self.paging.next_batch += 1;
            for (i, &(ctx, address, slot, job, ahead, access)) in batch.iter().enumerate() {
                self.control.emit(FwEvent::Fault {
                    ctx,
                    slot,
                    address,
                    access,
                    job,
                    batch: id,
                    last: i + 1 == batch.len(),
                    ahead,
                });
            }
        }
        true
    }

    /// Stores the count of jobs waiting for a fault's reply, and their contexts' bits, in
    /// the device status, if they changed (`DeviceHealth::faults_in_service` and
    /// `faulting_contexts`: a context's spinning host threads give way while its bit is
    /// set, so that kmd-shim's threads get a CPU).
    pub(crate) fn publish_faults(&mut self) {
        let n = self.paging.awaiting.len() as u32;
        let mask = self
            .paging
            .awaiting
            .iter()
            .fold(0u64, |m, a| m | 1 << (a.0.ctx % 64));
        let (old_n, old_mask) = self.paging.published;
        if mask != old_mask {
            self.status.health.faulting_contexts.store(mask, Relaxed);
        }
        if n != old_n {
            self.status.health.faults_in_service.store(n, Relaxed);
        }
        self.paging.published = (n, mask);
    }

    /// Forgets the faulted jobs whose reply can no longer matter (their queue was reset or
    /// destroyed, or the job ended), so that the published count cannot stay up: after
    /// kmd-shim's requests (resets, destroys, unmaps), and at each tick for the rest (a job
    /// cancelled by its own exception).
    pub(crate) fn prune_faults(&mut self) {
        if self.paging.awaiting.is_empty() {
            return;
        }
        let contexts = &self.contexts;
        self.paging.awaiting.retain(|&(q, job, _)| {
            contexts
                .queue(q)
                .and_then(|q| q.running_job())
                .is_some_and(|j| j.id == job && j.unfinished() && !j.is_cancelled())
        });
        self.publish_faults();
    }

    /// MAP_ON_DEMAND.
    pub(crate) fn map_on_demand(&mut self, ctx: u32, va: u64, size: u64) -> FwStatus {
        let Some(pool) = self.paging.pool.clone() else {
            return FwStatus::NotFound;
        };
        let Some(c) = self.contexts.get_mut(ctx) else {
            return FwStatus::NotFound;
        };
        if va % DEVICE_PAGE != 0 || size == 0 {
            return FwStatus::Malformed;
        }
        let Ok(w) = Window::new(size, pool) else {
            return FwStatus::BadObject;
        };
        if c.vm.map_on_demand(va, size, Arc::new(w)) {
            FwStatus::Ok
        } else {
            FwStatus::Exists
        }
    }

    /// The window of `ctx` holding `va` (a page address), and the page's index in it.
    fn window_page(&mut self, ctx: u32, va: u64) -> Option<(Arc<Window>, usize)> {
        let c = self.contexts.get_mut(ctx)?;
        let (w, _, off) = c.vm.window(va)?;
        (off % DEVICE_PAGE == 0).then(|| (w.clone(), (off / DEVICE_PAGE) as usize))
    }

    /// MAP_PAGES.
    pub(crate) fn map_pages(&mut self, ctx: u32, va: u64, slot: u32, count: u32) -> FwStatus {
        match self.window_page(ctx, va) {
            Some((w, first)) if w.map(first, slot, count as usize) => FwStatus::Ok,
            Some(_) => FwStatus::Exists,
            None => FwStatus::NotFound,
        }
    }

    /// INVALIDATE: the ack's status now, or `None` if it waits for pins to drain.
    pub(crate) fn invalidate(
        &mut self,
        seq: u32,
        ctx: u32,
        va: u64,
        count: u32,
    ) -> Option<FwStatus> {
        let Some((w, first)) = self.window_page(ctx, va) else {
            return Some(FwStatus::NotFound);
        };
        let count = (count as usize).min(w.page_count().saturating_sub(first));
        for i in first..first + count {
            if let Some(e) = w.entry(i) {
                e.begin_invalidate();
            }
        }
        let p = PendingInvalidate {
            seq,
            ctx,
            window: w,
            first,
            count,
            deadline: Instant::now() + PREEMPT_TIMEOUT,
        };
        if drained(&p) {
            return Some(taken(&p));
        }
        self.engines.set_invalidating(true);
        self.paging.invalidations.push(p);
        None
    }

    /// Acknowledges invalidations whose pins have drained; at the deadline, resets the
    /// queues still pinning and takes the pages anyway. Also acknowledges finished
    /// WaitJobs. Returns whether it acknowledged anything.
    pub(crate) fn ack_paging(&mut self) -> bool {
        if !self.paging.pending() {
            return false;
        }
        let now = Instant::now();
        let mut any = false;
        for p in std::mem::take(&mut self.paging.invalidations) {
            if drained(&p) {
                self.engines.set_invalidating(false);
                self.control.ack(p.seq, taken(&p));
                any = true;
            } else if now >= p.deadline {
                for id in self.users_of(p.ctx, &p.window) {
                    self.stop_queue(id, ErrorCode::PreemptTimeout, 0, 0);
                }
                for i in p.first..p.first + p.count {
                    if let Some(e) = p.window.entry(i) {
                        e.forgive_pins();
                    }
                }
                self.engines.set_invalidating(false);
                let status = match taken(&p) {
                    FwStatus::Ok => FwStatus::PreemptTimeout,
                    failed => failed,
                };
                self.control.ack(p.seq, status);
                any = true;
            } else {
                self.paging.invalidations.push(p);
            }
        }
        for w in std::mem::take(&mut self.paging.waits) {
            if w.jobs
                .iter()
                .all(|(_, j)| !j.unfinished() || j.is_cancelled())
            {
                self.control.ack(w.seq, FwStatus::Ok);
                any = true;
            } else if now >= w.deadline {
                for (id, j) in w.jobs.iter().filter(|(_, j)| j.unfinished()) {
                    self.control.emit(FwEvent::Busy {
                        ctx: id.ctx,
                        slot: id.slot,
                        job: j.id,
                        packet_index: j.packet_index,
                        va: w.va,
                        faulted: j.is_faulted(),
                    });
                }
                self.control.ack(w.seq, FwStatus::Busy);
                any = true;
            } else {
                self.paging.waits.push(w);
            }
        }
        any
    }

    /// Queues of `ctx` whose running dispatch uses `window`.
    fn users_of(&self, ctx: u32, window: &Window) -> Vec<QueueId> {
        self.jobs_using(ctx, window)
            .into_iter()
            .map(|(id, _)| id)
            .collect()
    }

    fn jobs_using(&self, ctx: u32, window: &Window) -> Vec<(QueueId, Arc<Job>)> {
        let Some(c) = self.contexts.iter().find(|c| c.id == ctx) else {
            return Vec::new();
        };
        c.queue_ids()
            .filter_map(|id| {
                let j = self.contexts.queue(id)?.running_job()?;
                (j.unfinished() && !j.is_cancelled() && j.uses_window(window))
                    .then(|| (id, j.clone()))
            })
            .collect()
    }

    /// FAULT_REPLY.
    pub(crate) fn fault_reply(
        &mut self,
        id: QueueId,
        job: u64,
        code: u32,
        address: u64,
    ) -> FwStatus {
        if let Some(i) = self
            .paging
            .awaiting
            .iter()
            .position(|a| (a.0, a.1) == (id, job))
        {
            self.paging.awaiting[i].2 -= 1;
            if self.paging.awaiting[i].2 == 0 {
                self.paging.awaiting.swap_remove(i);
                self.publish_faults();
            }
        }
        let Some(q) = self.contexts.queue(id) else {
            return FwStatus::NotFound;
        };
        let Some(j) = q.running_job().filter(|j| j.id == job).cloned() else {
            return FwStatus::NotFound; // reset, destroyed or finished meanwhile
        };
        if code == 0 {
            self.engines.resume(&j);
            return FwStatus::Ok;
        }
        let code = ErrorCode::from_u32(code).unwrap_or(ErrorCode::MemoryViolation);
        self.stop_queue(id, code, address, 0);
        FwStatus::Ok
    }

    /// WAIT_JOBS: the ack now, or `None` if it waits for jobs.
    pub(crate) fn wait_jobs(
        &mut self,
        seq: u32,
        ctx: u32,
        va: u64,
        timeout_ms: u32,
    ) -> Option<FwStatus> {
        let Some((w, _)) = self.window_page(ctx, va - va % DEVICE_PAGE) else {
            return Some(FwStatus::NotFound);
        };
        let jobs = self.jobs_using(ctx, &w);
        if jobs.is_empty() {
            return Some(FwStatus::Ok);
        }
        self.paging.waits.push(PendingWait {
            seq,
            va,
            jobs,
            deadline: Instant::now() + Duration::from_millis(timeout_ms as u64),
        });
        None
    }

    /// Unmaps the buffer at `va`: an on-demand one's users are stopped (`BufferFreed`)
    /// and its pages pointed at scratch before the ack.
    pub(crate) fn unmap_buffer(&mut self, ctx: u32, va: u64) -> FwStatus {
        let Some(c) = self.contexts.get_mut(ctx) else {
            return FwStatus::NotFound;
        };
        match c.vm.unmap(va) {
            None => FwStatus::NotFound,
            Some(None) => FwStatus::Ok,
            Some(Some(w)) => {
                for id in self.users_of(ctx, &w) {
                    self.stop_queue(id, ErrorCode::BufferFreed, va, 0);
                }
                // Not confirmed if the window still maps its slots: kmd-shim then keeps
                // them out of circulation.
                if w.unmap(0, w.page_count(), state::FREED) {
                    FwStatus::Ok
                } else {
                    FwStatus::BadObject
                }
            }
        }
    }
}

/// Points an invalidation's pages at scratch: `Ok`, or `BadObject` if the kernel refused
/// (the slots are still mapped; kmd-shim must keep them).
fn taken(p: &PendingInvalidate) -> FwStatus {
    if p.window.unmap(p.first, p.count, state::ABSENT) {
        FwStatus::Ok
    } else {
        FwStatus::BadObject
    }
}

/// Whether no workgroup pins any page of the invalidation.
fn drained(p: &PendingInvalidate) -> bool {
    (p.first..p.first + p.count).all(|i| p.window.entry(i).is_none_or(|e| e.unpinned()))
}
