//! Criterion micro-benchmarks of the host-side paths against an embedded device:
//! submit cost, NOP round trips (spinning and blocking), batch throughput, and a fence
//! signal waking a waiter in another thread.
//!
//! cargo bench -p userq-benches

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::time::Duration;
use userq::{Command, Device, OpenMode, WaitMode};

fn device() -> (Device, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("userq-criterion-{}", std::process::id()));
    let dev = Device::builder()
        .socket(dir.join("dev.sock"))
        .mode(OpenMode::Embedded)
        .open()
        .expect("embedded device");
    (dev, dir)
}

fn host_paths(c: &mut Criterion) {
    let (dev, dir) = device();
    let long = Duration::from_secs(10);

    let mut q = dev.queue().ring_entries(65536).create().expect("queue");
    c.bench_function("submit one NOP (no wait)", |b| {
        b.iter(|| {
            if q.ring_entries() - (q.last_submitted().value() - q.timeline().value()) < 1024 {
                q.finish(long).expect("finish");
            }
            q.enqueue(&[Command::nop()]).expect("submit")
        })
    });
    q.finish(long).expect("finish");

    let mut q = dev.queue().ring_entries(1024).create().expect("queue");
    for (name, mode) in [("spin", WaitMode::Spin), ("block", WaitMode::Block)] {
        c.bench_function(&format!("NOP round trip, {name}"), |b| {
            b.iter(|| {
                q.submit(Command::nop())
                    .expect("submit")
                    .wait_with(mode, long)
                    .expect("wait")
            })
        });
    }

    let mut group = c.benchmark_group("batched NOPs");
    let mut q = dev.queue().ring_entries(4096).create().expect("queue");
    for batch in [1usize, 16, 256] {
        let cmds = vec![Command::nop(); batch];
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_with_input(BenchmarkId::from_parameter(batch), &batch, |b, _| {
            b.iter(|| {
                q.submit_batch(&cmds)
                    .expect("submit")
                    .wait_with(WaitMode::Spin, long)
                    .expect("wait")
            })
        });
    }
    group.finish();

    let ping = dev.create_fence(0).expect("fence");
    let pong = dev.create_fence(0).expect("fence");
    let (p2, q2) = (ping.clone(), pong.clone());
    let echo = std::thread::spawn(move || {
        let mut v = 1;
        while p2.wait(v, long).is_ok() && p2.value() != u64::MAX {
            if q2.signal(v).is_err() {
                break;
            }
            v += 1;
        }
    });
    let mut v = 0;
    c.bench_function(
        "host fence signal -> wait in another thread and back",
        |b| {
            b.iter(|| {
                v += 1;
                ping.signal(v).expect("signal");
                pong.wait(v, long).expect("wait");
            })
        },
    );
    ping.signal(u64::MAX).expect("stop the echo thread");
    let _ = echo.join();
    drop((ping, pong, dev));
    let _ = std::fs::remove_dir_all(dir);
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = host_paths
}
criterion_main!(benches);
