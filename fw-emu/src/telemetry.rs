//! DOC: the firmware's half of the telemetry: every 10 ms tick it publishes each queue's
//! figures (state, packets submitted, taken and completed, engine time, page faults),
//! each context's engine time, each engine's busy time and the command processor's inline
//! work into the shared [`Telemetry`] object. Nothing is published on the submit or
//! complete paths: engines count their time in process (per job, per engine), and only
//! the tick writes the shared lines, which no client writes or polls.

use crate::Firmware;
use std::sync::atomic::Ordering::Relaxed;
use userq_uapi::layout::{monotonic_ns, Telemetry};

/// Stores `v` unless the word holds it already (a line nobody else writes stays clean in
/// readers' caches while nothing changes).
fn put64(w: &std::sync::atomic::AtomicU64, v: u64) {
    if w.load(Relaxed) != v {
        w.store(v, Relaxed);
    }
}

fn put32(w: &std::sync::atomic::AtomicU32, v: u32) {
    if w.load(Relaxed) != v {
        w.store(v, Relaxed);
    }
}

impl Firmware {
    /// Publishes the telemetry (called from the tick).
    pub(crate) fn publish_telemetry(&self) {
        let Some(t) = self.telemetry.as_deref() else {
            return;
        };
        publish(t, self);
    }
}

fn publish(t: &Telemetry, fw: &Firmware) {
    put32(
        &t.device.engines,
        fw.engines.lines().min(t.engines.len()) as u32,
    );
    put32(&t.device.firmware_pid, std::process::id());
    t.device.tick_ns.store(monotonic_ns(), Relaxed);
    let (inline_ns, inline_wgs) = fw.engines.inline_stats();
    put64(&t.device.inline_ns, inline_ns);
    put64(&t.device.inline_workgroups, inline_wgs);
    for (line, (busy, wgs)) in t.engines.iter().zip(fw.engines.stats()) {
        put64(&line.busy_ns, busy);
        put64(&line.workgroups, wgs);
    }
    for c in fw.contexts.iter() {
        let row = c.row as usize;
        let (Some(cline), Some(qlines)) = (t.contexts.get(row), t.queues.get(row)) else {
            continue;
        };
        let mut engine_ns = 0;
        for (slot, q) in c.queues.iter().enumerate() {
            let Some(q) = q else {
                continue;
            };
            let f = q.figures();
            let l = &qlines[slot];
            put32(&l.state, f.state as u32);
            put32(&l.error, f.error);
            put64(&l.submitted, f.submitted);
            put64(&l.consumed, f.consumed);
            put64(&l.completed, f.completed);
            put64(&l.engine_ns, f.engine_ns);
            put64(&l.faults, f.faults);
            engine_ns += f.engine_ns;
        }
        // Destroyed queues' time stays counted for the context, as DRM fdinfo's does.
        let done = fw.destroyed_ns.get(&c.id).copied().unwrap_or(0);
        put64(&cline.engine_ns, engine_ns + done);
    }
}
