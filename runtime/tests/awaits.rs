//! Fence points awaited as futures: many at once on one thread, and a failed queue's fault
//! reaching the awaiter.

use std::time::{Duration, Instant};
use userq::{Command, ErrorCode};

mod common;
use common::{fault_code, Env};

const LONG: Duration = Duration::from_secs(10);

/// A minimal executor: one thread polls every future, parking between wake-ups.
fn block_on_all<F: std::future::Future + Unpin>(mut futures: Vec<F>) -> Vec<F::Output> {
    use std::task::{Context, Poll, Wake, Waker};
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(std::sync::Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut out: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    let deadline = Instant::now() + LONG;
    while out.iter().any(Option::is_none) {
        for (f, o) in futures.iter_mut().zip(out.iter_mut()) {
            if o.is_none() {
                if let Poll::Ready(v) = std::pin::Pin::new(f).poll(&mut cx) {
                    *o = Some(v);
                }
            }
        }
        assert!(Instant::now() < deadline, "futures did not complete");
        std::thread::park_timeout(Duration::from_millis(500));
    }
    out.into_iter().map(|o| o.expect("ready")).collect()
}

#[test]
fn fence_points_can_be_awaited_without_a_thread_per_waiter() {
    use std::future::IntoFuture;
    let env = Env::new();
    let dev = env.dev();
    let fences: Vec<_> = (0..64).map(|_| dev.create_fence(0).unwrap()).collect();
    let mut q = dev.create_queue().unwrap();
    let gate = dev.create_fence(0).unwrap();
    let queued = q
        .submit_batch(&[Command::wait(&gate.point(1)), Command::nop()])
        .unwrap();
    let mut futures: Vec<_> = fences.iter().map(|f| f.point(3).into_future()).collect();
    futures.push(queued.into_future());
    let signaller = {
        let fences = fences.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            for i in (0..64).map(|i| (i * 37) % 64) {
                fences[i].signal(3).unwrap();
            }
            gate.signal(1).unwrap();
        })
    };
    let results = block_on_all(futures);
    signaller.join().unwrap();
    assert_eq!(results.len(), 65);
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
}

#[test]
fn an_awaited_point_on_a_failed_queue_returns_the_fault() {
    use std::future::IntoFuture;
    let env = Env::new();
    let mut q = env.dev().create_queue().unwrap();
    let p = q.submit(Command::write_value(0x10, 1)).unwrap();
    let r = block_on_all(vec![p.into_future()]);
    assert_eq!(
        fault_code(r.into_iter().next().unwrap()),
        ErrorCode::MemoryViolation
    );
}
