//! Kernels that raise exceptions (they panic): the queue stops with `KernelException`
//! naming the workgroup and the kernel, the dispatch's other workgroups are cancelled, and
//! the engines and the command processor that ran the kernel go on serving everyone else.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use userq::firmware::{
    ArgError, ArgKind, Args, Checkpoint, Footprint, Kernel, Workgroup, WorkgroupStatus,
};
use userq::uapi::paging::Access;
use userq::{kernels, Command, Device, ErrorCode, KernelArg, QueueStatus, WaitError};

mod common;
use common::Env;

const LONG: Duration = Duration::from_secs(20);

/// Workgroup index that never raises.
const NONE: u64 = u64::MAX;

/// Where workgroup `args[0]` raises: in `run`, in `footprint`, or (whatever the index)
/// in `validate`.
const IN_RUN: u64 = 0;
const IN_FOOTPRINT: u64 = 1;
const IN_VALIDATE: u64 = 2;

/// A buggy kernel: where `args[1]` says, for workgroup `args[0]`, it indexes one word past
/// the end of a slice (an index out of range: it panics); every other workgroup stores 1
/// at its own index of `args[2]`, and names only that word as its footprint. Records the
/// name of each thread that raised.
struct Faulty {
    bounded: bool,
    raised_on: Mutex<Vec<String>>,
}

impl Faulty {
    fn raise(&self, words: &[std::sync::atomic::AtomicU64]) {
        let name = std::thread::current().name().unwrap_or("?").to_owned();
        self.raised_on.lock().unwrap().push(name);
        words[words.len()].store(1, Ordering::Relaxed);
    }
}

impl Kernel for Faulty {
    fn name(&self) -> &str {
        "faulty"
    }
    fn signature(&self) -> &[ArgKind] {
        &[ArgKind::U64, ArgKind::U64, ArgKind::Buffer]
    }
    fn validate(&self, a: &Args, d: &userq::uapi::packet::Dispatch) -> Result<(), ArgError> {
        if a.u64(1) == IN_VALIDATE {
            self.raise(a.buffer(2).words64());
        }
        userq::firmware::need(a, 2, d.workgroup_count(), 8)
    }
    fn footprint(&self, a: &Args, wg: &Workgroup, out: &mut Footprint) {
        if a.u64(1) == IN_FOOTPRINT && wg.index == a.u64(0) {
            self.raise(a.buffer(2).words64());
        }
        out.add(2, wg.index * 8..wg.index * 8 + 8, Access::Write);
    }
    fn run(&self, a: &Args, wg: &mut Workgroup, _: &Checkpoint<'_>) -> WorkgroupStatus {
        let out = a.buffer(2).words64();
        if a.u64(1) == IN_RUN && wg.index == a.u64(0) {
            self.raise(out);
        }
        out[wg.index as usize].store(1, Ordering::Relaxed);
        WorkgroupStatus::Done
    }
    fn bounded(&self) -> bool {
        self.bounded
    }
}

const ID: u32 = kernels::FIRST_CUSTOM + 7;

/// An embedded device with `engines` engine threads and the faulty kernel.
fn device(engines: usize, bounded: bool) -> (Env, Arc<Faulty>) {
    let k = Arc::new(Faulty {
        bounded,
        raised_on: Mutex::new(Vec::new()),
    });
    let env = Env::with(Device::builder().engines(engines).kernel(ID, k.clone()));
    (env, k)
}

/// A dispatch of `workgroups` workgroups of 64 items, workgroup `bad` raising `where_`.
fn dispatch(workgroups: u32, bad: u64, where_: u64, out: &userq::Buffer<u64>) -> Command {
    Command::dispatch(
        ID,
        [64 * workgroups, 1, 1],
        [64, 1, 1],
        &[
            KernelArg::U64(bad),
            KernelArg::U64(where_),
            KernelArg::Address(out.device_address()),
        ],
    )
}

/// Runs `cmd` on a new queue; the fault it ends with, as (code, address, detail).
fn raised(dev: &Device, cmd: Command) -> (ErrorCode, u64, u32) {
    let mut q = dev.create_queue().unwrap();
    let r = q.submit(cmd).unwrap().wait(LONG);
    let f = match r {
        Err(WaitError::Faulted(f)) => f,
        other => panic!("expected the kernel's exception, got {other:?}"),
    };
    assert!(
        matches!(q.status(), QueueStatus::Faulted(_)),
        "the queue stopped"
    );
    (f.code.expect("a known code"), f.address, f.detail)
}

/// Runs a clean dispatch of `workgroups` workgroups and checks every one ran.
fn runs_clean(dev: &Device, workgroups: u32) {
    let out = dev.alloc::<u64>(workgroups as usize).unwrap();
    let mut q = dev.create_queue().unwrap();
    q.submit(dispatch(workgroups, NONE, IN_RUN, &out))
        .unwrap()
        .wait(LONG)
        .expect("a clean dispatch completes");
    assert_eq!(out.to_vec(), vec![1; workgroups as usize]);
}

#[test]
fn a_kernel_that_panics_on_the_engines_stops_its_queue_and_the_engines_serve_on() {
    let (env, k) = device(2, false);
    let dev = env.dev();
    // Another queue's work, submitted first: it completes whatever the raising kernels do.
    let mut other = dev.create_queue().unwrap();
    let done = other.submit(kernels::spin(100, 200_000).unwrap()).unwrap();
    // More raising dispatches than engines: an engine that died with its kernel would
    // leave none for the last ones (or for the clean work after them).
    for round in 0..5u64 {
        let out = dev.alloc::<u64>(16).unwrap();
        let bad = 3 + round;
        assert_eq!(
            raised(dev, dispatch(16, bad, IN_RUN, &out)),
            (ErrorCode::KernelException, bad, ID),
            "round {round}"
        );
    }
    done.wait(LONG).expect("the other queue's work completes");
    runs_clean(dev, 64);
    // A queue of the context that raised is stopped, not the context: a new one runs.
    let mut q = dev.create_queue().unwrap();
    q.submit(Command::nop()).unwrap().wait(LONG).unwrap();
    let on = k.raised_on.lock().unwrap();
    assert!(on.len() >= 5, "{on:?}");
    assert!(
        on.iter().any(|t| t.starts_with("fw-engine")),
        "raised on an engine: {on:?}"
    );
}

#[test]
fn a_small_kernel_that_panics_on_the_command_processor_stops_only_its_queue() {
    // Bounded, one workgroup: the command processor runs it itself (inline).
    let (env, k) = device(2, true);
    let dev = env.dev();
    for _ in 0..3 {
        let out = dev.alloc::<u64>(1).unwrap();
        assert_eq!(
            raised(dev, dispatch(1, 0, IN_RUN, &out)),
            (ErrorCode::KernelException, 0, ID)
        );
    }
    assert_eq!(
        *k.raised_on.lock().unwrap(),
        vec!["fw-emu"; 3],
        "raised on the command processor"
    );
    assert!(!dev.is_lost(), "the firmware lives on");
    runs_clean(dev, 1);
    // Larger than inline: on the engines, or helped by the command processor.
    let out = dev.alloc::<u64>(32).unwrap();
    assert_eq!(
        raised(dev, dispatch(32, 17, IN_RUN, &out)),
        (ErrorCode::KernelException, 17, ID)
    );
    runs_clean(dev, 40);
}

#[test]
fn a_kernel_whose_argument_check_panics_stops_its_queue_before_any_workgroup() {
    let (env, k) = device(2, false);
    let dev = env.dev();
    let out = dev.alloc::<u64>(4).unwrap();
    assert_eq!(
        raised(dev, dispatch(4, NONE, IN_VALIDATE, &out)),
        (ErrorCode::KernelException, u64::MAX, ID)
    );
    assert_eq!(out.to_vec(), vec![0; 4], "no workgroup ran");
    assert_eq!(*k.raised_on.lock().unwrap(), vec!["fw-emu"]);
    runs_clean(dev, 4);
}

#[test]
fn a_paged_kernel_whose_footprint_panics_raises_when_that_workgroup_runs() {
    // One engine, so workgroup 0 faults first and its fault batch looks ahead at
    // workgroup 1's footprint, which panics: the look-ahead stops there, the fault is
    // serviced, and workgroup 1 raises when it runs.
    let (env, k) = device(1, false);
    let dev = env.dev();
    let out = dev.alloc_on_demand::<u64>(4).unwrap();
    assert_eq!(
        raised(dev, dispatch(4, 1, IN_FOOTPRINT, &out)),
        (ErrorCode::KernelException, 1, ID)
    );
    assert_eq!(out.read(0), 1, "workgroup 0 ran after its fault");
    assert!(
        k.raised_on
            .lock()
            .unwrap()
            .iter()
            .all(|t| t.starts_with("fw-engine")),
        "on the engine"
    );
    // The same buffer (now resident) and the engine serve the next dispatch.
    let mut q = dev.create_queue().unwrap();
    q.submit(dispatch(4, NONE, IN_FOOTPRINT, &out))
        .unwrap()
        .wait(LONG)
        .expect("a clean paged dispatch completes");
    assert_eq!(out.to_vec(), vec![1; 4]);
}
