//! Output: lines to stdout that stop cleanly on a closed pipe, human units, and the JSON
//! forms of snapshots and events.

use serde_json::{json, Value};
use std::io::Write;
use userq_uapi::error::ErrorCode;
use userq_uapi::ioctl::Priority;
use userq_uapi::layout::EventKind;
use userq_uapi::observe::{Event, Snapshot};

/// The error that means "stdout was closed": main exits quietly (141, as a shell's
/// SIGPIPE would).
pub const CLOSED_PIPE: &str = "output closed";

/// Writes a line to stdout; a closed pipe is [`CLOSED_PIPE`].
pub fn out(line: &str) -> crate::Res<()> {
    let mut o = std::io::stdout().lock();
    writeln!(o, "{line}")
        .and_then(|_| o.flush())
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::BrokenPipe => CLOSED_PIPE.to_string(),
            _ => format!("cannot write: {e}"),
        })
}

/// Milliseconds with one decimal.
pub fn ms(ns: u64) -> String {
    format!("{:.1} ms", ns as f64 / 1e6)
}

/// Bytes in MiB.
pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

/// A priority word's name.
pub fn priority(p: u32) -> &'static str {
    match Priority::from_u64(p as u64) {
        Some(Priority::Low) => "low",
        Some(Priority::Normal) => "normal",
        Some(Priority::High) => "high",
        None => "?",
    }
}

/// An error code word's name.
pub fn error(code: u32) -> String {
    match ErrorCode::from_u32(code) {
        Some(c) => format!("{c:?}"),
        None if code == 0 => String::new(),
        None => format!("error {code}"),
    }
}

/// The snapshot as JSON; `busy` is each engine's share of the sample window (0..1),
/// `inline` the command processor's share spent running workgroups itself (small
/// dispatches, and larger ones' while every engine was parked).
pub fn snapshot_json(s: &Snapshot, busy: &[f64], inline: f64) -> Value {
    json!({
        "generation": s.generation,
        "state": if s.lost { "lost" } else { "running" },
        "firmware_pid": s.firmware_pid,
        "heartbeat": s.heartbeat,
        "memory": {
            "vram_bytes": s.vram_bytes,
            "resident_bytes": s.paging.resident_pages * userq_uapi::paging::DEVICE_PAGE,
            "peak_resident_bytes": s.paging.peak_resident_pages * userq_uapi::paging::DEVICE_PAGE,
            "faults": s.paging.faults,
            "fault_batches": s.paging.batches,
            "pages_in": s.paging.pages_in,
            "evictions": s.paging.pages_out,
            "refaults": s.paging.refaults,
            "violations": s.paging.violations,
            "eviction_deadlocks": s.paging.deadlocks,
            "service_ns": s.paging.service_ns,
            "migrate_ns": s.paging.migrate_ns,
        },
        "engines": s.engines.iter().zip(busy.iter().chain(std::iter::repeat(&0.0))).enumerate().map(|(i, (e, b))| json!({
            "engine": i, "busy_ns": e.busy_ns, "workgroups": e.workgroups, "utilisation": (b * 1000.0).round() / 1000.0,
        })).collect::<Vec<_>>(),
        "command_processor_inline": {
            "busy_ns": s.inline.busy_ns, "workgroups": s.inline.workgroups,
            "utilisation": (inline * 1000.0).round() / 1000.0,
        },
        "processes": s.contexts.iter().map(|c| json!({
            "ctx": c.ctx,
            "pid": c.pid,
            "name": c.comm,
            "engine_ns": c.engine_ns,
            "resets": {"guilty": c.guilty, "innocent": c.innocent, "banned": c.banned},
            "queues": c.queues.iter().map(|q| json!({
                "slot": q.slot,
                "priority": priority(q.priority),
                "state": q.state.map_or("starting", |s| s.name()),
                "error": error(q.error),
                "submitted": q.submitted,
                "taken": q.consumed,
                "completed": q.completed,
                "fence_value": q.completed,
                "pending": q.submitted.saturating_sub(q.completed),
                "engine_ns": q.engine_ns,
                "faults": q.faults,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

/// An event's values, named for its kind.
pub fn event_args(e: &Event) -> Value {
    use EventKind::*;
    match e.kind {
        Some(ProcessStart | ProcessEnd) => json!({"pid": e.a}),
        Some(QueueCreated) => json!({"priority": priority(e.a as u32)}),
        Some(FaultBatchStart) => json!({"faults": e.a, "batch": e.b}),
        Some(FaultBatchEnd) => json!({"pages_in": e.a, "ns": e.b, "evicted": e.c}),
        Some(Migration) => {
            json!({"pages": e.a, "to": if e.b == 0 {"host"} else {"device"}, "address": format!("{:#x}", e.c)})
        }
        Some(Eviction | Invalidation) => json!({"pages": e.a, "address": format!("{:#x}", e.c)}),
        Some(HangDetected) => json!({"code": error(e.a as u32), "ms": e.b, "packet": e.c}),
        Some(QueueReset) => json!({"code": error(e.a as u32), "packet": e.c}),
        Some(QueueError) => {
            json!({"code": error(e.a as u32), "address": format!("{:#x}", e.b), "packet": e.c})
        }
        Some(DeviceLost | FirmwareRestart) => json!({"generation": e.a}),
        Some(QueueDestroyed | ContextBanned) => json!({}),
        None => json!({"a": e.a, "b": e.b, "c": e.c}),
    }
}

/// An event as JSON.
pub fn event_json(e: &Event) -> Value {
    json!({
        "index": e.index,
        "time_ns": e.time_ns,
        "kind": e.kind.map_or_else(|| format!("kind-{}", e.kind_number), |k| k.name().to_string()),
        "ctx": e.ctx,
        "queue": (e.slot != u32::MAX).then_some(e.slot),
        "pid": e.pid,
        "args": event_args(e),
    })
}

/// An event as a line.
pub fn event_line(e: &Event) -> String {
    let kind = e.kind.map_or_else(
        || format!("kind-{}", e.kind_number),
        |k| k.name().to_string(),
    );
    let who = match (e.ctx, e.slot) {
        (0, _) => "device".to_string(),
        (c, u32::MAX) => format!("ctx {c}"),
        (c, s) => format!("ctx {c} queue {s}"),
    };
    let pid = if e.pid != 0 {
        format!(" pid {}", e.pid)
    } else {
        String::new()
    };
    format!(
        "{:>14.6} {kind:<18} {who}{pid} {}",
        e.time_ns as f64 / 1e9,
        event_args(e)
    )
}
