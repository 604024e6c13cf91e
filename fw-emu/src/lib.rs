//! # fw-emu: the userq firmware emulator
//!
//! DOC: the firmware is one polling loop (the "command processor") that
//!
//! 1. drains kmd-shim's requests from the [`ControlRegion`] (map/unmap contexts, queues,
//!    fences and buffers) and acknowledges each one;
//! 2. swaps every context's pending-doorbell words to zero and puts the rung queues on
//!    the run list;
//! 3. re-checks the queues parked on WAIT_FENCE;
//! 4. services the run list round-robin, a bounded number of packets per queue per turn;
//! 5. backs off when there is nothing to do: spin, then yield, then sleep on the device's
//!    kick futex after announcing it in [`DeviceStatus`] (the NEED_WAKEUP protocol of
//!    [`userq_uapi::sync`]).
//!
//! It bumps the device heartbeat at least every [`userq_uapi::HEARTBEAT_PERIOD_MS`], and
//! exits when kmd-shim asks or closes the object channel.
//!
//! Nothing a client writes can make it panic: doorbells are hints, write indices are
//! validated against a private read index, packets are copied once and decoded from the
//! copy, addresses are looked up in the context's VM, and fence handles in the context's
//! bindings. A bad input stops the offending queue and nothing else.
//!
//! The same code runs as the `fw-emu` process (daemon mode, started by kmd-shim) or as a
//! thread of the first client (embedded mode); both enter through [`Firmware::boot`].
#![deny(missing_docs)]

pub mod channel;
pub mod context;
pub mod engine;
pub mod kernel;
pub mod kernels;
pub mod queue;

use channel::ObjectChannel;
use context::{Binding, Context, FenceObject};
use queue::{Outcome, Queue};
use rustix::fd::{AsFd, OwnedFd};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{fence, Ordering::*};
use std::sync::Arc;
use std::time::{Duration, Instant};
use userq_uapi::error::ErrorCode;
use userq_uapi::fwmsg::{boot, FwEvent, FwRequest, FwStatus, ObjectId};
use userq_uapi::layout::{
    magic, ring_object_size, ControlRegion, DeviceKick, DeviceStatus, DoorbellPage, FenceKind,
    FenceState, FenceWaiters, RingHeader, CONTROL_REGION_SIZE, DOORBELL_PAGE_SIZE,
    MAX_QUEUES_PER_CONTEXT, MAX_RING_ENTRIES, MIN_RING_ENTRIES, PAGE_SIZE,
};
use userq_uapi::os::{self, Mapping};
use userq_uapi::sync::{self, Backoff, BackoffStep};

/// Tunables of the firmware.
#[derive(Debug, Clone)]
pub struct FirmwareConfig {
    /// Engine threads that run kernels' workgroups.
    pub engines: usize,
    /// How long an engine runs one job's workgroups before taking another turn.
    pub time_slice: Duration,
    /// The kernels DISPATCH may name: the built-ins plus any registered ones.
    pub kernels: kernels::KernelLibrary,
    /// How long the loop spins with nothing to do before it starts yielding.
    pub spin: Duration,
    /// How long after the last work the loop goes to sleep.
    pub idle_before_sleep: Duration,
    /// Packets one queue may run per turn before the next queue gets its turn.
    pub packets_per_turn: u32,
}

impl Default for FirmwareConfig {
    fn default() -> Self {
        FirmwareConfig {
            engines: default_engines(),
            time_slice: Duration::from_millis(1),
            kernels: kernels::KernelLibrary::builtin(),
            spin: Duration::from_micros(50),
            idle_before_sleep: Duration::from_millis(2),
            packets_per_turn: 256,
        }
    }
}

/// How long a suspend waits for running workgroups to yield before the firmware resets
/// their queues: well inside kmd-shim's ack timeout, so a kernel that never reaches a
/// checkpoint costs its own queue, not the device.
pub const PREEMPT_TIMEOUT: Duration = Duration::from_secs(2);

/// Environment variable that sets the number of engine threads (1 to 256).
pub const ENGINES_ENV: &str = "USERQ_FW_ENGINES";

/// `$USERQ_FW_ENGINES` if it is a number from 1 to 256; otherwise one fewer than the
/// cores, at least one: one core stays with the command processor, so that command
/// processing and kernel execution never starve each other (on 2 cores: one engine).
pub fn default_engines() -> usize {
    std::env::var(ENGINES_ENV)
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| (1..=256).contains(n))
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map_or(1, |n| n.get().saturating_sub(1))
                .max(1)
        })
}

/// Why the firmware could not start.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// A boot object was not on the channel.
    #[error("boot object {0} missing from the object channel")]
    MissingObject(ObjectId),
    /// A boot object could not be mapped or failed its header check.
    #[error("boot object {0}: {1}")]
    Map(ObjectId, os::MapError),
    /// The engine threads could not be started.
    #[error("cannot start engines: {0}")]
    Engines(std::io::Error),
}

/// The firmware: everything it owns, all private.
pub struct Firmware {
    config: FirmwareConfig,
    channel: ObjectChannel,
    control: Mapping,
    status: Arc<Mapping>,
    kick: Arc<Mapping>,
    engines: engine::Engines,
    contexts: HashMap<u32, Context>,
    fences: HashMap<u64, Arc<FenceObject>>,
    /// (context, slot) of queues with work, in turn order.
    run_list: VecDeque<(u32, u32)>,
    /// (context, slot) of parked queues.
    parked: Vec<(u32, u32)>,
    /// (context, slot) of queues whose write index the firmware polls (doorbell fast path).
    polled: Vec<(u32, u32)>,
    /// Whether `membarrier(GLOBAL_EXPEDITED)` works here; without it no queue is polled.
    can_poll: bool,
    /// Events kmd-shim's ring had no room for yet.
    backlog: VecDeque<[u64; 8]>,
    /// Suspend requests acknowledged once their jobs have no workgroup on an engine, or
    /// failed at their deadline (see [`PREEMPT_TIMEOUT`]).
    pending_suspends: Vec<(u32, Vec<Arc<engine::Job>>, Instant)>,
    last_heartbeat: Instant,
    shutdown: bool,
}

impl std::fmt::Debug for Firmware {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Firmware")
            .field("contexts", &self.contexts.len())
            .field("fences", &self.fences.len())
            .finish_non_exhaustive()
    }
}

fn map_checked(
    channel: &mut ObjectChannel,
    id: ObjectId,
    len: usize,
    want: u32,
) -> Result<Mapping, FwStatus> {
    let fd = channel.take(id, false).ok_or(FwStatus::BadObject)?;
    os::map_object(fd.as_fd(), len, true, want).map_err(|_| FwStatus::BadObject)
}

fn boot_map(
    channel: &mut ObjectChannel,
    id: ObjectId,
    len: usize,
    want: u32,
) -> Result<Mapping, BootError> {
    let fd = channel.take(id, true).ok_or(BootError::MissingObject(id))?;
    os::map_object(fd.as_fd(), len, true, want).map_err(|e| BootError::Map(id, e))
}

impl Firmware {
    /// Maps the boot objects that kmd-shim sends first on `channel` and announces
    /// [`FwEvent::Ready`].
    pub fn boot(channel: OwnedFd, config: FirmwareConfig) -> Result<Firmware, BootError> {
        let mut channel = ObjectChannel::new(channel);
        let control = boot_map(
            &mut channel,
            boot::CONTROL,
            CONTROL_REGION_SIZE,
            magic::CONTROL,
        )?;
        let status = boot_map(&mut channel, boot::STATUS, PAGE_SIZE, magic::DEVICE_STATUS)?;
        let kick = Arc::new(boot_map(
            &mut channel,
            boot::KICK,
            PAGE_SIZE,
            magic::DEVICE_KICK,
        )?);
        let status = Arc::new(status);
        let (s2, k2) = (status.clone(), kick.clone());
        let wake = Box::new(move || {
            sync::wake_if_announced(
                &s2.head::<DeviceStatus>().sleep.sleeping,
                &k2.head::<DeviceKick>().kick.word,
            );
        });
        let engines = engine::Engines::start(config.engines, config.time_slice, wake)
            .map_err(BootError::Engines)?;
        let mut fw = Firmware {
            config,
            channel,
            control,
            status,
            kick,
            engines,
            contexts: HashMap::new(),
            fences: HashMap::new(),
            run_list: VecDeque::new(),
            parked: Vec::new(),
            polled: Vec::new(),
            can_poll: sync::firmware_barrier_available(),
            backlog: VecDeque::new(),
            pending_suspends: Vec::new(),
            last_heartbeat: Instant::now(),
            shutdown: false,
        };
        fw.emit(FwEvent::Ready);
        Ok(fw)
    }

    /// Runs until kmd-shim sends [`FwRequest::Shutdown`] or closes the object channel.
    pub fn run(mut self) {
        let mut backoff = Backoff::new(self.config.spin, self.config.idle_before_sleep);
        // Set after a sleep; a wake-up that finds no work goes straight back to sleep
        // instead of spinning again, so spurious kicks cannot keep a core busy.
        let mut woken = false;
        let mut idle_turns: u32 = 0;
        while !self.shutdown {
            // Polled queues first: they are the latency-critical path.
            let mut progress = self.poll_queues();
            if progress {
                progress |= self.run_queues();
            }
            progress |= self.process_requests();
            progress |= self.collect_doorbells();
            progress |= self.check_parked();
            progress |= self.collect_completions();
            progress |= self.run_queues();
            progress |= self.flush_backlog();
            progress |= self.ack_suspends();
            // The clock decides, not the turn count (a busy turn can be long), but reading it
            // costs: every busy turn, and every 64th idle one.
            idle_turns = if progress {
                0
            } else {
                idle_turns.wrapping_add(1)
            };
            if idle_turns % 64 == 0 {
                progress |= self.tick();
            }
            if progress {
                backoff.reset();
                woken = false;
            } else if woken || backoff.step() == BackoffStep::Sleep {
                self.sleep();
                woken = true;
                backoff.reset();
            }
        }
    }

    fn control(&self) -> &ControlRegion {
        self.control.head()
    }

    /// Every 10 ms: bump the heartbeat, notice a vanished kmd-shim, and stop polling
    /// queues that went idle. Returns whether a queue turned out to have work.
    fn tick(&mut self) -> bool {
        if self.last_heartbeat.elapsed() < Duration::from_millis(10) {
            return false;
        }
        self.last_heartbeat = Instant::now();
        self.status
            .head::<DeviceStatus>()
            .health
            .heartbeat
            .fetch_add(1, Relaxed);
        if self.channel.peer_closed() {
            self.shutdown = true;
        }
        self.stop_polling(false)
    }

    /// NEED_WAKEUP: announce, re-check, sleep on the kick word. Polled queues are handed
    /// back to the doorbell protocol first.
    fn sleep(&mut self) {
        if self.stop_polling(true) {
            return; // a polled queue had work after all
        }
        let sleeping = &self.status.head::<DeviceStatus>().sleep.sleeping;
        let word = &self.kick.head::<DeviceKick>().kick.word;
        sleeping.store(1, Relaxed);
        fence(SeqCst); // pairs with the fence in sync::wake_if_announced
        let seen = word.load(Relaxed);
        if !self.has_work() {
            // A pending suspend is acknowledged when its workgroups have yielded: look
            // again every millisecond rather than only at the heartbeat.
            let bound = if self.pending_suspends.is_empty() {
                Duration::from_millis(userq_uapi::HEARTBEAT_PERIOD_MS)
            } else {
                Duration::from_millis(1)
            };
            sync::futex_wait(word, seen, Some(bound));
        }
        sleeping.store(0, Relaxed);
        self.tick();
    }

    fn has_work(&self) -> bool {
        self.control().to_fw.has_message()
            || !self.run_list.is_empty()
            || self.engines.has_completed()
            || self.contexts.values().any(|c| {
                c.doorbell
                    .head::<DoorbellPage>()
                    .pending
                    .words
                    .iter()
                    .any(|w| w.load(Relaxed) != 0)
            })
            || self.parked.iter().any(|&(c, s)| {
                self.contexts
                    .get(&c)
                    .and_then(|c| c.queues[s as usize].as_ref())
                    .is_some_and(Queue::parked_ready)
            })
    }

    fn emit(&mut self, ev: FwEvent) {
        let w = ev.encode();
        if !self.backlog.is_empty() || !self.control().to_kmd.push(&w) {
            self.backlog.push_back(w);
        } else {
            self.wake_kmd();
        }
    }

    fn flush_backlog(&mut self) -> bool {
        let mut moved = false;
        while let Some(w) = self.backlog.front() {
            if !self.control().to_kmd.push(w) {
                break;
            }
            self.backlog.pop_front();
            moved = true;
        }
        if moved {
            self.wake_kmd();
        }
        moved
    }

    fn wake_kmd(&self) {
        let c = self.control();
        sync::wake_if_announced(&c.kmd_sleep.sleeping, &c.kmd_kick.word);
    }

    fn process_requests(&mut self) -> bool {
        let mut any = false;
        while let Some(w) = self.control().to_fw.pop() {
            any = true;
            let (seq, status) = match FwRequest::decode(&w) {
                Ok((seq, FwRequest::Suspend { ctx, slot })) => {
                    match self.suspend(ctx, slot, true) {
                        Ok(jobs) if jobs.iter().any(|j| j.is_running()) => {
                            // Acknowledged once their workgroups have left the engines.
                            self.pending_suspends.push((
                                seq,
                                jobs,
                                Instant::now() + PREEMPT_TIMEOUT,
                            ));
                            continue;
                        }
                        Ok(_) => (seq, FwStatus::Ok),
                        Err(e) => (seq, e),
                    }
                }
                Ok((seq, FwRequest::Resume { ctx, slot })) => {
                    match self.suspend(ctx, slot, false) {
                        Ok(_) => {
                            self.engines.kick();
                            (seq, FwStatus::Ok)
                        }
                        Err(e) => (seq, e),
                    }
                }
                Ok((seq, req)) => (seq, self.apply(req)),
                Err(e) => ((w[0] >> 32) as u32, e),
            };
            self.emit(FwEvent::Ack { seq, status });
            if self.shutdown {
                break;
            }
        }
        any
    }

    fn apply(&mut self, req: FwRequest) -> FwStatus {
        match req {
            FwRequest::MapContext { ctx, doorbell } => {
                if self.contexts.contains_key(&ctx) {
                    self.channel.discard(doorbell);
                    return FwStatus::Exists;
                }
                match map_checked(
                    &mut self.channel,
                    doorbell,
                    DOORBELL_PAGE_SIZE,
                    magic::DOORBELL,
                ) {
                    Ok(map) => {
                        self.contexts.insert(ctx, Context::new(ctx, map));
                        FwStatus::Ok
                    }
                    Err(e) => e,
                }
            }
            FwRequest::UnmapContext { ctx } => match self.contexts.remove(&ctx) {
                Some(mut c) => {
                    for q in c.queues.iter_mut().filter_map(Option::take) {
                        q.destroy(ErrorCode::OwnerDied);
                    }
                    self.forget_queues(ctx, None);
                    FwStatus::Ok
                }
                None => FwStatus::NotFound,
            },
            FwRequest::MapQueue {
                ctx,
                slot,
                ring,
                entries,
                priority,
                timeline,
                time_slice_us,
            } => {
                let valid = entries.is_power_of_two()
                    && (MIN_RING_ENTRIES..=MAX_RING_ENTRIES).contains(&entries)
                    && (slot as usize) < MAX_QUEUES_PER_CONTEXT;
                let (Some(c), Some(t), true) = (
                    self.contexts.get_mut(&ctx),
                    self.fences.get(&timeline),
                    valid,
                ) else {
                    self.channel.discard(ring);
                    return FwStatus::NotFound;
                };
                if c.queues[slot as usize].is_some() {
                    self.channel.discard(ring);
                    return FwStatus::Exists;
                }
                let map = match map_checked(
                    &mut self.channel,
                    ring,
                    ring_object_size(entries),
                    magic::RING,
                ) {
                    Ok(m) => m,
                    Err(e) => return e,
                };
                if map.head::<RingHeader>().header.param.load(Relaxed) != entries {
                    return FwStatus::BadObject;
                }
                let suspended = c.suspended;
                // A slot may have served an earlier queue: its doorbell and pending bit
                // start clean (the client gets the queue only after this request's ack).
                let page = c.doorbell.head::<DoorbellPage>();
                page.doorbells[slot as usize].value.store(0, Relaxed);
                page.pending.words[slot as usize / 64].fetch_and(!(1u64 << (slot % 64)), Relaxed);
                c.queues[slot as usize] = Some(Queue::new(
                    slot,
                    map,
                    entries,
                    priority,
                    (time_slice_us > 0).then(|| Duration::from_micros(time_slice_us as u64)),
                    t.clone(),
                ));
                if suspended {
                    if let Some(q) = c.queues[slot as usize].as_mut() {
                        q.set_suspended(true);
                    }
                }
                FwStatus::Ok
            }
            FwRequest::UnmapQueue { ctx, slot } => {
                let q = self
                    .contexts
                    .get_mut(&ctx)
                    .and_then(|c| c.queues.get_mut(slot as usize))
                    .and_then(Option::take);
                match q {
                    Some(q) => {
                        q.destroy(ErrorCode::QueueDestroyed);
                        self.forget_queues(ctx, Some(slot));
                        FwStatus::Ok
                    }
                    None => FwStatus::NotFound,
                }
            }
            FwRequest::RegisterFence {
                fence,
                state,
                waiters,
            } => {
                if self.fences.contains_key(&fence) {
                    self.channel.discard(state);
                    self.channel.discard(waiters);
                    return FwStatus::Exists;
                }
                let s = map_checked(&mut self.channel, state, PAGE_SIZE, magic::FENCE_STATE);
                let w = map_checked(&mut self.channel, waiters, PAGE_SIZE, magic::FENCE_WAITERS);
                match (s, w) {
                    (Ok(s), Ok(w)) => {
                        let kind = s.head::<FenceState>().header.param.load(Relaxed);
                        if FenceKind::from_u32(kind).is_none() {
                            return FwStatus::BadObject;
                        }
                        debug_assert!(w.get::<FenceWaiters>(0).is_some());
                        self.fences
                            .insert(fence, Arc::new(FenceObject::new(fence, s, w)));
                        FwStatus::Ok
                    }
                    _ => FwStatus::BadObject,
                }
            }
            FwRequest::BindFence {
                ctx,
                handle,
                fence,
                writable,
            } => {
                let (Some(c), Some(f)) = (self.contexts.get_mut(&ctx), self.fences.get(&fence))
                else {
                    return FwStatus::NotFound;
                };
                if c.bindings.contains_key(&handle) {
                    return FwStatus::Exists;
                }
                c.bindings.insert(
                    handle,
                    Binding {
                        fence: f.clone(),
                        writable,
                    },
                );
                FwStatus::Ok
            }
            FwRequest::UnbindFence { ctx, handle } => {
                match self
                    .contexts
                    .get_mut(&ctx)
                    .map(|c| c.bindings.remove(&handle))
                {
                    Some(Some(_)) => FwStatus::Ok,
                    _ => FwStatus::NotFound,
                }
            }
            FwRequest::PoisonFence { fence, code } => match self.fences.get(&fence) {
                Some(f) => {
                    sync::poison_fence(f.state(), f.waiters(), code, 0, 0, 0);
                    FwStatus::Ok
                }
                None => FwStatus::NotFound,
            },
            FwRequest::DropFence { fence } => match self.fences.remove(&fence) {
                // Parked queues and bindings hold their own references; the mapping goes
                // when the last one does.
                Some(_) => FwStatus::Ok,
                None => FwStatus::NotFound,
            },
            FwRequest::MapBuffer {
                ctx,
                va,
                size,
                object,
            } => {
                let Some(c) = self.contexts.get_mut(&ctx) else {
                    self.channel.discard(object);
                    return FwStatus::NotFound;
                };
                let Some(fd) = self.channel.take(object, false) else {
                    return FwStatus::BadObject;
                };
                let Ok(len) = usize::try_from(size) else {
                    return FwStatus::BadObject;
                };
                match Mapping::map(fd.as_fd(), len, true) {
                    Ok(map) => {
                        if c.vm.map(va, size, map) {
                            FwStatus::Ok
                        } else {
                            FwStatus::Exists
                        }
                    }
                    Err(_) => FwStatus::BadObject,
                }
            }
            FwRequest::UnmapBuffer { ctx, va } => {
                match self.contexts.get_mut(&ctx).map(|c| c.vm.unmap(va)) {
                    Some(true) => FwStatus::Ok,
                    _ => FwStatus::NotFound,
                }
            }
            FwRequest::Shutdown => {
                self.shutdown = true;
                FwStatus::Ok
            }
            // Handled in `process_requests` (their ack may be deferred).
            FwRequest::Suspend { .. } | FwRequest::Resume { .. } => FwStatus::Malformed,
        }
    }

    /// Suspends (or resumes) one queue or a whole context; returns the jobs whose running
    /// workgroups a suspend must wait out. Resumed queues go back on the run list.
    fn suspend(
        &mut self,
        ctx: u32,
        slot: Option<u32>,
        on: bool,
    ) -> Result<Vec<Arc<engine::Job>>, FwStatus> {
        let c = self.contexts.get_mut(&ctx).ok_or(FwStatus::NotFound)?;
        let slots: Vec<u32> = match slot {
            Some(s) => {
                if c.queues.get(s as usize).is_none_or(Option::is_none) {
                    return Err(FwStatus::NotFound);
                }
                vec![s]
            }
            None => {
                c.suspended = on;
                (0..c.queues.len() as u32)
                    .filter(|&s| c.queues[s as usize].is_some())
                    .collect()
            }
        };
        let mut jobs = Vec::new();
        for s in slots {
            if let Some(q) = c.queues[s as usize].as_mut() {
                jobs.extend(q.set_suspended(on));
                if !on {
                    schedule(&mut self.run_list, q, ctx, s);
                }
            }
        }
        Ok(jobs)
    }

    /// Acknowledges suspends whose jobs no longer run a workgroup; at a suspend's deadline,
    /// resets the queues whose workgroups still run and fails the suspend.
    fn ack_suspends(&mut self) -> bool {
        if self.pending_suspends.is_empty() {
            return false;
        }
        let now = Instant::now();
        let mut any = false;
        for (seq, jobs, deadline) in std::mem::take(&mut self.pending_suspends) {
            if jobs.iter().all(|j| !j.is_running()) {
                self.emit(FwEvent::Ack {
                    seq,
                    status: FwStatus::Ok,
                });
                any = true;
            } else if now >= deadline {
                for job in jobs.iter().filter(|j| j.is_running()) {
                    let q = self
                        .contexts
                        .get_mut(&job.ctx)
                        .and_then(|c| c.queues[job.slot as usize].as_mut());
                    if let Some(q) = q {
                        if let Outcome::Faulted(f) = q.fail(ErrorCode::PreemptTimeout) {
                            self.report_fault(job.ctx, job.slot, f);
                        }
                    }
                }
                self.emit(FwEvent::Ack {
                    seq,
                    status: FwStatus::PreemptTimeout,
                });
                any = true;
            } else {
                self.pending_suspends.push((seq, jobs, deadline));
            }
        }
        any
    }

    /// Drops run-list and parked entries of a context (or one of its queues).
    fn forget_queues(&mut self, ctx: u32, slot: Option<u32>) {
        let gone = |&(c, s): &(u32, u32)| c == ctx && slot.is_none_or(|x| x == s);
        self.run_list.retain(|e| !gone(e));
        self.parked.retain(|e| !gone(e));
        self.polled.retain(|e| !gone(e));
    }

    fn collect_doorbells(&mut self) -> bool {
        let mut any = false;
        for c in self.contexts.values_mut() {
            let page = c.doorbell.head::<DoorbellPage>();
            for (wi, word) in page.pending.words.iter().enumerate() {
                if word.load(Relaxed) == 0 {
                    continue;
                }
                // Acquire: pairs with the client's release fetch_or after its doorbell.
                let mut bits = word.swap(0, Acquire);
                while bits != 0 {
                    let slot = wi * 64 + bits.trailing_zeros() as usize;
                    bits &= bits - 1;
                    match c.queues[slot].as_mut() {
                        Some(q) if q.is_active() => {
                            schedule(&mut self.run_list, q, c.id, slot as u32);
                            any = true;
                        }
                        // Parked, stopped or no queue at all: the doorbell is a hint only.
                        _ => {}
                    }
                }
            }
        }
        any
    }

    /// Puts polled queues with unread packets on the run list.
    fn poll_queues(&mut self) -> bool {
        let mut any = false;
        let (contexts, run_list) = (&mut self.contexts, &mut self.run_list);
        self.polled.retain(|&(ctx, slot)| {
            let Some(c) = contexts.get_mut(&ctx) else {
                return false;
            };
            let db = &c.doorbell.head::<DoorbellPage>().doorbells[slot as usize].value;
            let Some(q) = c.queues[slot as usize].as_mut() else {
                return false;
            };
            if q.is_active() && q.has_unread(db) {
                any |= schedule(run_list, q, ctx, slot);
            }
            true
        });
        any
    }

    /// Stops polling queues idle for a millisecond (or all of them): clear their flags,
    /// barrier every registered client (membarrier), then look at each write index once
    /// more. Returns whether one of them had work.
    fn stop_polling(&mut self, all: bool) -> bool {
        const IDLE: Duration = Duration::from_millis(1);
        let mut cooled = Vec::new();
        let contexts = &mut self.contexts;
        self.polled.retain(|&(ctx, slot)| {
            let q = contexts
                .get_mut(&ctx)
                .and_then(|c| c.queues[slot as usize].as_mut());
            match q {
                Some(q) if all || q.idle_for() > IDLE => {
                    q.set_polled(false);
                    cooled.push((ctx, slot));
                    false
                }
                Some(_) => true,
                None => false,
            }
        });
        if cooled.is_empty() {
            return false;
        }
        if !sync::barrier_on_registered_clients() {
            // Without the barrier no queue may stay polled.
            self.can_poll = false;
            for (ctx, slot) in std::mem::take(&mut self.polled) {
                if let Some(q) = self
                    .contexts
                    .get_mut(&ctx)
                    .and_then(|c| c.queues[slot as usize].as_mut())
                {
                    q.set_polled(false);
                    cooled.push((ctx, slot));
                }
            }
        }
        let mut any = false;
        for (ctx, slot) in cooled {
            let Some(c) = self.contexts.get_mut(&ctx) else {
                continue;
            };
            let db = &c.doorbell.head::<DoorbellPage>().doorbells[slot as usize].value;
            if let Some(q) = c.queues[slot as usize].as_mut() {
                if q.is_active() && q.has_unread(db) {
                    any |= schedule(&mut self.run_list, q, ctx, slot);
                }
            }
        }
        any
    }

    /// Continues the queues whose dispatches the engines completed.
    fn collect_completions(&mut self) -> bool {
        let jobs = self.engines.take_completed();
        let any = !jobs.is_empty();
        for job in jobs {
            let Some(q) = self
                .contexts
                .get_mut(&job.ctx)
                .and_then(|c| c.queues[job.slot as usize].as_mut())
            else {
                continue; // the queue went away meanwhile
            };
            if q.finish_dispatch(&job) {
                schedule(&mut self.run_list, q, job.ctx, job.slot);
            }
        }
        any
    }

    fn check_parked(&mut self) -> bool {
        let mut any = false;
        let mut i = 0;
        while i < self.parked.len() {
            let (ctx, slot) = self.parked[i];
            let Some(c) = self.contexts.get_mut(&ctx) else {
                self.parked.swap_remove(i);
                continue;
            };
            let Some(q) = c.queues[slot as usize].as_mut() else {
                self.parked.swap_remove(i);
                continue;
            };
            match q.try_unpark() {
                None if q.is_parked() => i += 1,
                None => {
                    self.parked.swap_remove(i);
                }
                Some(outcome) => {
                    self.parked.swap_remove(i);
                    any = true;
                    match outcome {
                        Outcome::Faulted(f) => self.report_fault(ctx, slot, f),
                        _ => {
                            schedule(&mut self.run_list, q, ctx, slot);
                        }
                    }
                }
            }
        }
        any
    }

    fn run_queues(&mut self) -> bool {
        let turns = self.run_list.len();
        let mut any = false;
        let mut newly_polled = Vec::new();
        for _ in 0..turns {
            let Some((ctx, slot)) = self.run_list.pop_front() else {
                break;
            };
            let Some(c) = self.contexts.get_mut(&ctx) else {
                continue;
            };
            let Context {
                id,
                doorbell,
                queues,
                bindings,
                vm,
                ..
            } = c;
            let Some(q) = queues[slot as usize].as_mut() else {
                continue;
            };
            q.queued = false;
            let db = &doorbell.head::<DoorbellPage>().doorbells[slot as usize].value;
            let res = queue::Resources {
                bindings,
                vm,
                kernels: &self.config.kernels,
                ctx: *id,
            };
            let outcome = q.service(db, &res, self.config.packets_per_turn);
            any = true;
            if self.can_poll && !q.is_polled() && matches!(outcome, Outcome::Idle | Outcome::More) {
                q.set_polled(true);
                newly_polled.push((ctx, slot));
            }
            match outcome {
                Outcome::Idle => {}
                Outcome::More => {
                    schedule(&mut self.run_list, q, ctx, slot);
                }
                Outcome::Parked => {
                    if !self.parked.contains(&(ctx, slot)) {
                        self.parked.push((ctx, slot));
                    }
                }
                Outcome::Faulted(f) => self.report_fault(ctx, slot, f),
                Outcome::Dispatched(job) => self.engines.submit(job),
            }
        }
        self.polled.extend(newly_polled);
        any
    }

    fn report_fault(&mut self, ctx: u32, slot: u32, f: queue::Fault) {
        self.emit(FwEvent::QueueError {
            ctx,
            slot,
            code: f.code,
            packet_index: f.packet_index,
            address: f.address,
        });
    }
}

/// Puts a queue on the run list unless it is on it already. `Queue::queued` mirrors
/// membership, so a queue is never listed twice; returns whether it was added.
fn schedule(run_list: &mut VecDeque<(u32, u32)>, q: &mut Queue, ctx: u32, slot: u32) -> bool {
    if q.queued {
        return false;
    }
    q.queued = true;
    run_list.push_back((ctx, slot));
    true
}
