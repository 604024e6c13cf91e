//! DOC: observing a device from any process: [`Observer`] maps its read-only status,
//! telemetry and event log (OBSERVE, which needs no context) and takes [`Snapshot`]s;
//! [`EventReader`] follows the event log with an explicit count of events it missed.
//! `userq status`, `top`, `events` and `trace` are built on this.

use crate::ioctl::{ObserveReply, RawReply, Reply, Request, MESSAGE_SIZE};
use crate::layout::{
    DeviceState, DeviceStatus, EventKind, EventLog, QueueRunState, Telemetry, EVENT_LOG_ENTRIES,
    MAX_QUEUES_PER_CONTEXT,
};
use crate::paging::PagingStats;
use crate::shm::{ReadOnly, Shm};
use crate::{os, KmdStatus, ABI_VERSION};
use rustix::fd::AsFd;
use std::path::Path;

/// What a process holds, read from `/proc/PID`: its open descriptors and resident memory.
/// The leak checks (the system tests, `userq-bench resets`) compare kmd-shim's and the
/// firmware's before and after clients come and go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Footprint {
    /// Open file descriptors (entries of `/proc/PID/fd`).
    pub fds: usize,
    /// Resident set in kB (`VmRSS` in `/proc/PID/status`).
    pub rss_kb: u64,
}

impl Footprint {
    /// The footprint of process `pid`; zero for what cannot be read (a process that is
    /// gone, or another user's).
    pub fn of(pid: u32) -> Footprint {
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
        let rss_kb = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            })
            .unwrap_or(0);
        Footprint { fds, rss_kb }
    }
}

/// Why a device could not be observed.
#[derive(Debug, thiserror::Error)]
pub enum ObserveError {
    /// Nothing serves the socket (or it is not a socket).
    #[error("cannot connect to {path}: {source} (is a userq device running there?)")]
    Connect {
        /// The socket path.
        path: std::path::PathBuf,
        /// Why.
        source: rustix::io::Errno,
    },
    /// The socket answered, but not as a userq device of this ABI.
    #[error("{0}")]
    Protocol(String),
    /// The device speaks another ABI version.
    #[error("the device speaks another ABI version (this tool speaks {ABI_VERSION})")]
    AbiMismatch,
    /// An object could not be mapped or failed its check.
    #[error("cannot map the device's {what}: {error:?}")]
    Map {
        /// Which object.
        what: &'static str,
        /// Why.
        error: os::MapError,
    },
}

/// A device's observation objects, mapped read-only.
pub struct Observer {
    status: Shm<DeviceStatus<ReadOnly>>,
    telemetry: Shm<Telemetry<ReadOnly>>,
    events: Shm<EventLog<ReadOnly>>,
    generation: u64,
}

impl std::fmt::Debug for Observer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Observer")
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

impl Observer {
    /// Connects to the device at `path` and maps its objects; the connection is closed
    /// again at once.
    pub fn connect(path: &Path) -> Result<Observer, ObserveError> {
        let (raw, fds) = exchange(
            path,
            Request::Observe {
                abi_version: ABI_VERSION,
            },
        )?;
        match KmdStatus::from_u32(raw.status) {
            KmdStatus::Ok => {}
            KmdStatus::AbiMismatch => return Err(ObserveError::AbiMismatch),
            // An older kmd-shim does not know OBSERVE.
            KmdStatus::UnknownOp | KmdStatus::NoContext => return Err(ObserveError::AbiMismatch),
            s => return Err(ObserveError::Protocol(format!("the device refused: {s}"))),
        }
        let reply = ObserveReply::decode(&raw.values)
            .map_err(|e| ObserveError::Protocol(e.describe().into()))?;
        let [status, telemetry, events] = <[_; 3]>::try_from(fds)
            .map_err(|_| ObserveError::Protocol("wrong number of descriptors".into()))?;
        let map = |what| move |error| ObserveError::Map { what, error };
        Ok(Observer {
            status: Shm::map(status.as_fd()).map_err(map("status page"))?,
            telemetry: Shm::map(telemetry.as_fd()).map_err(map("telemetry"))?,
            events: Shm::map(events.as_fd()).map_err(map("event log"))?,
            generation: reply.generation,
        })
    }

    /// The device generation these objects belong to.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether this generation's firmware was lost (a restarted device is a new
    /// generation: connect again).
    pub fn is_lost(&self) -> bool {
        self.status.health.state.load_acquire() == DeviceState::Lost as u32
    }

    /// A read-only descriptor of queue `slot` of context `ctx`'s profile object (the
    /// queue must have profiling on), asked of the device at `path`.
    pub fn profile_fd(
        path: &Path,
        ctx: u32,
        slot: u32,
    ) -> Result<rustix::fd::OwnedFd, ObserveError> {
        let (raw, fds) = exchange(path, Request::ProfileFd { ctx, slot })?;
        match KmdStatus::from_u32(raw.status) {
            KmdStatus::Ok => fds
                .into_iter()
                .next()
                .ok_or_else(|| ObserveError::Protocol("no descriptor".into())),
            s => Err(ObserveError::Protocol(format!(
                "profile of queue {ctx}:{slot}: {s}"
            ))),
        }
    }

    /// What the device looks like now.
    pub fn snapshot(&self) -> Snapshot {
        let t = &*self.telemetry;
        let engines = (t.device.engines.load() as usize).min(t.engines.len());
        Snapshot {
            generation: self.generation,
            lost: self.is_lost(),
            heartbeat: self.status.health.heartbeat.load(),
            firmware_pid: t.device.firmware_pid.load(),
            tick_ns: t.device.tick_ns.load(),
            vram_bytes: t.device.vram_bytes.load(),
            inline: EngineSnapshot {
                busy_ns: t.device.inline_ns.load(),
                workgroups: t.device.inline_workgroups.load(),
            },
            engines: t.engines[..engines]
                .iter()
                .map(|e| EngineSnapshot {
                    busy_ns: e.busy_ns.load(),
                    workgroups: e.workgroups.load(),
                })
                .collect(),
            paging: PagingStats::from_parts(
                t.paging
                    .parts
                    .each_ref()
                    .map(|line| line.each_ref().map(|w| w.load())),
            ),
            contexts: t
                .contexts
                .iter()
                .enumerate()
                .filter(|(_, c)| c.ctx.load() != 0)
                .map(|(row, c)| {
                    let comm: Vec<u8> = c
                        .comm
                        .iter()
                        .flat_map(|w| w.load().to_le_bytes())
                        .take_while(|&b| b != 0)
                        .collect();
                    ContextSnapshot {
                        ctx: c.ctx.load(),
                        pid: c.pid.load(),
                        comm: String::from_utf8_lossy(&comm).into_owned(),
                        engine_ns: c.engine_ns.load(),
                        guilty: c.guilty.load(),
                        innocent: c.innocent.load(),
                        banned: c.banned.load() != 0,
                        queues: (0..MAX_QUEUES_PER_CONTEXT)
                            .filter_map(|slot| {
                                let q = &t.queues[row][slot];
                                let open = q.open.load();
                                (open & 1 != 0).then(|| QueueSnapshot {
                                    slot: slot as u32,
                                    profiled: open & 2 != 0,
                                    priority: q.priority.load(),
                                    state: QueueRunState::from_u32(q.state.load()),
                                    error: q.error.load(),
                                    submitted: q.submitted.load(),
                                    consumed: q.consumed.load(),
                                    completed: q.completed.load(),
                                    engine_ns: q.engine_ns.load(),
                                    faults: q.faults.load(),
                                })
                            })
                            .collect(),
                    }
                })
                .collect(),
        }
    }

    /// A reader of the event log from the oldest record it still holds (`from_start`)
    /// or from now.
    pub fn events(&self, from_start: bool) -> EventReader<'_> {
        let head = self.events.head.next.load_acquire();
        let next = if from_start {
            head.saturating_sub(EVENT_LOG_ENTRIES as u64)
        } else {
            head
        };
        EventReader {
            log: &self.events,
            next,
        }
    }
}

/// One request on a fresh connection to the device at `path` (these two need no
/// context), and its reply with its descriptors.
fn exchange(
    path: &Path,
    req: Request,
) -> Result<(RawReply, Vec<rustix::fd::OwnedFd>), ObserveError> {
    let sock = crate::socket::connect(path).map_err(|source| ObserveError::Connect {
        path: path.to_owned(),
        source,
    })?;
    let req = req.encode();
    os::send_with_fds(sock.as_fd(), bytemuck::bytes_of(&req), &[])
        .map_err(|e| ObserveError::Protocol(format!("send: {e}")))?;
    wait_for_reply(&sock)?;
    let mut buf = [0u8; 2 * MESSAGE_SIZE];
    let got = os::recv_with_fds(sock.as_fd(), &mut buf)
        .map_err(|e| ObserveError::Protocol(format!("receive: {e}")))?;
    let raw: RawReply = bytemuck::try_pod_read_unaligned(&buf[..got.len.min(2 * MESSAGE_SIZE)])
        .ok()
        .filter(|_| got.len == MESSAGE_SIZE)
        .ok_or_else(|| ObserveError::Protocol("malformed reply: not a userq device".into()))?;
    Ok((raw, got.fds))
}

/// Waits up to 5 s for a reply: a socket that is not a device, or a device that is
/// stopped, may never answer.
fn wait_for_reply(sock: &rustix::fd::OwnedFd) -> Result<(), ObserveError> {
    let timeout = rustix::time::Timespec {
        tv_sec: 5,
        tv_nsec: 0,
    };
    let mut fds = [rustix::event::PollFd::new(
        sock,
        rustix::event::PollFlags::IN,
    )];
    if matches!(rustix::event::poll(&mut fds, Some(&timeout)), Ok(n) if n > 0) {
        Ok(())
    } else {
        Err(ObserveError::Protocol(
            "no answer within 5 s: not a userq device, or a stopped one".into(),
        ))
    }
}

/// The device at one moment (fields are read without a lock: a figure may lag another).
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Device generation.
    pub generation: u64,
    /// The firmware of this generation was lost.
    pub lost: bool,
    /// The firmware's heartbeat counter.
    pub heartbeat: u64,
    /// The firmware's process id (0: embedded).
    pub firmware_pid: u32,
    /// `CLOCK_MONOTONIC` ns of the firmware's last telemetry tick.
    pub tick_ns: u64,
    /// Device-memory budget.
    pub vram_bytes: u64,
    /// Engine threads.
    pub engines: Vec<EngineSnapshot>,
    /// Small dispatches the command processor ran itself instead of waking an engine.
    pub inline: EngineSnapshot,
    /// Paging counters: what PAGING_STATS answers, as kmd-shim last published them.
    pub paging: PagingStats,
    /// Open contexts.
    pub contexts: Vec<ContextSnapshot>,
}

/// One engine.
#[derive(Debug, Clone, Copy, Default)]
pub struct EngineSnapshot {
    /// Nanoseconds it ran workgroups.
    pub busy_ns: u64,
    /// Workgroups it finished.
    pub workgroups: u64,
}

/// One context.
#[derive(Debug, Clone, Default)]
pub struct ContextSnapshot {
    /// Context id.
    pub ctx: u32,
    /// Its process.
    pub pid: u32,
    /// The process's name.
    pub comm: String,
    /// Engine time of its queues, ns.
    pub engine_ns: u64,
    /// Hangs (guilty).
    pub guilty: u32,
    /// Stopped by others (innocent).
    pub innocent: u32,
    /// Banned.
    pub banned: bool,
    /// Its queues.
    pub queues: Vec<QueueSnapshot>,
}

/// One queue.
#[derive(Debug, Clone, Copy, Default)]
pub struct QueueSnapshot {
    /// Slot.
    pub slot: u32,
    /// Per-packet profiling is on (PROFILE_FD gives its records).
    pub profiled: bool,
    /// Priority word.
    pub priority: u32,
    /// State (`None`: not published yet).
    pub state: Option<QueueRunState>,
    /// The error code that stopped it.
    pub error: u32,
    /// Packets published.
    pub submitted: u64,
    /// Packets taken.
    pub consumed: u64,
    /// Last completed value.
    pub completed: u64,
    /// Engine time, ns.
    pub engine_ns: u64,
    /// Page faults.
    pub faults: u64,
}

/// One event read from the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    /// Its index in the log (0-based, never reused).
    pub index: u64,
    /// What (`None`: a kind this build does not know).
    pub kind: Option<EventKind>,
    /// The raw kind number.
    pub kind_number: u32,
    /// Context (0: the device).
    pub ctx: u32,
    /// Queue slot (`u32::MAX`: none).
    pub slot: u32,
    /// Process.
    pub pid: u32,
    /// `CLOCK_MONOTONIC` ns.
    pub time_ns: u64,
    /// Kind-specific values.
    pub a: u64,
    /// Kind-specific values.
    pub b: u64,
    /// Kind-specific values.
    pub c: u64,
}

/// Follows the event log.
#[derive(Debug)]
pub struct EventReader<'a> {
    log: &'a EventLog<ReadOnly>,
    next: u64,
}

impl EventReader<'_> {
    /// The events recorded since the last call, and how many were overwritten before
    /// they could be read (never silently lost: they are counted here).
    pub fn poll(&mut self) -> (Vec<Event>, u64) {
        let head = self.log.head.next.load_acquire();
        let mut out = Vec::new();
        let mut dropped = 0;
        // Records older than one lap are gone.
        let oldest = head.saturating_sub(EVENT_LOG_ENTRIES as u64);
        if self.next < oldest {
            dropped += oldest - self.next;
            self.next = oldest;
        }
        while self.next < head {
            let i = self.next;
            let r = &self.log.records[(i % EVENT_LOG_ENTRIES as u64) as usize];
            let seq = r.seq.load_acquire();
            if seq == 0 || seq < i + 1 {
                break; // being written: read it next time
            }
            if seq > i + 1 {
                dropped += 1; // overwritten by a later lap
                self.next += 1;
                continue;
            }
            let e = Event {
                index: i,
                kind: EventKind::from_u32(r.kind.load()),
                kind_number: r.kind.load(),
                ctx: r.ctx.load(),
                slot: r.slot.load(),
                pid: r.pid.load(),
                time_ns: r.time_ns.load(),
                a: r.a.load(),
                b: r.b.load(),
                c: r.c.load(),
            };
            // Still the same record after reading it: not overwritten meanwhile.
            std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
            if r.seq.load() == seq {
                out.push(e);
            } else {
                dropped += 1;
            }
            self.next += 1;
        }
        (out, dropped)
    }
}
