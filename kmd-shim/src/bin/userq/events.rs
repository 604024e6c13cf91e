//! `userq events`: follows the event log until Ctrl-C, the deadline, or the device's end.

use crate::format::{event_json, event_line, out};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use userq_uapi::observe::Observer;

/// A flag set by SIGINT/SIGTERM.
pub fn stop_flag() -> crate::Res<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, flag.clone()).map_err(|e| e.to_string())?;
    }
    Ok(flag)
}

pub fn run(obs: &Observer, json: bool, from_start: bool, seconds: Option<f64>) -> crate::Res<()> {
    let stop = stop_flag()?;
    let deadline = seconds.map(|s| Instant::now() + Duration::from_secs_f64(s.max(0.0)));
    let mut reader = obs.events(from_start);
    loop {
        let (events, dropped) = reader.poll();
        if dropped > 0 {
            let line = if json {
                serde_json::json!({"dropped": dropped}).to_string()
            } else {
                format!("({dropped} events dropped: this reader fell behind)")
            };
            out(&line)?;
        }
        for e in &events {
            let line = if json {
                event_json(e).to_string()
            } else {
                event_line(e)
            };
            out(&line)?;
        }
        if stop.load(Relaxed) || deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(());
        }
        if obs.is_lost() {
            // The last events of this generation are in: read them, then say so.
            let (events, _) = reader.poll();
            for e in &events {
                out(&if json {
                    event_json(e).to_string()
                } else {
                    event_line(e)
                })?;
            }
            return Err(
                "the device's firmware was lost (a restart is a new generation: run again)".into(),
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
