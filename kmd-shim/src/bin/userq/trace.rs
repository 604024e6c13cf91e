//! `userq trace --out FILE --seconds N`: records a trace that Perfetto's UI
//! (ui.perfetto.dev) and chrome://tracing open: Chrome trace-event JSON.
//!
//! - one process per context (its pid and name), one track per queue with profiling on:
//!   a slice per packet from when the firmware took it to when it completed (DISPATCH:
//!   handed to the engines → last workgroup done; WAIT_FENCE: parked → released), with
//!   its submit time and queueing delay in the slice's arguments;
//! - flow arrows from each SIGNAL_FENCE to the WAIT_FENCE it released (same fence, the
//!   last signal before the wait ended that reached its value);
//! - one counter track per engine: its busy share, sampled every 10 ms; and one for the
//!   command processor's share spent running small dispatches itself;
//! - the device's events (fault batches, evictions, migrations, hangs, resets, bans,
//!   device loss) as instant events on their context's process, or on the device's.
//!
//! Profile records are read every millisecond; a queue that ran more packets than its
//! ring holds between two reads loses the overwritten ones, and the trace says how many.

use crate::events::stop_flag;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::Ordering::{Acquire, Relaxed};
use std::time::{Duration, Instant};
use userq_uapi::layout::profile::{profile_object_size, profile_record_offset, word};
use userq_uapi::layout::{monotonic_ns, EventKind};
use userq_uapi::observe::{Event, Observer};
use userq_uapi::shm::ShmBytesRo;

/// Busy-time counters read at one moment.
struct Sample {
    /// When (`monotonic_ns`).
    at: u64,
    /// Each engine's busy time.
    engines: Vec<u64>,
    /// The command processor's time running small dispatches itself.
    inline: u64,
}

/// One packet as the profile recorded it.
#[derive(Debug, Clone, Copy)]
struct Packet {
    index: u64,
    op: u32,
    aux: u32,
    start: u64,
    end: u64,
    fence: u64,
    value: u64,
    submit: u64,
}

/// A profiled queue being read.
struct Traced {
    pid: u32,
    map: ShmBytesRo,
    entries: u32,
    packets: BTreeMap<u64, Packet>,
}

impl Traced {
    /// Takes the records completed since `since_ns` that it has not taken yet.
    fn read(&mut self, since_ns: u64) {
        for i in 0..self.entries as u64 {
            let Some(w) = self
                .map
                .words64(profile_record_offset(self.entries, i), word::COUNT)
            else {
                continue;
            };
            let seq = w[word::SEQ].load_acquire();
            if seq == 0 || self.packets.contains_key(&(seq - 1)) {
                continue;
            }
            let op = w[word::OP].load();
            let p = Packet {
                index: seq - 1,
                op: op as u32,
                aux: (op >> 32) as u32,
                start: w[word::START].load(),
                end: w[word::END].load(),
                fence: w[word::FENCE].load(),
                value: w[word::VALUE].load(),
                submit: w[word::SUBMITTED].load(),
            };
            // Still the same record (the firmware did not reuse it meanwhile), and inside
            // the trace.
            std::sync::atomic::fence(Acquire);
            if w[word::SEQ].load() == seq && p.start >= since_ns && p.end >= p.start {
                self.packets.insert(p.index, p);
            }
        }
    }

    /// Packets in the trace's index range that were overwritten before they were read.
    fn lost(&self) -> u64 {
        match (self.packets.keys().next(), self.packets.keys().next_back()) {
            (Some(a), Some(b)) => (b - a + 1) - self.packets.len() as u64,
            _ => 0,
        }
    }
}

fn op_name(p: &Packet) -> String {
    use userq_uapi::packet::opcode as op;
    match p.op as u8 {
        op::NOP => "nop".into(),
        op::WRITE_VALUE => "write_value".into(),
        op::SIGNAL_FENCE => format!("signal fence {} = {}", p.fence, p.value),
        op::WAIT_FENCE => format!("wait fence {} for {}", p.fence, p.value),
        op::TIMESTAMP => "timestamp".into(),
        op::DISPATCH => format!("dispatch kernel {}", p.aux),
        op::SET_FENCE => format!("set fence {} = {}", p.fence, p.value),
        other => format!("opcode {other}"),
    }
}

/// Whether a packet signals (or sets) a fence.
fn is_signal(p: &Packet) -> bool {
    use userq_uapi::packet::opcode as op;
    matches!(p.op as u8, op::SIGNAL_FENCE | op::SET_FENCE) && p.fence != 0
}

/// Whether a packet waits on a fence.
fn is_wait(p: &Packet) -> bool {
    p.op as u8 == userq_uapi::packet::opcode::WAIT_FENCE && p.fence != 0
}

/// Microseconds since the trace began.
fn us(ns: u64, t0: u64) -> f64 {
    ns.saturating_sub(t0) as f64 / 1e3
}

pub fn run(path: &Path, obs: &Observer, out: &Path, seconds: f64) -> crate::Res<()> {
    let stop = stop_flag()?;
    let t0 = monotonic_ns();
    let began = Instant::now();
    let span = Duration::from_secs_f64(seconds.clamp(0.01, 3600.0));
    let mut events = obs.events(false);
    // Queues being read; queues that went away (their records are kept); queues whose
    // profile could not be had (not asked again while they last).
    let mut traced: HashMap<(u32, u32), Traced> = HashMap::new();
    let mut gone: Vec<((u32, u32), Traced)> = Vec::new();
    let mut failed: std::collections::HashSet<(u32, u32)> = Default::default();
    let mut names: HashMap<u32, String> = HashMap::new();
    let mut device_events: Vec<Event> = Vec::new();
    let mut dropped = 0u64;
    let mut samples: Vec<Sample> = Vec::new();
    let mut last_sample = Instant::now() - Duration::from_secs(1);
    let mut ended_early = None;
    while began.elapsed() < span && !stop.load(Relaxed) {
        if last_sample.elapsed() >= Duration::from_millis(10) {
            last_sample = Instant::now();
            let snap = obs.snapshot();
            if snap.lost {
                ended_early = Some("the device's firmware was lost during the trace");
                break;
            }
            samples.push(Sample {
                at: monotonic_ns(),
                engines: snap.engines.iter().map(|e| e.busy_ns).collect(),
                inline: snap.inline.busy_ns,
            });
            let live: std::collections::HashSet<(u32, u32)> = snap
                .contexts
                .iter()
                .flat_map(|c| {
                    c.queues
                        .iter()
                        .filter(|q| q.profiled)
                        .map(move |q| (c.ctx, q.slot))
                })
                .collect();
            // A queue that went away keeps what was read of it; its slot may get a new
            // queue, read afresh.
            let ended: Vec<(u32, u32)> = traced
                .keys()
                .filter(|k| !live.contains(k))
                .copied()
                .collect();
            for k in ended {
                if let Some(mut t) = traced.remove(&k) {
                    t.read(t0);
                    gone.push((k, t));
                }
            }
            failed.retain(|k| live.contains(k));
            for c in &snap.contexts {
                names.insert(c.pid, format!("{} (pid {}, ctx {})", c.comm, c.pid, c.ctx));
                for q in c.queues.iter().filter(|q| q.profiled) {
                    let key = (c.ctx, q.slot);
                    if traced.contains_key(&key) || failed.contains(&key) {
                        continue;
                    }
                    // A queue whose profile cannot be had (destroyed meanwhile) is left out.
                    let Ok(fd) = Observer::profile_fd(path, c.ctx, q.slot) else {
                        failed.insert(key);
                        continue;
                    };
                    let Some(entries) = profile_entries(&fd) else {
                        continue;
                    };
                    let Ok(map) =
                        ShmBytesRo::map(rustix::fd::AsFd::as_fd(&fd), profile_object_size(entries))
                    else {
                        continue;
                    };
                    traced.insert(
                        (c.ctx, q.slot),
                        Traced {
                            pid: c.pid,
                            map,
                            entries,
                            packets: BTreeMap::new(),
                        },
                    );
                }
            }
        }
        for t in traced.values_mut() {
            t.read(t0);
        }
        let (evs, d) = events.poll();
        dropped += d;
        device_events.extend(evs);
        std::thread::sleep(Duration::from_millis(1));
    }
    for t in traced.values_mut() {
        t.read(t0);
    }
    let (evs, d) = events.poll();
    dropped += d;
    device_events.extend(evs);
    let traced: Vec<((u32, u32), Traced)> = traced.into_iter().chain(gone).collect();
    let trace = build(t0, &traced, &names, &device_events, &samples, dropped);
    let text = serde_json::to_string(&trace).map_err(|e| e.to_string())?;
    std::fs::write(out, text).map_err(|e| format!("cannot write {}: {e}", out.display()))?;
    let packets: usize = traced.iter().map(|(_, t)| t.packets.len()).sum();
    let lost: u64 = traced.iter().map(|(_, t)| t.lost()).sum();
    crate::format::out(&format!(
        "userq: wrote {} ({} profiled queue(s), {packets} packets, {} device events, {} engine samples{}{}); open it at https://ui.perfetto.dev",
        out.display(),
        traced.len(),
        device_events.len(),
        samples.len(),
        if lost > 0 { format!(", {lost} packets overwritten before they were read") } else { String::new() },
        if dropped > 0 { format!(", {dropped} events dropped") } else { String::new() },
    ))?;
    match ended_early {
        Some(why) => Err(format!("{why}; what was recorded is in {}", out.display())),
        None => Ok(()),
    }
}

/// The entries of a profile object, from its header (magic, ABI, entries).
fn profile_entries(fd: &rustix::fd::OwnedFd) -> Option<u32> {
    let head = ShmBytesRo::map(rustix::fd::AsFd::as_fd(fd), 64).ok()?;
    let w = |i: usize| head.word32(4 * i).map(|w| w.load());
    (w(0)? == userq_uapi::layout::magic::PROFILE && w(1)? == userq_uapi::ABI_VERSION)
        .then(|| w(2))
        .flatten()
        .filter(|e| e.is_power_of_two() && *e <= userq_uapi::layout::MAX_RING_ENTRIES)
}

/// A SIGNAL/SET_FENCE on a fence: (value, end ns, pid, tid, slice start µs).
type Signal = (u64, u64, u32, u32, f64);

/// The trace-event JSON.
fn build(
    t0: u64,
    traced: &[((u32, u32), Traced)],
    names: &HashMap<u32, String>,
    events: &[Event],
    samples: &[Sample],
    dropped: u64,
) -> Value {
    let mut out: Vec<Value> = Vec::new();
    // The device's own tracks.
    out.push(
        json!({"ph": "M", "name": "process_name", "pid": 0, "args": {"name": "userq device"}}),
    );
    for (pid, name) in names {
        out.push(json!({"ph": "M", "name": "process_name", "pid": pid, "args": {"name": name}}));
    }
    // Queue tracks and slices.
    let mut signals: HashMap<u64, Vec<Signal>> = HashMap::new();
    for &((ctx, slot), ref t) in traced {
        let tid = slot + 1;
        out.push(
            json!({"ph": "M", "name": "thread_name", "pid": t.pid, "tid": tid,
            "args": {"name": format!("ctx {ctx} queue {slot}")}}),
        );
        for p in t.packets.values() {
            let ts = us(p.start, t0);
            out.push(json!({
                "ph": "X", "name": op_name(p), "cat": "packet", "pid": t.pid, "tid": tid,
                "ts": ts, "dur": p.end.saturating_sub(p.start) as f64 / 1e3,
                "args": {
                    "packet": p.index,
                    "submitted_us": (p.submit != 0).then(|| us(p.submit, t0)),
                    "queued_us": (p.submit != 0).then(|| p.start.saturating_sub(p.submit) as f64 / 1e3),
                },
            }));
            if is_signal(p) {
                signals
                    .entry(p.fence)
                    .or_default()
                    .push((p.value, p.end, t.pid, tid, ts));
            }
        }
    }
    // Flows: each wait from the last signal of its fence that reached its value before
    // the wait ended.
    let mut flow = 0u64;
    for &((_, slot), ref t) in traced {
        for p in t.packets.values().filter(|p| is_wait(p)) {
            let Some(cands) = signals.get(&p.fence) else {
                continue;
            };
            let best = cands
                .iter()
                .filter(|s| s.0 >= p.value && s.1 <= p.end)
                .max_by_key(|s| s.1);
            if let Some(&(_, _, spid, stid, sts)) = best {
                flow += 1;
                out.push(json!({"ph": "s", "id": flow, "name": format!("fence {}", p.fence), "cat": "fence",
                    "pid": spid, "tid": stid, "ts": sts}));
                // At the end of the wait slice (inside it): where the signal released it.
                let end = p.start + (p.end.saturating_sub(p.start) / 1000).saturating_mul(999);
                out.push(json!({"ph": "f", "bp": "e", "id": flow, "name": format!("fence {}", p.fence), "cat": "fence",
                    "pid": t.pid, "tid": slot + 1, "ts": us(end, t0)}));
            }
        }
    }
    // Engine occupancy, one counter track per engine, and the command processor's inline
    // dispatches on a track of their own.
    for w in samples.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        let dt = Duration::from_nanos(b.at.saturating_sub(a.at));
        let share = |x: u64, y: u64| crate::status::share(x, y, dt) * 100.0;
        let counters = a
            .engines
            .iter()
            .zip(&b.engines)
            .enumerate()
            .map(|(e, (x, y))| (format!("engine {e} busy %"), share(*x, *y)))
            .chain([(
                "command processor inline busy %".to_string(),
                share(a.inline, b.inline),
            )]);
        for (name, busy) in counters {
            out.push(
                json!({"ph": "C", "name": name, "pid": 0, "ts": us(b.at, t0),
                "args": {"busy": (busy * 10.0).round() / 10.0}}),
            );
        }
    }
    // Device events as instants.
    for e in events {
        let name = e.kind.map_or_else(
            || format!("kind-{}", e.kind_number),
            |k| k.name().to_string(),
        );
        let on_device = matches!(
            e.kind,
            Some(EventKind::DeviceLost | EventKind::FirmwareRestart)
        ) || e.pid == 0;
        out.push(
            json!({"ph": "i", "s": if on_device { "g" } else { "p" }, "name": name, "cat": "event",
            "pid": if on_device { 0 } else { e.pid }, "tid": 0, "ts": us(e.time_ns, t0),
            "args": crate::format::event_args(e)}),
        );
    }
    json!({
        "traceEvents": out,
        "displayTimeUnit": "ms",
        "otherData": {"producer": "userq trace", "events_dropped": dropped},
    })
}
