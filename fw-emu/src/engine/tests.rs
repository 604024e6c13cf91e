//! [`Engines::help`]: what the command processor may run while the engines are parked;
//! [`Engines::resume`]: where a job goes after its fault was serviced; and what an engine
//! does when a kernel raises an exception.

use super::*;
use crate::id::QueueId;
use crate::kernel::{ArgError, ArgKind, Args, Kernel};
use userq_uapi::ioctl::Priority;
use userq_uapi::packet::Dispatch;

/// A kernel that counts its workgroups; `hold` keeps a workgroup running until cleared.
struct Count {
    runs: AtomicU64,
    bounded: bool,
    hold: AtomicBool,
}

impl Count {
    fn new(bounded: bool, hold: bool) -> Arc<Count> {
        Arc::new(Count {
            runs: AtomicU64::new(0),
            bounded,
            hold: AtomicBool::new(hold),
        })
    }
}

impl Kernel for Count {
    fn name(&self) -> &str {
        "count"
    }
    fn signature(&self) -> &[ArgKind] {
        &[]
    }
    fn validate(&self, _: &Args, _: &Dispatch) -> Result<(), ArgError> {
        Ok(())
    }
    fn run(&self, _: &Args, _: &mut Workgroup, _: &Checkpoint<'_>) -> WorkgroupStatus {
        while self.hold.load(Acquire) {
            std::thread::yield_now();
        }
        self.runs.fetch_add(1, Relaxed);
        WorkgroupStatus::Done
    }
    fn bounded(&self) -> bool {
        self.bounded
    }
}

/// A kernel whose workgroups from index `.0` on raise an exception (panic); bounded.
struct Raise(u64);

impl Kernel for Raise {
    fn name(&self) -> &str {
        "raise"
    }
    fn signature(&self) -> &[ArgKind] {
        &[]
    }
    fn validate(&self, _: &Args, _: &Dispatch) -> Result<(), ArgError> {
        Ok(())
    }
    fn run(&self, _: &Args, wg: &mut Workgroup, _: &Checkpoint<'_>) -> WorkgroupStatus {
        assert!(wg.index < self.0, "workgroup {} raises", wg.index);
        WorkgroupStatus::Done
    }
    fn bounded(&self) -> bool {
        true
    }
}

fn job(kernel: &Arc<impl Kernel + 'static>, workgroups: u32) -> Arc<Job> {
    let dispatch = Dispatch {
        kernel: 0,
        grid: [workgroups * 64, 1, 1],
        workgroup: [64, 1, 1],
        args: 0,
        arg_count: 0,
    };
    Arc::new(Job::new(
        QueueId { ctx: 1, slot: 0 },
        0,
        kernel.clone(),
        Args(Vec::new()),
        dispatch,
        Priority::Normal,
        None,
    ))
}

/// Lists `job` as `Engines::submit` does, but without waking an engine.
fn list_quietly(e: &Engines, job: &Arc<Job>) {
    let mut l = e.shared.lists.lock().unwrap();
    l.ready[job.priority as usize].push_back(job.clone());
    e.shared.top.store(l.top(), Release);
}

/// Submits `job` and wakes the engines at once, as the command processor's loop does for a
/// small bounded job once its deferral passed ([`Engines::kick_deferred`]; no loop runs
/// here).
fn submit_to_engines(e: &Engines, job: &Arc<Job>) {
    e.submit(job.clone());
    e.kick();
}

/// Waits (bounded) until `n` engine threads are parked.
/// `n` engines with a 1 ms slice, once all of them are parked.
fn parked_engines(n: usize) -> Engines {
    let e = Engines::start(n, Duration::from_millis(1), Box::new(|| {})).unwrap();
    until_parked(&e, n);
    e
}

fn until_parked(e: &Engines, n: usize) {
    let t = Instant::now();
    while e.shared.parked.load(Relaxed) != n {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "engines never parked"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Waits for `j` (of `kernel`, `workgroups` workgroups) to complete, and checks that each
/// workgroup ran once, all of them on the engines.
fn completes_on_the_engines(e: &Engines, j: &Arc<Job>, kernel: &Count, workgroups: u64) {
    let done = until_completed(e);
    assert!(Arc::ptr_eq(&done[0], j));
    assert_eq!(
        kernel.runs.load(Relaxed),
        workgroups,
        "every workgroup ran once"
    );
    assert_eq!(e.inline_stats().1, 0, "all on the engine");
}

#[test]
fn while_every_engine_is_parked_the_command_processor_runs_a_bounded_job_once() {
    let e = parked_engines(1);
    let k = Count::new(true, false);
    let j = job(&k, 40);
    list_quietly(&e, &j);
    let mut calls = 0;
    while !j.finished() {
        calls += 1;
        assert!(calls < 10_000, "help never finished the job");
        e.help();
    }
    assert_eq!(k.runs.load(Relaxed), 40, "every workgroup ran once");
    // Nobody woke the engine: the command processor ran all of it, counted as its own.
    assert_eq!(e.inline_stats().1, 40);
    let done = e.take_completed();
    assert_eq!(done.len(), 1, "completed once");
    assert!(Arc::ptr_eq(&done[0], &j));
    // Off the ready lists: nothing holds it there, and nothing is left to help with.
    assert!(e
        .shared
        .lists
        .lock()
        .unwrap()
        .ready
        .iter()
        .all(|l| l.is_empty()));
    assert!(!e.help());
}

#[test]
fn the_command_processor_leaves_unbounded_jobs_and_busy_engines_alone() {
    let e = parked_engines(1);
    // Not bounded: never, however idle the engines.
    let long = Count::new(false, false);
    let j = job(&long, 4);
    list_quietly(&e, &j);
    assert!(!e.help());
    assert_eq!(long.runs.load(Relaxed), 0);
    assert_eq!(e.inline_stats(), (0, 0));
    j.cancel();
    // An engine busy (here held in a workgroup): never, even for a bounded job.
    let held = Count::new(false, true);
    e.submit(job(&held, 1));
    until_parked(&e, 0);
    let k = Count::new(true, false);
    let small = job(&k, 4);
    list_quietly(&e, &small);
    for _ in 0..100 {
        assert!(!e.help());
    }
    assert_eq!(k.runs.load(Relaxed), 0);
    assert_eq!(e.inline_stats(), (0, 0));
    held.hold.store(false, Release);
    // The engine, free again, takes the bounded job itself.
    let t = Instant::now();
    while !small.finished() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the engine never ran it"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(k.runs.load(Relaxed), 4);
}

/// Waits (bounded) for the completed list to hold something, and takes it.
fn until_completed(e: &Engines) -> Vec<Arc<Job>> {
    let t = Instant::now();
    loop {
        let done = e.take_completed();
        if !done.is_empty() {
            return done;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "nothing completed");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn an_engine_whose_kernel_raises_reports_the_job_once_and_serves_on() {
    let e = parked_engines(1);
    let j = job(&Arc::new(Raise(2)), 8);
    submit_to_engines(&e, &j);
    let done = until_completed(&e);
    assert_eq!(done.len(), 1, "reported once");
    assert!(Arc::ptr_eq(&done[0], &j));
    assert_eq!(j.exception(), Some(2), "names the workgroup");
    assert!(j.is_cancelled(), "the rest of the job does not run");
    assert_eq!(j.done.load(Relaxed), 2, "workgroups 0 and 1 finished");
    assert_eq!(
        j.next.load(Relaxed),
        3,
        "none was handed out after the raise"
    );
    // The engine thread lives on: it parks again, and runs the next job.
    until_parked(&e, 1);
    assert_eq!(e.shared.live.load(Relaxed), 1);
    let k = Count::new(false, false);
    let next = job(&k, 4);
    e.submit(next.clone());
    let done = until_completed(&e);
    assert!(Arc::ptr_eq(&done[0], &next));
    assert_eq!(k.runs.load(Relaxed), 4);
    assert_eq!(next.exception(), None);
}

#[test]
fn a_job_whose_workgroups_raise_on_two_engines_is_reported_once() {
    let e = parked_engines(2);
    for _ in 0..20 {
        let j = job(&Arc::new(Raise(0)), 64);
        submit_to_engines(&e, &j);
        let done = until_completed(&e);
        assert!(Arc::ptr_eq(&done[0], &j));
        // Both engines back and parked: whatever either raised was posted by now.
        until_parked(&e, 2);
        let later = e.take_completed();
        assert_eq!(done.len() + later.len(), 1, "reported exactly once");
        assert!(j.exception().is_some_and(|wg| wg < 64));
    }
}

#[test]
fn a_job_that_raises_while_the_command_processor_helps_leaves_the_lists() {
    let e = parked_engines(1);
    let j = job(&Arc::new(Raise(1)), 8);
    list_quietly(&e, &j);
    // Each call runs workgroups for one slice, at least one workgroup: a call the test
    // thread was preempted in may end before workgroup 1 (seen under a loaded `cargo test`).
    for _ in 0..8 {
        assert!(e.help(), "it ran");
        if j.exception().is_some() {
            break;
        }
    }
    assert_eq!(j.exception(), Some(1));
    let done = e.take_completed();
    assert_eq!(done.len(), 1, "posted once");
    assert!(Arc::ptr_eq(&done[0], &j));
    assert!(
        e.shared
            .lists
            .lock()
            .unwrap()
            .ready
            .iter()
            .all(|l| l.is_empty()),
        "off the ready lists, holding nothing"
    );
    assert_eq!(e.shared.top.load(Relaxed), 0);
    assert!(!e.help());
}

/// Lists `job` as one that faulted on the command processor: listed, waiting for the reply.
fn list_faulted(e: &Engines, job: &Arc<Job>) {
    job.faulted.store(true, Release);
    list_quietly(e, job);
    assert_eq!(e.shared.top.load(Relaxed), 0, "nothing claimable yet");
}

#[test]
fn a_resumed_small_job_finishes_on_the_command_processor_and_wakes_no_engine() {
    let e = parked_engines(1);
    // One workgroup: a help call always finishes the workgroup it is in, however long a
    // preemption makes it.
    let k = Count::new(true, false);
    let j = job(&k, 1);
    list_faulted(&e, &j);
    let work = e.shared.work.load(Relaxed);
    e.resume(&j);
    assert!(j.finished(), "finished within the resume");
    assert_eq!(k.runs.load(Relaxed), 1, "ran once");
    assert_eq!(e.inline_stats().1, 1, "on the command processor");
    assert_eq!(e.shared.work.load(Relaxed), work, "no engine was woken");
    let done = e.take_completed();
    assert_eq!(done.len(), 1, "completed once");
    assert!(e
        .shared
        .lists
        .lock()
        .unwrap()
        .ready
        .iter()
        .all(|l| l.is_empty()));
}

#[test]
fn a_resumed_job_the_command_processor_may_not_run_goes_to_the_engines() {
    let e = parked_engines(1);
    let k = Count::new(false, false); // not bounded: never on the command processor
    let j = job(&k, 4);
    list_faulted(&e, &j);
    let work = e.shared.work.load(Relaxed);
    e.resume(&j);
    assert_ne!(e.shared.work.load(Relaxed), work, "the engines were kicked");
    completes_on_the_engines(&e, &j, &k, 4);
}

#[test]
fn a_small_bounded_job_is_left_to_the_command_processor_and_wakes_no_engine() {
    let e = parked_engines(1);
    // One workgroup: the first help call finishes it, however late it comes (a deferral
    // that ran out meanwhile finds nothing left then).
    let k = Count::new(true, false);
    let j = job(&k, 1);
    let work = e.shared.work.load(Relaxed);
    e.submit(j.clone());
    assert!(e.has_deferred(), "deferred");
    assert_eq!(e.shared.work.load(Relaxed), work, "no engine was woken");
    // The command processor's idle turn: help, then the deferral check.
    assert!(e.help());
    assert!(j.finished(), "helped to the end");
    e.kick_deferred();
    assert!(!e.has_deferred(), "forgotten once nothing is left");
    assert_eq!(e.shared.work.load(Relaxed), work, "still no engine woken");
    assert_eq!(k.runs.load(Relaxed), 1, "ran once");
    assert_eq!(e.inline_stats().1, 1, "on the command processor");
    assert_eq!(e.take_completed().len(), 1, "completed once");
}

#[test]
fn a_deferred_job_the_command_processor_does_not_help_with_goes_to_the_engines() {
    let e = parked_engines(1);
    let k = Count::new(true, false);
    let j = job(&k, 4);
    let t = Instant::now(); // before the deadline is taken
    e.submit(j.clone());
    assert!(e.has_deferred(), "deferred");
    // A busy command processor: no help, only the deferral check, every turn.
    while e.has_deferred() {
        assert!(t.elapsed() < Duration::from_secs(10), "never kicked");
        e.kick_deferred();
    }
    assert!(t.elapsed() >= HELP_DEFER, "not before the deferral passed");
    completes_on_the_engines(&e, &j, &k, 4);
}

#[test]
fn large_or_unbounded_jobs_and_busy_engines_wake_the_engines_at_once() {
    let e = parked_engines(1);
    for j in [
        job(&Count::new(false, false), 1), // unbounded
        job(&Count::new(true, false), (HELP_DEFER_ITEMS / 64 + 1) as u32), // too large
    ] {
        let work = e.shared.work.load(Relaxed);
        e.submit(j.clone());
        assert!(!e.has_deferred());
        assert_ne!(e.shared.work.load(Relaxed), work, "the engines were woken");
        until_completed(&e);
        until_parked(&e, 1);
    }
    // An engine held by a workgroup: not every engine is parked.
    let held = Count::new(true, true);
    let hold = job(&held, 1);
    submit_to_engines(&e, &hold);
    until_parked(&e, 0);
    let j = job(&Count::new(true, false), 1);
    e.submit(j);
    assert!(!e.has_deferred(), "an engine is busy: no deferral");
    held.hold.store(false, Release);
    until_completed(&e);
}

#[test]
fn a_deferred_job_cancelled_before_anyone_ran_it_leaves_the_lists() {
    let e = parked_engines(1);
    let k = Count::new(true, false);
    let j = job(&k, 4);
    e.submit(j.clone());
    assert!(e.has_deferred(), "deferred");
    // Its queue was reset. Then the command processor's turns: the deferral ends by its
    // deadline at the latest.
    j.cancel();
    let t = Instant::now();
    while e.has_deferred() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the deferral never ended"
        );
        e.kick_deferred();
    }
    assert!(
        e.shared
            .lists
            .lock()
            .unwrap()
            .ready
            .iter()
            .all(|l| l.is_empty()),
        "off the ready lists: it holds no kernel or buffers"
    );
    assert_eq!(k.runs.load(Relaxed), 0, "never ran");
}
