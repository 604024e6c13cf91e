//! DOC: on-demand memory: the pager's state, its lock and its thread (the ioctls that
//! reach it are in `ondemand.rs`).
//!
//! kmd-shim's event thread collects [`FwEvent::Fault`]s into batches and hands each
//! finished batch to the *pager thread* (like xe's page-fault work queue behind the GuC
//! G2H handler): the event thread delivers acks, so it must never wait for one, and
//! servicing a fault waits for several. The pager thread services a batch under the
//! pager lock (`fault.rs`), evicting where it needs room (`evict.rs`).
//!
//! The pager lock protects the paging state (pool slots, residency of every on-demand
//! page, statistics) and nothing else; it is held across the paging requests to the
//! firmware, whose acks are bounded (map and reply at once, invalidate once pins drain or
//! after the preemption bound). No code under it waits on a fence or a job: the paging
//! modules only get a `PageLink`, whose requests are exactly those, and they run in a
//! [`userq_uapi::sync::SignallingSection`] that turns any wait on shared memory into a
//! panic in debug builds.
//!
//! **Coherence rule** (what host access sees): an on-demand buffer's memfd is its host
//! copy. Device pages are copied in when a kernel faults (or on MIGRATE to device) and
//! copied back when evicted (or on MIGRATE to host). The runtime migrates the range it
//! reads or writes to host first, so the host never sees stale data; since the firmware
//! maps a page only from a copy made after that, the device never computes on stale data
//! as long as the host does not write a range while a kernel using it runs (as with
//! `cudaMallocManaged` without concurrent managed access).

use crate::device::Device;
use crate::firmware::FirmwareLink;
use crate::pool::DevicePool;
use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;
use userq_uapi::fwmsg::{FwEvent, FwRequest};
use userq_uapi::paging::{PagingStats, DEVICE_PAGE};
use userq_uapi::shm::ShmBytes;
use userq_uapi::KmdStatus;

/// How eviction treats pages that jobs use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EvictionPolicy {
    /// Path 3, the default: invalidate the pages (the firmware acknowledges once no
    /// running workgroup pins them; workgroups yield at their next checkpoint and refault
    /// later), copy them out, reuse the slots. Never waits for a job.
    #[default]
    InvalidateAndRefault,
    /// The counterfactual, off by default: before evicting a buffer's pages, wait until
    /// no job of its context uses the buffer, as eviction behind a dma-fence would. With
    /// page faults and long-running jobs this deadlocks; the wait is bounded by `watchdog`,
    /// which then prints the cycle and stops the faulting queues (`EvictionDeadlock`).
    WaitForIdleJobs {
        /// How long to wait for the jobs before declaring the deadlock.
        watchdog: Duration,
    },
}

/// An on-demand buffer as the pager sees it.
pub(crate) struct OdBuffer {
    /// Bytes as asked.
    pub(crate) size: u64,
    /// The host copy (the buffer's memfd, whole 4 KiB pages).
    pub(crate) host: ShmBytes,
    /// The pool slot of each device page, if resident.
    pub(crate) pages: Vec<Option<u32>>,
    /// Pages that were evicted at least once (a fault on one is a refault).
    pub(crate) evicted: Vec<bool>,
}

impl OdBuffer {
    /// The host words of device page `page` (the last page may be shorter).
    pub(crate) fn host_words(&self, page: usize) -> &[std::sync::atomic::AtomicU64] {
        let off = page * DEVICE_PAGE as usize;
        let len = (self.host.len().saturating_sub(off)).min(DEVICE_PAGE as usize);
        self.host.atomics(off, len / 8).unwrap_or(&[])
    }
}

/// Everything the pager lock protects.
pub(crate) struct PagerState {
    /// The generation whose pool this is.
    pub(crate) generation: u64,
    pub(crate) pool: Option<Arc<DevicePool>>,
    /// Free slots, highest first (so pops hand out ascending, mostly consecutive slots).
    pub(crate) free: Vec<u32>,
    /// Free slots whose memory is still allocated (released by eviction or migration):
    /// handed out first, given back to the OS when the pager has been idle a while.
    pub(crate) free_warm: Vec<u32>,
    /// Who holds each slot: (context, buffer address, page).
    pub(crate) owner: Vec<Option<(u32, u64, usize)>>,
    /// On-demand buffers by (context, address).
    pub(crate) buffers: BTreeMap<(u32, u64), OdBuffer>,
    pub(crate) stats: PagingStats,
    pub(crate) policy: EvictionPolicy,
    /// The device's event log: fault batches, evictions, migrations.
    pub(crate) events: Arc<crate::telemetry::EventLogWriter>,
}

impl PagerState {
    /// Records a paging event about buffer `key`'s context.
    pub(crate) fn event(&self, kind: userq_uapi::layout::EventKind, ctx: u32, abc: [u64; 3]) {
        self.events.record(userq_uapi::layout::NewEvent {
            kind,
            ctx,
            slot: u32::MAX,
            pid: 0,
            a: abc[0],
            b: abc[1],
            c: abc[2],
        });
    }
}

impl PagerState {
    /// Starts over on `link`'s pool if its generation is newer (a restart loses every
    /// context, and with them every on-demand buffer). Returns false for an older link:
    /// the state must never go back.
    pub(crate) fn follow(&mut self, link: &FirmwareLink) -> bool {
        if self.pool.is_some() && link.generation() <= self.generation {
            return link.generation() == self.generation;
        }
        let pool = link.pool().clone();
        let slots = pool.slots();
        self.generation = link.generation();
        self.free = (0..slots).rev().collect();
        self.free_warm.clear();
        self.owner = vec![None; slots as usize];
        self.buffers.clear();
        self.stats.budget_pages = slots as u64;
        self.stats.resident_pages = 0;
        self.pool = Some(pool);
        true
    }

    /// The on-demand buffer of `ctx` holding `addr`: its key and the page.
    pub(crate) fn find(&self, ctx: u32, addr: u64) -> Option<((u32, u64), usize)> {
        let (&key, b) = self.buffers.range(..=(ctx, addr)).next_back()?;
        (key.0 == ctx && addr < key.1 + b.size)
            .then(|| (key, ((addr - key.1) / DEVICE_PAGE) as usize))
    }

    /// Gives a slot back to the free list, its page non-resident. `to_os`: its memory
    /// goes back to the OS too (a freed buffer); otherwise (eviction, migration) the slot
    /// stays allocated for the next page, which saves the OS allocating and zeroing it
    /// again (about 4 µs per 4 KiB on this machine).
    pub(crate) fn release_slot(&mut self, slot: u32, to_os: bool) {
        if let Some((ctx, va, page)) = self.owner.get_mut(slot as usize).and_then(Option::take) {
            if let Some(b) = self.buffers.get_mut(&(ctx, va)) {
                b.pages[page] = None;
            }
        }
        match &self.pool {
            Some(pool) if to_os => {
                pool.release(slot);
                self.free.push(slot);
            }
            Some(pool) => {
                pool.stamp(slot, 0);
                self.free_warm.push(slot);
            }
            None => self.free.push(slot),
        }
        self.stats.resident_pages = self.stats.resident_pages.saturating_sub(1);
    }

    /// Free slots, warm and cold.
    pub(crate) fn free_slots(&self) -> usize {
        self.free.len() + self.free_warm.len()
    }

    /// Gives the memory of the warm free slots back to the OS (the pager was idle).
    pub(crate) fn trim(&mut self) {
        if let Some(pool) = &self.pool {
            for slot in self.free_warm.drain(..) {
                pool.release(slot);
                self.free.push(slot);
            }
        }
    }

    /// Takes a free slot for page `page` of buffer `key`.
    pub(crate) fn take_slot(&mut self, key: (u32, u64), page: usize) -> Option<u32> {
        let slot = self.free_warm.pop().or_else(|| self.free.pop())?;
        self.owner[slot as usize] = Some((key.0, key.1, page));
        if let Some(b) = self.buffers.get_mut(&key) {
            b.pages[page] = Some(slot);
        }
        self.stats.resident_pages += 1;
        self.stats.peak_resident_pages = self
            .stats
            .peak_resident_pages
            .max(self.stats.resident_pages);
        Some(slot)
    }
}

/// The only firmware requests paging code can make. None of them waits for a job or a
/// fence: map, reply and unmap are acknowledged at once, an invalidation once the pins
/// drain or after the preemption bound.
pub(crate) struct PageLink<'a>(&'a FirmwareLink);

impl<'a> PageLink<'a> {
    pub(crate) fn new(link: &'a FirmwareLink) -> Self {
        PageLink(link)
    }

    /// Maps runs of pages (buffer, first page, first slot, count), then sends the replies
    /// to faulting jobs (resume, or the error to stop the queue with), all back to back
    /// and acknowledged together. Returns the maps' results.
    pub(crate) fn map_and_reply(
        &self,
        maps: &[crate::fault::MapRun],
        replies: &[crate::fault::Reply],
    ) -> Vec<Result<(), KmdStatus>> {
        let mut reqs: Vec<FwRequest> = maps
            .iter()
            .map(|&((ctx, base), page, slot, count)| FwRequest::MapPages {
                ctx,
                va: base + page as u64 * DEVICE_PAGE,
                slot,
                count,
            })
            .collect();
        reqs.extend(replies.iter().map(|&(ctx, slot, job, err)| {
            let (code, address) = err.map_or((0, 0), |(c, a)| (c as u32, a));
            FwRequest::FaultReply {
                ctx,
                slot,
                job,
                code,
                address,
            }
        }));
        let mut r = self.0.call_many(&reqs);
        r.truncate(maps.len());
        r
    }

    /// Takes runs of pages (context, address, count) away from the device, all posted
    /// back to back. `Ok` also when the firmware had to reset a queue to get a run (the
    /// pages are taken either way).
    pub(crate) fn invalidate_many(&self, runs: &[(u32, u64, u32)]) -> Vec<Result<(), KmdStatus>> {
        let reqs: Vec<FwRequest> = runs
            .iter()
            .map(|&(ctx, va, count)| FwRequest::Invalidate { ctx, va, count })
            .collect();
        self.0
            .call_many(&reqs)
            .into_iter()
            .map(|r| match r {
                // Taken from a workgroup that did not yield (its queue was reset): done.
                // Any other error (no ack in time, never posted, device lost) leaves the
                // pages where they are: the caller keeps them out of circulation.
                Err(KmdStatus::Preempted) => Ok(()),
                r => r,
            })
            .collect()
    }

    /// The link, for the counterfactual policy's wait only ([`crate::evict_wait_jobs`]).
    pub(crate) fn firmware(&self) -> &FirmwareLink {
        self.0
    }
}

/// The pager: its state, and the batches waiting for its thread.
pub struct Pager {
    state: Mutex<PagerState>,
    /// Faults of the batch the event thread is collecting.
    collecting: Mutex<Vec<FwEvent>>,
    /// Complete batches for the pager thread.
    batches: Mutex<Vec<Vec<FwEvent>>>,
    ready: Condvar,
    /// Jobs a timed-out WaitJobs named (filled by the event thread).
    pub(crate) busy: Mutex<Vec<FwEvent>>,
    /// The statistics, published by every paging operation as it ends: PAGING_STATS
    /// reads them without waiting behind a fault service.
    snapshot: Mutex<PagingStats>,
}

/// The pager lock's guard: publishes the statistics (and the telemetry's paging line)
/// when it drops.
pub(crate) struct PagerGuard<'a> {
    state: MutexGuard<'a, PagerState>,
    snapshot: &'a Mutex<PagingStats>,
    telemetry: &'a userq_uapi::layout::Telemetry,
}

impl std::ops::Deref for PagerGuard<'_> {
    type Target = PagerState;
    fn deref(&self) -> &PagerState {
        &self.state
    }
}

impl std::ops::DerefMut for PagerGuard<'_> {
    fn deref_mut(&mut self) -> &mut PagerState {
        &mut self.state
    }
}

impl Drop for PagerGuard<'_> {
    fn drop(&mut self) {
        *self.snapshot.lock().unwrap_or_else(|e| e.into_inner()) = self.state.stats;
        crate::telemetry::publish_paging(self.telemetry, &self.state.stats);
    }
}

impl std::fmt::Debug for Pager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pager").finish_non_exhaustive()
    }
}

impl Pager {
    /// A pager with `policy`, recording into `events`.
    pub fn new(policy: EvictionPolicy, events: Arc<crate::telemetry::EventLogWriter>) -> Self {
        Pager {
            state: Mutex::new(PagerState {
                generation: 0,
                pool: None,
                free: Vec::new(),
                free_warm: Vec::new(),
                owner: Vec::new(),
                buffers: BTreeMap::new(),
                stats: PagingStats::default(),
                policy,
                events,
            }),
            collecting: Mutex::new(Vec::new()),
            batches: Mutex::new(Vec::new()),
            ready: Condvar::new(),
            busy: Mutex::new(Vec::new()),
            snapshot: Mutex::new(PagingStats::default()),
        }
    }

    /// Locks the paging state, following `link`'s generation if it is newer. A caller
    /// whose link is older than the state (it fetched it before a restart) gets
    /// `DeviceLost`: its objects are gone, and it must not roll the state back. The
    /// statistics are published when the guard drops.
    pub(crate) fn lock<'a>(&'a self, link: &'a FirmwareLink) -> Result<PagerGuard<'a>, KmdStatus> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if !s.follow(link) {
            return Err(KmdStatus::DeviceLost);
        }
        Ok(PagerGuard {
            state: s,
            snapshot: &self.snapshot,
            telemetry: link.telemetry(),
        })
    }

    /// The statistics as of the last guard dropped.
    pub(crate) fn snapshot(&self) -> PagingStats {
        *self.snapshot.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Event thread: one fault; the batch goes to the pager thread with its last one.
    pub(crate) fn on_fault(&self, ev: FwEvent) {
        let FwEvent::Fault { last, .. } = ev else {
            return;
        };
        let mut c = self.collecting.lock().unwrap_or_else(|e| e.into_inner());
        c.push(ev);
        if last {
            let batch = std::mem::take(&mut *c);
            drop(c);
            self.batches
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(batch);
            self.ready.notify_one();
        }
    }

    /// Pager thread: the next batches, or none after `timeout`. Sleeps at once when there
    /// are none, without a spin or yield phase (see [`FirmwareLink::run_events`] why).
    /// Returns at once, with what it has, once `stop` is set and [`Pager::wake`] called.
    ///
    /// [`FirmwareLink::run_events`]: crate::firmware::FirmwareLink::run_events
    pub(crate) fn next_batches(
        &self,
        timeout: Duration,
        stop: &std::sync::atomic::AtomicBool,
    ) -> Vec<Vec<FwEvent>> {
        let stopping = || stop.load(std::sync::atomic::Ordering::Acquire);
        let b = self.batches.lock().unwrap_or_else(|e| e.into_inner());
        let (mut b, _) = self
            .ready
            .wait_timeout_while(b, timeout, |b| b.is_empty() && !stopping())
            .unwrap_or_else(|e| e.into_inner());
        std::mem::take(&mut *b)
    }

    /// Wakes the pager thread (to notice a stop).
    pub(crate) fn wake(&self) {
        let _b = self.batches.lock().unwrap_or_else(|e| e.into_inner());
        self.ready.notify_all();
    }
}

impl Device {
    /// The pager thread's body: services batches until `stop`.
    pub(crate) fn run_pager(&self, stop: &std::sync::atomic::AtomicBool) {
        while !stop.load(std::sync::atomic::Ordering::Acquire) {
            let batches = self.pager.next_batches(Duration::from_millis(100), stop);
            let link = self.link();
            if batches.is_empty() {
                // Idle for a while: the memory of free slots goes back to the OS.
                if let Ok(mut st) = self.pager.lock(&link) {
                    st.trim();
                }
                continue;
            }
            if link.is_lost() {
                continue; // its contexts are lost; their queues are poisoned already
            }
            let Ok(mut st) = self.pager.lock(&link) else {
                continue;
            };
            for batch in batches {
                crate::fault::service(
                    &mut st,
                    &PageLink::new(&link),
                    &self.pager.busy,
                    &batch,
                    self.verbose,
                );
            }
        }
    }
}
