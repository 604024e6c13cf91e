//! `userq top`: a live view of the device, refreshed every interval, sorted by engine time
//! (`s` changes the order); `q`, Esc or Ctrl-C quits. The terminal is restored however it
//! ends (ratatui's init installs a panic hook that restores it too).

use crate::format::{mib, ms, priority};
use crate::status::{inline_share, utilisation};
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Paragraph, Row, Table};
use ratatui::Frame;
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};
use userq_uapi::observe::{Observer, Snapshot};
use userq_uapi::paging::DEVICE_PAGE;

/// Smallest terminal the view fits in.
const MIN_SIZE: (u16, u16) = (72, 8);
/// A heartbeat that has not moved for this long: the device stopped.
const STALE: Duration = Duration::from_secs(3);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Sort {
    EngineNow,
    EngineTotal,
    Pid,
    Faults,
}

impl Sort {
    fn next(self) -> Sort {
        match self {
            Sort::EngineNow => Sort::EngineTotal,
            Sort::EngineTotal => Sort::Pid,
            Sort::Pid => Sort::Faults,
            Sort::Faults => Sort::EngineNow,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Sort::EngineNow => "engine %",
            Sort::EngineTotal => "engine time",
            Sort::Pid => "pid",
            Sort::Faults => "faults",
        }
    }
}

/// One queue row.
struct QRow {
    pid: u32,
    comm: String,
    ctx: u32,
    slot: u32,
    prio: &'static str,
    state: &'static str,
    submitted: u64,
    completed: u64,
    engine_ns: u64,
    share: f64,
    faults: u64,
}

fn rows(prev: &Snapshot, now: &Snapshot, window: Duration) -> Vec<QRow> {
    let before: HashMap<(u32, u32), u64> = prev
        .contexts
        .iter()
        .flat_map(|c| c.queues.iter().map(move |q| ((c.ctx, q.slot), q.engine_ns)))
        .collect();
    let before = &before;
    now.contexts
        .iter()
        .flat_map(|c| {
            c.queues.iter().map(move |q| {
                let was = before.get(&(c.ctx, q.slot)).copied().unwrap_or(q.engine_ns);
                QRow {
                    pid: c.pid,
                    comm: c.comm.clone(),
                    ctx: c.ctx,
                    slot: q.slot,
                    prio: priority(q.priority),
                    state: q.state.map_or("starting", |s| s.name()),
                    submitted: q.submitted,
                    completed: q.completed,
                    engine_ns: q.engine_ns,
                    // Tolerates a value that went backwards (fdinfo's rule): 0.
                    share: q.engine_ns.saturating_sub(was) as f64 / window.as_nanos().max(1) as f64,
                    faults: q.faults,
                }
            })
        })
        .collect()
}

/// Busy shares over the last window: each engine's, and the command processor's running
/// small dispatches itself.
struct Busy {
    engines: Vec<f64>,
    inline: f64,
}

fn draw(f: &mut Frame<'_>, now: &Snapshot, busy: &Busy, rows: &[QRow], sort: Sort) {
    let area = f.area();
    if area.width < MIN_SIZE.0 || area.height < MIN_SIZE.1 {
        f.render_widget(
            Paragraph::new(format!(
                "terminal too small ({}x{}, need {}x{}); q quits",
                area.width, area.height, MIN_SIZE.0, MIN_SIZE.1
            )),
            area,
        );
        return;
    }
    let [head, table] = Layout::vertical([Constraint::Length(4), Constraint::Min(3)]).areas(area);
    let use_: Vec<String> = busy
        .engines
        .iter()
        .map(|b| format!("{:.0}%", b * 100.0))
        .collect();
    let p = &now.paging;
    let lines = vec![
        Line::from(format!(
            "userq top — generation {} {}, firmware pid {}, {} process(es) — sorted by {} (s), q quits",
            now.generation,
            if now.lost { "LOST" } else { "running" },
            now.firmware_pid,
            now.contexts.len(),
            sort.name()
        )),
        Line::from(format!(
            "engines busy: {}; command processor running small dispatches: {:.0}%",
            use_.join(" "),
            busy.inline * 100.0
        )),
        Line::from(format!(
            "memory: {} of {} resident; {} faults, {} batches, {} evicted, {} refaults",
            mib(p.resident_pages * DEVICE_PAGE),
            mib(now.vram_bytes),
            p.faults,
            p.batches,
            p.pages_out,
            p.refaults
        )),
    ];
    f.render_widget(Paragraph::new(lines), head);
    let header = Row::new([
        "PID",
        "NAME",
        "CTX",
        "Q",
        "PRIO",
        "STATE",
        "SUBMITTED",
        "DONE",
        "ENGINE%",
        "ENGINE",
        "FAULTS",
    ])
    .style(Style::default().add_modifier(Modifier::BOLD));
    let body = rows.iter().map(|r| {
        Row::new([
            r.pid.to_string(),
            r.comm.clone(),
            r.ctx.to_string(),
            r.slot.to_string(),
            r.prio.to_string(),
            r.state.to_string(),
            r.submitted.to_string(),
            r.completed.to_string(),
            format!("{:.1}", r.share * 100.0),
            ms(r.engine_ns),
            r.faults.to_string(),
        ])
    });
    let widths = [
        Constraint::Length(7),
        Constraint::Length(15),
        Constraint::Length(5),
        Constraint::Length(3),
        Constraint::Length(6),
        Constraint::Length(10),
        Constraint::Length(10),
        Constraint::Length(10),
        Constraint::Length(8),
        Constraint::Length(11),
        Constraint::Length(7),
    ];
    f.render_widget(
        Table::new(body, widths)
            .header(header)
            .block(Block::bordered().title("queues")),
        table,
    );
}

pub fn run(_path: &Path, obs: Observer, interval_ms: u64) -> crate::Res<()> {
    let stop = crate::events::stop_flag()?;
    let interval = Duration::from_millis(interval_ms);
    let mut terminal = match ratatui::try_init() {
        Ok(t) => t,
        Err(e) => {
            // Raw mode may be on already: put the terminal back before saying why.
            ratatui::restore();
            return Err(format!("cannot use the terminal: {e}"));
        }
    };
    let result = (|| -> crate::Res<()> {
        let mut sort = Sort::EngineNow;
        let mut prev = obs.snapshot();
        let mut at = Instant::now();
        let mut beat = (prev.heartbeat, Instant::now());
        let mut shown: Option<(Snapshot, Busy, Vec<QRow>)> = None;
        loop {
            if stop.load(Relaxed) {
                return Ok(());
            }
            if at.elapsed() >= interval || shown.is_none() {
                let now = obs.snapshot();
                let window = at.elapsed().max(Duration::from_millis(1));
                let busy = Busy {
                    engines: utilisation(&prev, &now, window),
                    inline: inline_share(&prev, &now, window),
                };
                let mut r = rows(&prev, &now, window);
                match sort {
                    Sort::EngineNow => r.sort_by(|a, b| b.share.total_cmp(&a.share)),
                    Sort::EngineTotal => r.sort_by_key(|x| std::cmp::Reverse(x.engine_ns)),
                    Sort::Pid => r.sort_by_key(|x| (x.pid, x.slot)),
                    Sort::Faults => r.sort_by_key(|x| std::cmp::Reverse(x.faults)),
                }
                if now.heartbeat != beat.0 {
                    beat = (now.heartbeat, Instant::now());
                }
                if now.lost {
                    return Err("the device's firmware was lost".into());
                }
                if beat.1.elapsed() > STALE {
                    return Err(format!(
                        "the device stopped: no heartbeat for {:?}",
                        beat.1.elapsed()
                    ));
                }
                prev = now.clone();
                at = Instant::now();
                shown = Some((now, busy, r));
            }
            if let Some((now, busy, r)) = &shown {
                terminal
                    .draw(|f| draw(f, now, busy, r, sort))
                    .map_err(|e| format!("cannot draw: {e}"))?;
            }
            if event::poll(Duration::from_millis(50)).map_err(|e| e.to_string())? {
                match event::read().map_err(|e| e.to_string())? {
                    Event::Key(k) if k.kind == KeyEventKind::Press => match k.code {
                        KeyCode::Char('q') | KeyCode::Esc => return Ok(()),
                        KeyCode::Char('c') if k.modifiers.contains(KeyModifiers::CONTROL) => {
                            return Ok(())
                        }
                        KeyCode::Char('s') => {
                            sort = sort.next();
                            shown = None;
                        }
                        _ => {}
                    },
                    // Redrawn at the next turn at the new size.
                    Event::Resize(..) => {}
                    _ => {}
                }
            }
        }
    })();
    ratatui::restore();
    result
}
