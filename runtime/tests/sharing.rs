//! Fences and buffers across contexts: export and import, the refusals, and a fence
//! imported more than once into one context (the imports share the context's one handle on
//! it, as DRM PRIME shares a GEM handle, and dropping some leaves the others working, in
//! the firmware as on the host).

use std::time::Duration;
use userq::{Command, ErrorCode, SignalError, SubmitError, WaitMode};

mod common;
use common::{fault_code, Env};

const LONG: Duration = Duration::from_secs(10);

#[test]
fn fences_cross_contexts_by_export_and_import() {
    let env = Env::new();
    let a = env.dev();
    let b = env.second();
    let mut qa = a.create_queue().unwrap();
    let mut qb = b.create_queue().unwrap();
    let out = b.alloc::<u64>(2).unwrap();

    // A user fence made by A, signalled by A's queue, waited on by B's queue.
    let fa = a.create_fence(0).unwrap();
    let fb = b.import_fence(fa.export().unwrap()).unwrap();
    qb.submit_batch(&[
        Command::wait(&fb.point(3)),
        Command::write_value(out.address_of(0).unwrap(), 11),
    ])
    .unwrap();
    // A's queue timeline, imported by B: read-only there.
    let ta = b.import_fence(qa.timeline().export().unwrap()).unwrap();
    assert!(ta.is_timeline());
    assert_eq!(ta.signal(1), Err(SignalError::ReadOnly));
    qb.submit_batch(&[
        Command::wait(&ta.point(2)),
        Command::write_value(out.address_of(1).unwrap(), 22),
    ])
    .unwrap();

    qa.submit_batch(&[Command::nop(), Command::signal(&fa, 3)])
        .unwrap();
    qb.finish(LONG).unwrap();
    assert_eq!(out.to_vec(), vec![11, 22]);
}

#[test]
fn a_fence_of_another_connection_is_refused_at_submit() {
    let env = Env::new();
    let other = env.second();
    let theirs = other.create_fence(0).unwrap();
    let mut q = env.dev().create_queue().unwrap();
    assert_eq!(
        q.submit(Command::signal(&theirs, 1)).err(),
        Some(SubmitError::ForeignFence)
    );
    assert_eq!(
        q.submit(Command::wait(&theirs.point(1))).err(),
        Some(SubmitError::ForeignFence)
    );
    assert_eq!(q.timeline().value(), 0, "nothing reached the ring");
}

#[test]
fn a_buffer_exported_to_another_context_is_the_same_memory() {
    let env = Env::new();
    let a = env.dev();
    let b = env.second();
    let mut mine = a.alloc::<u64>(100).unwrap();
    mine.write(7, 42);
    let theirs = b.import_buffer::<u64>(mine.export().unwrap()).unwrap();
    assert_eq!(theirs.len(), 100);
    assert_eq!(theirs.read(7), 42);
    // A queue of the importing context writes through its own device address.
    let mut q = b.create_queue().unwrap();
    q.submit(Command::write_value(theirs.address_of(9).unwrap(), 99))
        .unwrap()
        .wait(LONG)
        .unwrap();
    assert_eq!(mine.read(9), 99);
    // The importer's view ends where the buffer does.
    let r = q
        .submit(Command::write_value(theirs.device_address() + 800, 1))
        .unwrap()
        .wait(LONG);
    assert_eq!(fault_code(r), ErrorCode::MemoryViolation);
    // Freeing the exporter's handle leaves the importer's mapping working.
    drop(mine);
    assert_eq!(theirs.read(9), 99);
    // Only buffers of this device can be imported.
    let fence = a.create_fence(0).unwrap();
    let (state, _) = fence.export().unwrap().into_fds();
    assert!(matches!(
        b.import_buffer::<u64>(userq::ExportedBuffer::from_fd(state)),
        Err(userq::AllocError::NotABuffer)
    ));
}

#[test]
fn dropping_one_import_of_a_fence_leaves_the_others_bound() {
    let env = Env::new();
    let a = env.dev();
    let b = env.second();
    let fa = a.create_fence(0).unwrap();
    let imports: Vec<_> = (0..3)
        .map(|_| b.import_fence(fa.export().unwrap()).unwrap())
        .collect();
    let mut imports = imports.into_iter();
    let (first, second, third) = (
        imports.next().unwrap(),
        imports.next().unwrap(),
        imports.next().unwrap(),
    );
    drop(first);
    // B's queue waits on the fence through the second import and signals it through the
    // third; both need the handle still bound in the firmware.
    let mut qb = b.create_queue().unwrap();
    let out = b.alloc::<u64>(1).unwrap();
    qb.submit_batch(&[
        Command::wait(&second.point(1)),
        Command::write_value(out.address_of(0).unwrap(), 7),
        Command::signal(&third, 2),
    ])
    .unwrap();
    drop(second);
    fa.signal(1).unwrap();
    qb.finish(LONG).unwrap();
    assert_eq!(out.read(0), 7);
    fa.wait_with(2, WaitMode::Block, LONG).unwrap();
    // With every import gone (the queue held the last two for its packets), a new one
    // works from scratch.
    drop(qb);
    drop(third);
    let again = b.import_fence(fa.export().unwrap()).unwrap();
    assert_eq!(again.value(), 2);
    let mut qc = b.create_queue().unwrap();
    let p = qc.submit(Command::signal(&again, 3)).unwrap();
    p.wait(LONG).unwrap();
    assert_eq!(fa.value(), 3);
}
