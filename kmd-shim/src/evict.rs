//! DOC: eviction: making room in the pool, least recently used first, across every
//! context.
//!
//! The firmware stamps a slot's use-table entry each time a workgroup pins it;
//! [`make_room`] takes the slots with the oldest stamps, groups them by buffer into runs of
//! consecutive pages, and [`take_out`] evicts each run with the invalidate → acknowledge
//! handshake: the firmware acknowledges once no running workgroup pins the pages (they
//! yield at their next checkpoint and refault when they run again). Only then are the
//! slots copied back to the buffer's host copy and given back to the OS. A suspended,
//! parked or faulted queue's pages go like any other.
//!
//! Before each buffer's pages are invalidated, the policy's [`EvictGate`] is asked. Path 3's
//! gate, [`NoWait`], lets it through at once; the counterfactual policy's gate, in
//! [`crate::evict_wait_jobs`], waits for the buffer's jobs, and is the only code in
//! kmd-shim that can.

use crate::pager::{EvictionPolicy, PageLink, PagerState};
use crate::pool::copy_words;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;
use userq_uapi::fwmsg::FwEvent;
use userq_uapi::layout::EventKind;
use userq_uapi::paging::DEVICE_PAGE;
use userq_uapi::sync;
use userq_uapi::KmdStatus;

/// The counterfactual policy's eviction waited for jobs that did not finish.
#[derive(Debug)]
pub(crate) struct Deadlock {
    /// The buffer (context, address) whose pages eviction wanted.
    pub(crate) victim: (u32, u64),
    /// The jobs that still used it ([`FwEvent::Busy`]).
    pub(crate) busy: Vec<FwEvent>,
}

impl Deadlock {
    /// The cycle, for the log: which queue waits on which fault, which eviction waits on
    /// which job. `faulting` are the batch's faulting jobs with their first address.
    pub(crate) fn describe<T>(&self, faulting: &BTreeMap<(u32, u32, u64), (u64, T)>) -> String {
        use std::fmt::Write;
        let mut s = String::from(
            "kmd-shim: DEADLOCK caught by the WaitForIdleJobs eviction watchdog (the dma-fence way):\n",
        );
        for ((ctx, slot, job), (address, _)) in faulting {
            let _ = writeln!(
                s,
                "  queue {ctx}:{slot} (job {job}) waits on its fault at {address:#x}, whose service needs a free page"
            );
        }
        let (vctx, vva) = self.victim;
        for b in &self.busy {
            if let FwEvent::Busy {
                ctx,
                slot,
                job,
                packet_index,
                faulted,
                ..
            } = *b
            {
                let cycle = if faulting.contains_key(&(ctx, slot, job)) {
                    "which waits on the fault above: a cycle"
                } else if faulted {
                    "which waits on a fault of its own, reported after this batch: a cycle"
                } else {
                    "which has not finished"
                };
                let _ = writeln!(
                    s,
                    "  eviction of buffer {vctx}:{vva:#x} waits for job {job} (queue {ctx}:{slot}, packet {packet_index}), {cycle}"
                );
            }
        }
        s.push_str("  the faulting queues are stopped with EvictionDeadlock; the default policy (InvalidateAndRefault) never waits for a job");
        s
    }
}

/// What a policy does before a buffer's pages are invalidated.
pub(crate) trait EvictGate {
    /// Ok to go on, or the deadlock that stops the eviction.
    fn before_invalidate(&mut self, ctx: u32, va: u64) -> Result<(), Deadlock>;
}

/// Path 3: nothing to wait for.
pub(crate) struct NoWait;

impl EvictGate for NoWait {
    fn before_invalidate(&mut self, _: u32, _: u64) -> Result<(), Deadlock> {
        Ok(())
    }
}

/// Frees at least `n` slots (as many as are resident, `protect` excepted), least recently
/// used first.
pub(crate) fn make_room(
    st: &mut PagerState,
    link: &PageLink<'_>,
    busy: &Mutex<Vec<FwEvent>>,
    n: usize,
    protect: &[u32],
    verbose: bool,
) -> Result<(), Deadlock> {
    let _section = sync::begin_signalling("eviction");
    let Some(pool) = st.pool.clone() else {
        return Ok(());
    };
    let mut candidates: Vec<(u64, u32)> = st
        .owner
        .iter()
        .enumerate()
        .filter(|(slot, o)| o.is_some() && !protect.contains(&(*slot as u32)))
        .map(|(slot, _)| (pool.last_use(slot as u32), slot as u32))
        .collect();
    candidates.sort_unstable();
    let mut victims: BTreeMap<(u32, u64), Vec<usize>> = BTreeMap::new();
    for &(_, slot) in candidates.iter().take(n) {
        if let Some((ctx, va, page)) = st.owner[slot as usize] {
            victims.entry((ctx, va)).or_default().push(page);
        }
    }
    if verbose {
        eprintln!(
            "kmd-shim: evicting {n} page(s) from {} buffer(s)",
            victims.len()
        );
    }
    match st.policy {
        EvictionPolicy::InvalidateAndRefault => evict(st, link, &mut NoWait, victims),
        EvictionPolicy::WaitForIdleJobs { watchdog } => {
            let mut gate = crate::evict_wait_jobs::WaitForJobs::new(link, busy, watchdog);
            evict(st, link, &mut gate, victims)
        }
    }
}

fn evict(
    st: &mut PagerState,
    link: &PageLink<'_>,
    gate: &mut dyn EvictGate,
    victims: BTreeMap<(u32, u64), Vec<usize>>,
) -> Result<(), Deadlock> {
    let mut all = Vec::new();
    for (key, mut pages) in victims {
        gate.before_invalidate(key.0, key.1)?;
        pages.sort_unstable();
        all.push((key, pages));
    }
    let _ = take_out_many(st, link, &all);
    Ok(())
}

/// Evicts the resident ones of `pages` of buffer `key` (see [`take_out_many`]).
pub(crate) fn take_out(
    st: &mut PagerState,
    link: &PageLink<'_>,
    key: (u32, u64),
    pages: &[usize],
) -> Result<(), KmdStatus> {
    if !st.buffers.contains_key(&key) {
        return Err(KmdStatus::NotFound);
    }
    take_out_many(st, link, &[(key, pages.to_vec())])
}

/// A buffer and a run of its consecutive resident pages, as (page, slot).
type ResidentRun = ((u32, u64), Vec<(usize, u32)>);

/// Evicts the resident ones of each buffer's `pages` (sorted): one invalidation per run
/// of consecutive pages, all posted back to back and acknowledged together (each ack
/// once the run's pins have drained), then each slot copied to its host copy and freed.
pub(crate) fn take_out_many(
    st: &mut PagerState,
    link: &PageLink<'_>,
    victims: &[((u32, u64), Vec<usize>)],
) -> Result<(), KmdStatus> {
    let _section = sync::begin_signalling("eviction");
    let Some(pool) = st.pool.clone() else {
        return Ok(());
    };
    let mut runs: Vec<ResidentRun> = Vec::new();
    for (key, pages) in victims {
        let Some(b) = st.buffers.get(key) else {
            continue;
        };
        for (page, slot) in pages
            .iter()
            .filter_map(|&p| b.pages.get(p).copied().flatten().map(|s| (p, s)))
        {
            match runs.last_mut() {
                Some((k, run)) if k == key && run.last().is_some_and(|l| l.0 + 1 == page) => {
                    run.push((page, slot))
                }
                _ => runs.push((*key, vec![(page, slot)])),
            }
        }
    }
    let reqs: Vec<(u32, u64, u32)> = runs
        .iter()
        .map(|(key, run)| {
            (
                key.0,
                key.1 + run[0].0 as u64 * DEVICE_PAGE,
                run.len() as u32,
            )
        })
        .collect();
    let results = link.invalidate_many(&reqs);
    for &(ctx, va, n) in &reqs {
        st.event(EventKind::Invalidation, ctx, [n as u64, 0, va]);
    }
    let mut failed = None;
    for ((key, run), r) in runs.iter().zip(results) {
        match r {
            Ok(()) => {
                let t = Instant::now();
                if let Some(b) = st.buffers.get(key) {
                    for &(page, slot) in run {
                        copy_words(b.host_words(page), pool.slot_words(slot));
                    }
                }
                st.stats.migrate_ns += t.elapsed().as_nanos() as u64;
                for &(page, slot) in run {
                    st.release_slot(slot, false);
                    if let Some(b) = st.buffers.get_mut(key) {
                        b.evicted[page] = true;
                    }
                }
                st.stats.pages_out += run.len() as u64;
                let va = key.1 + run[0].0 as u64 * DEVICE_PAGE;
                st.event(EventKind::Eviction, key.0, [run.len() as u64, 0, va]);
            }
            // The firmware no longer maps it (freed meanwhile): nothing to copy.
            Err(KmdStatus::NotFound) => {
                for &(_, slot) in run {
                    st.release_slot(slot, false);
                }
            }
            // The pages stay resident and accounted (the device is lost, or hung).
            Err(e) => failed = Some(e),
        }
    }
    failed.map_or(Ok(()), Err)
}
