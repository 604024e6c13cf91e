//! Kernels that raise exceptions (they panic): the queue stops with `KernelException`
//! naming the workgroup and the kernel, the dispatch's other workgroups are cancelled, and
//! the engines and the command processor that ran the kernel go on serving everyone else.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use userq::firmware::{ArgError, ArgKind, Args, Checkpoint, Kernel, Workgroup, WorkgroupStatus};
use userq::{kernels, Command, Device, ErrorCode, KernelArg, QueueStatus, WaitError};

mod common;
use common::Env;

const LONG: Duration = Duration::from_secs(20);

/// Workgroup that never panics.
const NONE: u64 = u64::MAX;

/// `validate` panics instead of the workgroup.
const IN_VALIDATE: u64 = u64::MAX - 1;

/// A buggy kernel: workgroup `args[0]` writes one word past the end of its buffer (an
/// index out of range: it panics); every other workgroup stores 1 at its own index.
struct Faulty {
    bounded: bool,
}

impl Kernel for Faulty {
    fn name(&self) -> &str {
        "faulty"
    }
    fn signature(&self) -> &[ArgKind] {
        &[ArgKind::U64, ArgKind::Buffer]
    }
    fn validate(&self, a: &Args, d: &userq::uapi::packet::Dispatch) -> Result<(), ArgError> {
        if a.u64(0) == IN_VALIDATE {
            let none: &[u64] = &[];
            std::hint::black_box(none[a.u64(0) as usize]);
        }
        userq::firmware::need(a, 1, d.workgroup_count(), 8)
    }
    fn run(&self, a: &Args, wg: &mut Workgroup, _: &Checkpoint<'_>) -> WorkgroupStatus {
        let out = a.buffer(1).words64();
        let at = if wg.index == a.u64(0) {
            out.len()
        } else {
            wg.index as usize
        };
        out[at].store(1, Ordering::Relaxed);
        WorkgroupStatus::Done
    }
    fn bounded(&self) -> bool {
        self.bounded
    }
}

const ID: u32 = kernels::FIRST_CUSTOM + 7;

fn device(bounded: bool) -> Env {
    Env::with(
        Device::builder()
            .engines(2)
            .kernel(ID, Arc::new(Faulty { bounded })),
    )
}

/// A dispatch of `workgroups` workgroups of 64 items, workgroup `bad` raising.
fn dispatch(workgroups: u32, bad: u64, out: &userq::Buffer<u64>) -> Command {
    Command::dispatch(
        ID,
        [64 * workgroups, 1, 1],
        [64, 1, 1],
        &[
            KernelArg::U64(bad),
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
    q.submit(dispatch(workgroups, NONE, &out))
        .unwrap()
        .wait(LONG)
        .expect("a clean dispatch completes");
    assert_eq!(out.to_vec(), vec![1; workgroups as usize]);
}

#[test]
fn a_kernel_that_panics_on_the_engines_stops_its_queue_and_the_engines_serve_on() {
    let env = device(false);
    let dev = env.dev();
    // Another queue's work, submitted first and still running while the kernels raise.
    let theirs = dev.alloc::<u64>(400).unwrap();
    let mut other = dev.create_queue().unwrap();
    let done = other.submit(dispatch(400, NONE, &theirs)).unwrap();
    // More raising dispatches than engines: an engine that died with its kernel would
    // leave none for the last ones (or for the clean work after them).
    for round in 0..5u64 {
        let out = dev.alloc::<u64>(16).unwrap();
        let bad = 3 + round;
        assert_eq!(
            raised(dev, dispatch(16, bad, &out)),
            (ErrorCode::KernelException, bad, ID),
            "round {round}"
        );
    }
    done.wait(LONG).expect("the other queue's work completes");
    assert_eq!(theirs.to_vec(), vec![1; 400]);
    runs_clean(dev, 64);
    // A queue of the context that raised is stopped, not the context: a new one runs.
    let mut q = dev.create_queue().unwrap();
    q.submit(Command::nop()).unwrap().wait(LONG).unwrap();
}

#[test]
fn a_small_kernel_that_panics_on_the_command_processor_stops_only_its_queue() {
    // Bounded, one workgroup: the command processor runs it itself (inline).
    let env = device(true);
    let dev = env.dev();
    for _ in 0..3 {
        let out = dev.alloc::<u64>(1).unwrap();
        assert_eq!(
            raised(dev, dispatch(1, 0, &out)),
            (ErrorCode::KernelException, 0, ID)
        );
    }
    assert!(!dev.is_lost(), "the firmware lives on");
    runs_clean(dev, 1);
    runs_clean(dev, 40);
}

#[test]
fn a_kernel_whose_argument_check_panics_stops_its_queue_before_any_workgroup() {
    let env = device(false);
    let dev = env.dev();
    let out = dev.alloc::<u64>(4).unwrap();
    assert_eq!(
        raised(dev, dispatch(4, IN_VALIDATE, &out)),
        (ErrorCode::KernelException, u64::MAX, ID)
    );
    assert_eq!(out.to_vec(), vec![0; 4], "no workgroup ran");
    runs_clean(dev, 4);
}
