//! DOC: fault service: one batch of faults, on the pager thread, under the pager lock.
//!
//! For each fault: find the on-demand buffer that covers the address (none: a memory
//! violation for that queue, reported with the address; the other queues go on). Pages
//! not resident are brought in per buffer: room is made first ([`crate::evict`]), then
//! each page's host copy is copied into a free pool slot and the firmware maps runs of
//! consecutive pages in consecutive slots with one request. Then every faulting job gets
//! its reply: resume, or the error. Nothing here waits on a fence or a job; the section
//! is annotated so that a wait on shared memory panics in debug builds.

use crate::evict::{self, Deadlock};
use crate::pager::{PageLink, PagerState};
use crate::pool::copy_words;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;
use userq_uapi::error::ErrorCode;
use userq_uapi::fwmsg::FwEvent;
use userq_uapi::layout::EventKind;
use userq_uapi::sync;

/// A faulting job: (context, queue slot, job id).
type FaultingJob = (u32, u32, u64);

/// Services one batch of faults.
pub(crate) fn service(
    st: &mut PagerState,
    link: &PageLink<'_>,
    busy: &Mutex<Vec<FwEvent>>,
    batch: &[FwEvent],
    verbose: bool,
) {
    let _section = sync::begin_signalling("fault service");
    let t0 = Instant::now();
    st.stats.batches += 1;
    let (first_ctx, batch_no) = match batch.first() {
        Some(&FwEvent::Fault { ctx, batch, .. }) => (ctx, batch),
        _ => (0, 0),
    };
    let (pages_in0, pages_out0) = (st.stats.pages_in, st.stats.pages_out);
    st.event(
        EventKind::FaultBatchStart,
        first_ctx,
        [batch.len() as u64, batch_no, 0],
    );
    // Per faulting job: its first faulting address, and the error to stop it with.
    let mut replies: BTreeMap<FaultingJob, (u64, Option<(ErrorCode, u64)>)> = BTreeMap::new();
    // Pages the faulting workgroups need, then the fault-ahead ones (index 1).
    let mut need: [BTreeMap<(u32, u64), Vec<usize>>; 2] = Default::default();
    for ev in batch {
        let &FwEvent::Fault {
            ctx,
            slot,
            address,
            job,
            ahead,
            ..
        } = ev
        else {
            continue;
        };
        let entry = replies.entry((ctx, slot, job)).or_insert((address, None));
        if !ahead {
            st.stats.faults += 1;
        }
        match st.find(ctx, address) {
            // A page a workgroup needs outside every mapping stops its queue; a
            // fault-ahead guess there is just dropped.
            None if !ahead => {
                st.stats.violations += 1;
                entry.1.get_or_insert((ErrorCode::MemoryViolation, address));
            }
            None => {}
            Some((key, page)) => {
                let b = &st.buffers[&key];
                if b.pages[page].is_none() {
                    if b.evicted[page] {
                        st.stats.refaults += 1;
                    }
                    need[ahead as usize].entry(key).or_default().push(page);
                }
            }
        }
    }
    // Needed pages first: with a pool nearly full, fault-ahead pages must not take the
    // room the faulting workgroups need (and pages filled in this service are never
    // evicted by it: see `bring_in`).
    let mut deadlock = None;
    let mut maps = Vec::new();
    'all: for need in need {
        for (key, mut pages) in need {
            pages.sort_unstable();
            pages.dedup();
            match bring_in(st, link, busy, key, &pages, &maps, verbose) {
                Ok(runs) => maps.extend(runs),
                Err(d) => {
                    deadlock = Some(d);
                    break 'all;
                }
            }
        }
    }
    if let Some(d) = deadlock {
        st.stats.deadlocks += 1;
        eprintln!("{}", d.describe(&replies));
        for (address, err) in replies.values_mut() {
            err.get_or_insert((ErrorCode::EvictionDeadlock, *address));
        }
    }
    // The maps and then the replies, back to back: the firmware applies them in order,
    // so a job resumes only after its pages are mapped. One round trip for all.
    let replies: Vec<_> = replies
        .into_iter()
        .map(|((ctx, slot, job), (_, err))| (ctx, slot, job, err))
        .collect();
    map_and_reply(st, link, &maps, &replies);
    let took = t0.elapsed().as_nanos() as u64;
    st.stats.service_ns += took;
    st.event(
        EventKind::FaultBatchEnd,
        first_ctx,
        [
            st.stats.pages_in - pages_in0,
            took,
            st.stats.pages_out - pages_out0,
        ],
    );
}

/// The answer to one faulting job: (context, queue slot, job, error to stop it with).
pub(crate) type Reply = (u32, u32, u64, Option<(ErrorCode, u64)>);

/// A run of pages copied into consecutive slots, for the firmware to map:
/// (buffer, first page, first slot, pages).
pub(crate) type MapRun = ((u32, u64), usize, u32, u32);

/// Sends the maps and the replies; slots of a map the firmware refused (the buffer was
/// freed meanwhile) go back.
pub(crate) fn map_and_reply(
    st: &mut PagerState,
    link: &PageLink<'_>,
    maps: &[MapRun],
    replies: &[Reply],
) {
    // Every slot about to be mapped is still its page's: nothing evicted it meanwhile.
    for &(key, page, slot, n) in maps {
        for i in 0..n {
            debug_assert_eq!(
                st.owner[(slot + i) as usize],
                Some((key.0, key.1, page + i as usize)),
                "slot {} taken from under a pending map",
                slot + i
            );
        }
    }
    let results = link.map_and_reply(maps, replies);
    for (r, &(_, _, slot, n)) in results.iter().zip(maps) {
        if r.is_err() {
            for s in slot..slot + n {
                st.release_slot(s, true);
            }
        }
    }
}

/// Makes `pages` of buffer `key` resident (as many as the pool holds): room first, then
/// copy in. Returns the runs for the firmware to map ([`map_and_reply`]). `pending` are
/// runs filled earlier in the same service and not mapped yet: eviction must not take
/// their slots (the firmware would map two pages to one slot). Fails only when the
/// counterfactual policy's eviction deadlocks.
pub(crate) fn bring_in(
    st: &mut PagerState,
    link: &PageLink<'_>,
    busy: &Mutex<Vec<FwEvent>>,
    key: (u32, u64),
    pages: &[usize],
    pending: &[MapRun],
    verbose: bool,
) -> Result<Vec<MapRun>, Deadlock> {
    let mut runs = Vec::new();
    let Some(pool) = st.pool.clone() else {
        return Ok(runs);
    };
    let Some(b) = st.buffers.get(&key) else {
        return Ok(runs);
    };
    let missing: Vec<usize> = pages
        .iter()
        .copied()
        .filter(|&p| b.pages.get(p).is_some_and(Option::is_none))
        .take(pool.slots() as usize)
        .collect();
    let short = missing.len().saturating_sub(st.free_slots());
    if short > 0 {
        let protect: Vec<u32> = pending
            .iter()
            .flat_map(|&(_, _, slot, n)| slot..slot + n)
            .collect();
        evict::make_room(st, link, busy, short, &protect, verbose)?;
    }
    // Filled slots count as just used: otherwise the next eviction would take them
    // before the faulting workgroup has run (their stamps were cleared on release).
    let now = pool.newest();
    let mut run: Option<(usize, u32, u32)> = None; // first page, first slot, count
    let mut brought = 0u64;
    let mut copy_ns = 0u64;
    for page in missing {
        if !st.buffers.contains_key(&key) {
            break;
        }
        let Some(slot) = st.take_slot(key, page) else {
            break;
        };
        pool.stamp(slot, now);
        let t = Instant::now();
        copy_words(pool.slot_words(slot), st.buffers[&key].host_words(page));
        copy_ns += t.elapsed().as_nanos() as u64;
        brought += 1;
        run = match run {
            Some((p, s, n)) if p + n as usize == page && s + n == slot => Some((p, s, n + 1)),
            Some((p, s, n)) => {
                runs.push((key, p, s, n));
                Some((page, slot, 1))
            }
            None => Some((page, slot, 1)),
        };
    }
    if let Some((p, s, n)) = run {
        runs.push((key, p, s, n));
    }
    st.stats.pages_in += brought;
    st.stats.migrate_ns += copy_ns;
    Ok(runs)
}
