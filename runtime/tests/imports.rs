//! A fence imported more than once into one context: the imports share the context's one
//! handle on it (as DRM PRIME shares a GEM handle), and dropping some leaves the others
//! working, in the firmware as on the host.

mod common;
use common::Env;
use std::time::Duration;
use userq::{Command, WaitMode};

const LONG: Duration = Duration::from_secs(10);

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
    // With every import gone, a new one works from scratch.
    drop(third);
    let again = b.import_fence(fa.export().unwrap()).unwrap();
    assert_eq!(again.value(), 2);
    let p = qb.submit(Command::signal(&again, 3)).unwrap();
    p.wait(LONG).unwrap();
    assert_eq!(fa.value(), 3);
}
