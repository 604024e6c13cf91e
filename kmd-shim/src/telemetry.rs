//! DOC: kmd-shim's side of observability: the event log it alone writes, the context and
//! queue lines of the telemetry it writes (who opened a context, which slots hold queues,
//! reset statistics, paging counters), and OBSERVE, which hands both out read-only.
//!
//! The firmware writes the rest of the telemetry (queue states and counters, engine
//! time) from its own tick; see `uapi::layout::Telemetry` for who writes which line.

use crate::device::Device;
use rustix::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering::Relaxed;
use userq_uapi::ioctl::ObserveReply;
use userq_uapi::layout::{EventKind, EventLog, NewEvent, Telemetry, EVENT_LOG_ENTRIES};
use userq_uapi::os;
use userq_uapi::paging::PagingStats;
use userq_uapi::shm::{Sealing, Shm};
use userq_uapi::KmdStatus;

/// The device's event log and a read-only descriptor of it for observers.
pub struct EventLogWriter {
    log: Shm<EventLog>,
    ro: OwnedFd,
    /// Kept so that the read-only re-open stays possible for the object's life.
    _fd: OwnedFd,
}

impl std::fmt::Debug for EventLogWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLogWriter").finish_non_exhaustive()
    }
}

impl EventLogWriter {
    /// A fresh log, sealed so that only kmd-shim's mapping may write it.
    pub fn create() -> rustix::io::Result<EventLogWriter> {
        let (fd, log) = Shm::<EventLog>::create(
            "userq-events",
            Sealing::FirmwareWritable,
            EVENT_LOG_ENTRIES as u32,
            0,
        )?;
        let ro = os::reopen_read_only(fd.as_fd())?;
        os::seal_read_only(fd.as_fd())?;
        Ok(EventLogWriter { log, ro, _fd: fd })
    }

    /// Records an event.
    pub fn record(&self, e: NewEvent) {
        self.log.record(e);
    }
}

/// Publishes the paging counters in the telemetry's paging line.
pub(crate) fn publish_paging(t: &Telemetry, s: &PagingStats) {
    for (line, values) in t.paging.parts.iter().zip(s.parts()) {
        for (word, v) in line.iter().zip(values) {
            word.store(v, Relaxed);
        }
    }
}

/// A process's name from `/proc/<pid>/comm`, NUL-padded to 16 bytes.
fn comm_of(pid: u32) -> [u64; 2] {
    let mut b = [0u8; 16];
    if let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/comm")) {
        let s = s.trim_end().as_bytes();
        let n = s.len().min(15);
        b[..n].copy_from_slice(&s[..n]);
    }
    [
        u64::from_le_bytes(b[..8].try_into().expect("8 bytes")),
        u64::from_le_bytes(b[8..].try_into().expect("8 bytes")),
    ]
}

impl Device {
    /// Records an event about context `ctx` (0: the device), queue `slot` (`u32::MAX`:
    /// none).
    pub(crate) fn event(&self, kind: EventKind, ctx: u32, slot: u32, abc: [u64; 3]) {
        let pid = if ctx == 0 {
            0
        } else {
            self.table().contexts.get(&ctx).map_or(0, |c| c.pid)
        };
        self.events.record(NewEvent {
            kind,
            ctx,
            slot,
            pid,
            a: abc[0],
            b: abc[1],
            c: abc[2],
        });
    }

    /// A context opened: its telemetry line.
    pub(crate) fn telemetry_open(&self, row: u32, ctx: u32, pid: u32) {
        let link = self.link();
        let Some(c) = link.telemetry().contexts.get(row as usize) else {
            return;
        };
        c.pid.store(pid, Relaxed);
        let comm = comm_of(pid);
        c.comm[0].store(comm[0], Relaxed);
        c.comm[1].store(comm[1], Relaxed);
        for w in [&c.guilty, &c.innocent, &c.banned] {
            w.store(0, Relaxed);
        }
        c.engine_ns.store(0, Relaxed);
        c.ctx.store(ctx, Relaxed);
    }

    /// A context closed: its line and its queues' lines are free.
    pub(crate) fn telemetry_close(&self, row: u32) {
        let link = self.link();
        let t = link.telemetry();
        if let (Some(c), Some(qs)) = (t.contexts.get(row as usize), t.queues.get(row as usize)) {
            c.ctx.store(0, Relaxed);
            for q in qs.iter() {
                q.open.store(0, Relaxed);
            }
        }
    }

    /// A queue was created (`open`, with its priority and whether it is profiled: bit 1
    /// of `open`, for tracers) or destroyed in slot `slot` of context row `row`.
    pub(crate) fn telemetry_queue(
        &self,
        row: u32,
        slot: u32,
        open: bool,
        priority: u32,
        profiled: bool,
    ) {
        let link = self.link();
        if let Some(q) = link
            .telemetry()
            .queues
            .get(row as usize)
            .and_then(|r| r.get(slot as usize))
        {
            if open {
                for w in [
                    &q.submitted,
                    &q.consumed,
                    &q.completed,
                    &q.engine_ns,
                    &q.faults,
                ] {
                    w.store(0, Relaxed);
                }
                q.error.store(0, Relaxed);
                q.state.store(0, Relaxed);
                q.priority.store(priority, Relaxed);
            }
            q.open
                .store(open as u32 | ((open && profiled) as u32) << 1, Relaxed);
        }
    }

    /// A context's reset statistics changed.
    pub(crate) fn telemetry_resets(&self, row: u32, guilty: u32, innocent: u32, banned: bool) {
        let link = self.link();
        if let Some(c) = link.telemetry().contexts.get(row as usize) {
            c.guilty.store(guilty, Relaxed);
            c.innocent.store(innocent, Relaxed);
            c.banned.store(banned as u32, Relaxed);
        }
    }

    /// OBSERVE: the generation, and read-only descriptors of the device status, the
    /// telemetry and the event log.
    pub fn observe(&self, abi_version: u32) -> Result<(ObserveReply, [OwnedFd; 3]), KmdStatus> {
        if abi_version != userq_uapi::ABI_VERSION {
            return Err(KmdStatus::AbiMismatch);
        }
        let link = self.link();
        let dup = |fd: rustix::fd::BorrowedFd<'_>| {
            fd.try_clone_to_owned().map_err(|_| KmdStatus::Internal)
        };
        Ok((
            ObserveReply {
                generation: link.generation(),
            },
            [
                dup(link.status_fd_read_only())?,
                dup(link.telemetry_fd_read_only())?,
                dup(self.events.ro.as_fd())?,
            ],
        ))
    }
}
