//! # fw-emu: the userq firmware emulator
//!
//! DOC: the firmware is one polling loop (the "command processor", [`Firmware::run`]) that
//!
//! 1. checks the queues it polls (the doorbell fast path) and runs those with packets;
//! 2. drains kmd-shim's requests from the [`ControlRegion`] (map/unmap contexts, queues,
//!    fences and buffers, suspend/resume; `request.rs`, `suspend.rs`) and acknowledges
//!    each one through the kmd transport ([`control`]);
//! 3. swaps every context's pending-doorbell words to zero and puts the rung queues on
//!    the run list ([`sched`]);
//! 4. re-checks the queues parked on WAIT_FENCE and continues those whose dispatches the
//!    engines ([`engine`]) completed;
//! 5. services the run list round-robin, a bounded number of packets per queue per turn
//!    ([`queue`]: copy once, validate, execute);
//! 6. backs off when there is nothing to do: spin, then yield, then sleep on the device's
//!    kick futex after announcing it in [`DeviceStatus`] (the NEED_WAKEUP protocol of
//!    [`userq_uapi::sync`]).
//!
//! The files read top-down: [`id`] (how a queue is named), [`window`], [`vm`] and
//! [`fence`] (device memory, fences), [`kernel`], [`kernels`], [`job`], [`footprint`] and
//! [`engine`] (what runs and where), [`exec`], [`queue`], [`context`] and [`sched`] (the
//! objects and their scheduling), then [`control`], the requests, suspend, paging and this
//! loop, with its tunables in `config.rs`. Dependencies only point down that list
//! (`window` names the job that pins a page only in prose).
//!
//! It bumps the device heartbeat at least every [`userq_uapi::HEARTBEAT_PERIOD_MS`], and
//! exits when kmd-shim asks or closes the object channel.
//!
//! Nothing a client writes can make it panic: doorbells are hints, write indices are
//! validated against a private read index, packets are copied once and decoded from the
//! copy, addresses are looked up in the context's VM, and fence handles in the context's
//! bindings. A bad input stops the offending queue and nothing else. Nor can a kernel
//! that panics: it raises an exception that stops its own queue ([`kernel::Kernel::run`]).
//!
//! The same code runs as the `fw-emu` process (daemon mode, started by kmd-shim) or as a
//! thread of the first client (embedded mode); both enter through [`Firmware::boot`].
#![deny(missing_docs)]

// Top-down: device memory and fences; kernels and the engines that run them; queues,
// contexts and the scheduler; the kmd transport, requests and suspend; then the loop here.
// How a queue is named.
pub mod id;

// Device memory (on-demand windows under the VM) and fences.
pub mod window;

pub mod vm;

pub mod fence;

// What runs, and where: kernels, a dispatch's job, pinning its footprints, the engines.
pub mod kernel;
pub mod kernels;

pub mod job;

pub mod footprint;

pub mod engine;

// The objects and their scheduling, each using the ones above it (blank lines keep rustfmt
// from sorting them).
mod prefetch;

pub mod exec;

pub mod queue;

pub mod context;

pub mod sched;

// kmd-shim's side: objects, messages, requests, suspend.
pub mod channel;
pub mod control;
pub mod hang;
mod paging;
mod request;
mod suspend;
mod telemetry;

// The loop's tunables.
mod config;

pub use config::{default_engines, FirmwareConfig, ENGINES_ENV, PREEMPT_TIMEOUT};
pub use id::QueueId;

use channel::ObjectChannel;
use context::Contexts;
use control::Transport;
use fence::FenceObject;
use queue::Outcome;
use rustix::fd::{AsFd, OwnedFd};
use sched::Scheduler;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::Ordering::*;
use std::sync::Arc;
use std::time::{Duration, Instant};
use userq_uapi::fwmsg::{boot, FenceId, FwEvent, ObjectId};
use userq_uapi::layout::{ControlRegion, DeviceKick, DeviceStatus};
use userq_uapi::os;
use userq_uapi::shm::{Layout, Shm};
use userq_uapi::sync::{self, Backoff, BackoffStep};

/// The code to poison a stopped queue's pending signal targets with: for a queue that
/// failed on a poisoned fence, the poison code it waited on (the root cause travels along
/// WAIT_FENCE chains, so every queue down the chain names it); otherwise the queue's own.
fn root_cause((code, detail): (userq_uapi::error::ErrorCode, u32)) -> userq_uapi::error::ErrorCode {
    match code {
        userq_uapi::error::ErrorCode::DependencyFailed => {
            userq_uapi::error::ErrorCode::from_u32(detail).unwrap_or(code)
        }
        _ => code,
    }
}

/// Queue looks (next-slot tag loads) in one burst of an idle loop turn, spread over the
/// polled queues: 64 looks of one queue take about 0.3 µs here.
const IDLE_CHECKS: u32 = 64;

/// Run-list runs in one burst before the loop turns over to its other work.
const BURST_RUNS: u32 = 16;

/// Why the firmware could not start.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// A boot object was not on the channel.
    #[error("boot object {0} missing from the object channel")]
    MissingObject(ObjectId),
    /// A boot object could not be mapped or failed its header check.
    #[error("boot object {0}: {1}")]
    Map(ObjectId, os::MapError),
    /// The device-memory pool could not be mapped.
    #[error("device-memory pool: {0}")]
    Pool(std::io::Error),
    /// The engine threads could not be started.
    #[error("cannot start engines: {0}")]
    Engines(std::io::Error),
}

/// The firmware: everything it owns, all private.
pub struct Firmware {
    config: FirmwareConfig,
    channel: ObjectChannel,
    control: Transport,
    status: Arc<Shm<DeviceStatus>>,
    kick: Arc<Shm<DeviceKick>>,
    engines: engine::Engines,
    contexts: Contexts,
    fences: HashMap<FenceId, Rc<FenceObject>>,
    sched: Scheduler,
    /// Suspends whose ack waits for workgroups to leave the engines (see [`suspend`]).
    pending_suspends: Vec<suspend::PendingSuspend>,
    /// The dispatches on the engines, for hang detection ([`hang`]).
    watch: hang::Watch,
    /// The pool, fault batching and the paging acks that wait ([`paging`]).
    paging: paging::Paging,
    /// The shared telemetry this generation publishes (`telemetry`).
    telemetry: Option<Shm<userq_uapi::layout::Telemetry>>,
    /// Engine time of destroyed queues, per context (still the context's time).
    destroyed_ns: HashMap<u32, u64>,
    last_heartbeat: Instant,
    /// The CPU last published in the device status ([`Firmware::publish_cpu`]).
    cpu: u32,
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

/// Takes boot object `id` off the channel (waiting for it) and maps it as a `T`.
fn boot_map<T: Layout>(channel: &mut ObjectChannel, id: ObjectId) -> Result<Shm<T>, BootError> {
    let fd = channel.take(id, true).ok_or(BootError::MissingObject(id))?;
    Shm::map(fd.as_fd()).map_err(|e| BootError::Map(id, e))
}

impl Firmware {
    /// Maps the boot objects that kmd-shim sends first on `channel` and announces
    /// [`FwEvent::Ready`].
    pub fn boot(channel: OwnedFd, config: FirmwareConfig) -> Result<Firmware, BootError> {
        let mut channel = ObjectChannel::new(channel);
        let control = boot_map::<ControlRegion>(&mut channel, boot::CONTROL)?;
        let status = Arc::new(boot_map::<DeviceStatus>(&mut channel, boot::STATUS)?);
        let kick = Arc::new(boot_map::<DeviceKick>(&mut channel, boot::KICK)?);
        let pool_fd = channel
            .take(boot::POOL, true)
            .ok_or(BootError::MissingObject(boot::POOL))?;
        let uses_fd = channel
            .take(boot::POOL_USE, true)
            .ok_or(BootError::MissingObject(boot::POOL_USE))?;
        let pool = window::Pool::new(pool_fd, uses_fd).map_err(BootError::Pool)?;
        let telemetry_fd = channel
            .take(boot::TELEMETRY, true)
            .ok_or(BootError::MissingObject(boot::TELEMETRY))?;
        let telemetry =
            Shm::map(telemetry_fd.as_fd()).map_err(|e| BootError::Map(boot::TELEMETRY, e))?;
        let publish = config.telemetry;
        let (s2, k2) = (status.clone(), kick.clone());
        let wake = Box::new(move || {
            sync::wake_if_announced(&s2.sleep.sleeping, &k2.kick.word);
        });
        let engines = engine::Engines::start(config.engines, config.time_slice, wake)
            .map_err(BootError::Engines)?;
        let mut fw = Firmware {
            config,
            channel,
            control: Transport::new(control),
            status,
            kick,
            engines,
            contexts: Contexts::default(),
            fences: HashMap::new(),
            sched: Scheduler::new(),
            pending_suspends: Vec::new(),
            watch: hang::Watch::default(),
            paging: paging::Paging::new(Arc::new(pool)),
            telemetry: publish.then_some(telemetry),
            destroyed_ns: HashMap::new(),
            last_heartbeat: Instant::now(),
            cpu: userq_uapi::layout::CPU_UNKNOWN,
            shutdown: false,
        };
        fw.control.emit(FwEvent::Ready);
        Ok(fw)
    }

    /// Runs until kmd-shim sends [`userq_uapi::fwmsg::FwRequest::Shutdown`] or closes the
    /// object channel.
    pub fn run(mut self) {
        let mut backoff = Backoff::new(self.config.spin, self.config.idle_before_sleep);
        // Set after a sleep; a wake-up that finds no work goes straight back to sleep
        // instead of spinning again, so spurious kicks cannot keep a core busy.
        let mut woken = false;
        // Turns since the clock was last read, busy ones counting 8.
        let mut turns: u32 = 0;
        self.publish_cpu();
        while !self.shutdown {
            // This thread's wakes that found a sleeper, before the first turn after a sleep
            // (see below); not read on other turns.
            let delivered = woken.then(sync::wakes_delivered);
            let mut progress = self.process_requests();
            progress |= self
                .sched
                .collect_doorbells(&mut self.contexts, &self.kick.contexts);
            progress |= self.check_parked();
            progress |= self.collect_completed();
            progress |= self.run_queues();
            progress |= self.control.flush_backlog();
            progress |= self.ack_suspends();
            let faulted = self.flush_faults();
            progress |= faulted;
            progress |= self.ack_paging();
            // Nothing else to do: run a job that waits for parked engines (see
            // `Engines::help`; its completion is collected next turn). Before the idle
            // polling burst, which is longer than an engine's wake-up can be.
            if !progress {
                progress = self.engines.help();
            }
            // A small job left to that help wakes the engines after all once it waited
            // too long (a busy command processor does not help).
            self.engines.kick_deferred();
            // Polled queues last, in a burst: the latency-critical path (see `poll_burst`).
            let idle_polls = if progress {
                1
            } else {
                (IDLE_CHECKS / self.sched.polled_count().max(1) as u32).max(1)
            };
            progress |= self.poll_burst(idle_polls);
            // The clock decides when to tick, not the turn count, but reading it costs as
            // much as a cache-line transfer: every 8th busy turn (a busy turn can be long),
            // every 64th idle one. Never between a completion and the next poll.
            turns += if progress { 8 } else { 1 };
            if turns >= 64 {
                turns = 0;
                self.publish_cpu();
                progress |= self.tick();
            }
            // The first turn after a sleep that woke a sleeping host thread (a completion
            // with a blocked waiter) and left nothing to do gives way once. That is the
            // cold hand-off: the client's doorbell wake put this thread on the client's
            // vCPU, the client slept, and a futex wake has no "sync" hint, so the woken
            // client is queued here behind the back-off's spin: 70-80 us in half the cold
            // round trips measured, against 4 us with the yield. An awake firmware does
            // not yield: there a yield keeps a client woken onto this vCPU here, where
            // without it the scheduler moves the client to the other one (warm blocking
            // round trips slept in 24 % of rounds with the yield, 15 % without).
            let cold_handoff =
                delivered.is_some_and(|d| sync::wakes_delivered() != d) && !self.has_work();
            // A turn that posted page faults gives way once too: kmd-shim's event thread,
            // then its pager, must run before anything here can go on, and with a client
            // spinning on the other vCPU they wait for this one, where the back-off would
            // spin for its 50 us first. kmd-shim's hand-offs give way likewise (its event
            // thread yields after passing on a batch or an ack, a request's sender sleeps
            // for its ack at once). Single fault round trip, `userq-bench paging`: 147-175
            // us p50 before, 39-85 us after (ARCHITECTURE, "Giving way in a page fault's
            // hand-offs").
            if faulted || cold_handoff {
                std::thread::yield_now();
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

    /// Looks at the polled queues' next slots up to `idle_polls` times in a row, back to
    /// back, and runs a queue at once when it has packets, then looks again after one
    /// pause: a client waiting for a completion sends its next packet about one round
    /// trip later. So a packet is seen within one look of its tag landing, not within a
    /// whole loop turn (about 70 ns of other work here) or a pause (25 ns), and the
    /// firmware is back at the slot by the time the next one lands. Bounded, so requests,
    /// doorbells and engine completions wait at most one burst: `idle_polls` is spread
    /// over the polled queues, a burst runs at most `BURST_RUNS` services, and it ends
    /// when a service leaves a queue on the run list (so a polled queue gets no more turns
    /// than the run list's queues while those have work). The loop's
    /// back-off still pauses once per idle turn, then yields and sleeps.
    fn poll_burst(&mut self, idle_polls: u32) -> bool {
        if !self.sched.polls_any() {
            return false;
        }
        let (mut any, mut idle, mut runs) = (false, 0, 0);
        while idle < idle_polls && runs < BURST_RUNS {
            if self.run_polled() {
                // One pause after a run: a round-trip client's next packet is at least two
                // line transfers away, and a streaming client gets to write a few more
                // before this side reads the line it is writing (an early look costs the
                // writer a line transfer: submit cost 40 ns without the pause, 9 with).
                core::hint::spin_loop();
                any = true;
                runs += 1;
                idle = 0;
                if self.sched.has_runnable() {
                    break; // queues on the run list get their turn first (one per turn each)
                }
            } else {
                idle += 1;
            }
        }
        any
    }

    /// One turn of every queue on the run list; faults go to kmd-shim, dispatches to the
    /// engines and the watch, unless the command processor runs them itself
    /// ([`engine::Engines::run_inline`]): then their queues continue at once.
    fn run_queues(&mut self) -> bool {
        self.run_with(false)
    }

    /// One turn of every polled queue with packets, at once (see
    /// [`Scheduler::run_polled`]); outcomes as in [`Firmware::run_queues`].
    fn run_polled(&mut self) -> bool {
        self.run_with(true)
    }

    fn run_with(&mut self, polled: bool) -> bool {
        let (control, engines, watch) = (&mut self.control, &self.engines, &mut self.watch);
        let mut stopped = Vec::new();
        // Returns whether the dispatch already ran to completion (inline).
        let out = |id, outcome: &Outcome| match outcome {
            Outcome::Faulted(f) => {
                control.report_fault(id, *f);
                stopped.push((id, (f.code, f.detail)));
                false
            }
            Outcome::Dispatched(job) if engines.run_inline(job) => true,
            // It raised an exception inline: collected as a completion, which stops the
            // queue (`Firmware::collect_completed`).
            Outcome::Dispatched(job) if job.exception().is_some() => false,
            Outcome::Dispatched(job) => {
                watch.add(id, job.clone());
                engines.submit(job.clone());
                false
            }
            _ => false,
        };
        let (contexts, kernels) = (&mut self.contexts, &self.config.kernels);
        let budget = self.config.packets_per_turn;
        let any = if polled {
            self.sched.run_polled(contexts, kernels, budget, out)
        } else {
            self.sched.run(contexts, kernels, budget, out)
        };
        for (id, code) in stopped {
            self.poison_pending_signals(id, root_cause(code));
        }
        any
    }

    /// Re-checks the parked queues; a wait that ended on a poisoned fence is reported.
    fn check_parked(&mut self) -> bool {
        let control = &mut self.control;
        let mut stopped = Vec::new();
        let any = self.sched.check_parked(&mut self.contexts, |id, outcome| {
            if let Outcome::Faulted(f) = outcome {
                control.report_fault(id, *f);
                stopped.push((id, (f.code, f.detail)));
            }
        });
        for (id, code) in stopped {
            self.poison_pending_signals(id, root_cause(code));
        }
        any
    }

    /// Every 10 ms: bump the heartbeat, notice a vanished kmd-shim, check the watchdogs of
    /// running dispatches, and stop polling queues that went idle. Returns whether a queue turned out to have work.
    fn tick(&mut self) -> bool {
        if !self.tick_due() {
            return false;
        }
        self.last_heartbeat = Instant::now();
        self.status.health.heartbeat.fetch_add(1, Relaxed);
        if self.channel.peer_closed() {
            self.shutdown = true;
        }
        self.check_hangs();
        self.prune_faults();
        self.publish_telemetry();
        let swept = self.sched.sweep_doorbells(&mut self.contexts);
        self.sched.stop_polling(&mut self.contexts, false) | swept
    }

    /// Whether the last tick was 10 ms ago or more.
    fn tick_due(&self) -> bool {
        self.last_heartbeat.elapsed() >= Duration::from_millis(10)
    }

    /// NEED_WAKEUP: announce, re-check, sleep on the kick word. Polled queues are handed
    /// back to the doorbell protocol first.
    fn sleep(&mut self) {
        if self.sched.stop_polling(&mut self.contexts, true) {
            return; // a polled queue had work after all
        }
        // A pending suspend is acknowledged once its workgroups have yielded, and events
        // wait for room on kmd-shim's ring: look again every millisecond for either.
        let bound =
            if self.suspends_pending() || self.paging.pending() || self.control.has_backlog() {
                Duration::from_millis(1)
            } else if !self.watch.is_empty() {
                hang::CHECK_PERIOD // dispatches run: their watchdogs are checked at each tick
            } else {
                Duration::from_millis(userq_uapi::HEARTBEAT_PERIOD_MS)
            };
        let (status, kick) = (self.status.clone(), self.kick.clone());
        // The last look before sleeping also reads every context's own pending words: a
        // doorbell that found the firmware awake did not kick it, and another client may
        // have cleared its summary bit since.
        let ready = || self.has_work() || Scheduler::doorbell_pending_anywhere(&self.contexts);
        sync::announce_and_sleep(&status.sleep, &kick.kick.word, ready, bound);
        self.publish_cpu();
        // A wake-up with work goes to the work first: the tick (heartbeat, hang checks,
        // telemetry: 10–20 µs with the caches cold after a sleep) would sit between a
        // cold round trip's doorbell and its completion, and the loop ticks within 8 busy
        // turns anyway. A wake-up by the timeout ticks here, so the heartbeat goes on
        // while the device is idle. A wake-up that finds no work may be a doorbell whose
        // summary bit another client cleared: every context's own pending words are
        // taken, by the tick or, when none is due, here.
        if !self.has_work() {
            if self.tick_due() {
                self.tick();
            } else {
                self.sched.sweep_doorbells(&mut self.contexts);
            }
        }
    }

    /// Publishes the CPU this thread runs on (`DeviceHealth::cp_cpu`), if it changed, so
    /// that an adaptive wait on the same CPU sleeps rather than spin for work only this
    /// thread can do (see `userq::WaitMode`). About 2.5 ns (vDSO `getcpu`); called after
    /// each sleep and with the clock reads (every 8th busy or 64th idle turn): a running
    /// thread moves only when the scheduler balances, a waking one wherever it is woken.
    fn publish_cpu(&mut self) {
        let cpu = rustix::thread::sched_getcpu() as u32;
        if cpu != self.cpu {
            self.cpu = cpu;
            self.status.health.cp_cpu.store(cpu, Relaxed);
        }
    }

    fn has_work(&self) -> bool {
        self.engines.has_deferred()
            || self.control.has_request()
            || self.sched.has_runnable()
            || self.engines.has_completed()
            || self.engines.has_faults()
            || Scheduler::doorbell_pending(&self.kick.contexts)
            || self.sched.parked_ready(&self.contexts)
    }
}
