//! Every built-in kernel against a CPU reference, with sizes that are not multiples of the
//! workgroup; bad dispatches; custom kernels; engines running queues side by side.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use userq::firmware::{ArgError, ArgKind, Args, Checkpoint, Kernel, Workgroup, WorkgroupStatus};
use userq::{kernels, Command, Device, ErrorCode, KernelArg, WaitError};

mod common;
use common::Env;

const LONG: Duration = Duration::from_secs(20);

/// A deterministic pseudo-random sequence (xorshift), so the references are reproducible.
fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s % 2001) as f32 - 1000.0) / 250.0
        })
        .collect()
}

fn upload(dev: &Device, v: &[f32]) -> userq::Buffer<f32> {
    let mut b = dev.alloc::<f32>(v.len()).unwrap();
    b.copy_from_slice(v);
    b
}

fn run(dev: &Device, cmd: Command) {
    let mut q = dev.create_queue().unwrap();
    q.submit(cmd).unwrap().wait(LONG).unwrap();
}

#[test]
fn elementwise_kernels_match_the_cpu() {
    let env = Env::new();
    let dev = env.dev();
    let n = 4097; // 16 full workgroups of 256 and one of 1
    let (x, y) = (data(n, 1), data(n, 2));
    let (bx, by, bc) = (
        upload(dev, &x),
        upload(dev, &y),
        dev.alloc::<f32>(n).unwrap(),
    );

    run(dev, kernels::axpy(n as u32, 2.5, &bx, &by).unwrap());
    let want: Vec<f32> = x.iter().zip(&y).map(|(a, b)| 2.5 * a + b).collect();
    assert_eq!(by.to_vec(), want);

    run(dev, kernels::scale(n as u32, -0.5, &bx).unwrap());
    let sx: Vec<f32> = x.iter().map(|a| -0.5 * a).collect();
    assert_eq!(bx.to_vec(), sx);

    run(dev, kernels::add(n as u32, &bx, &by, &bc).unwrap());
    assert_eq!(
        bc.to_vec(),
        sx.iter().zip(&want).map(|(a, b)| a + b).collect::<Vec<_>>()
    );
    run(dev, kernels::mul(n as u32, &bx, &by, &bc).unwrap());
    assert_eq!(
        bc.to_vec(),
        sx.iter().zip(&want).map(|(a, b)| a * b).collect::<Vec<_>>()
    );

    let mut src = dev.alloc::<u32>(1000).unwrap();
    let words: Vec<u32> = (0..1000).map(|i| i * 7 + 3).collect();
    src.copy_from_slice(&words);
    let dst = dev.alloc::<u32>(1000).unwrap();
    run(dev, kernels::copy_u32(999, &src, &dst).unwrap());
    let got = dst.to_vec();
    assert_eq!(&got[..999], &words[..999]);
    assert_eq!(got[999], 0, "item n is not touched");
    run(dev, kernels::fill_u32(777, 0xabcd, &dst).unwrap());
    let got = dst.to_vec();
    assert!(got[..777].iter().all(|&v| v == 0xabcd) && got[777] == words[777]);
}

#[test]
fn reductions_are_deterministic_per_workgroup_and_match_the_cpu() {
    let env = Env::new();
    let dev = env.dev();
    let n = 1000u32;
    let (x, y) = (data(n as usize, 3), data(n as usize, 4));
    let (bx, by) = (upload(dev, &x), upload(dev, &y));
    let parts = dev.alloc::<f32>(kernels::workgroups(n)).unwrap();
    let chunks = |v: &[f32]| -> Vec<f32> { v.chunks(256).map(|c| c.iter().sum()).collect() };

    run(dev, kernels::reduce_sum_f32(n, &bx, &parts).unwrap());
    assert_eq!(
        parts.to_vec(),
        chunks(&x),
        "same order as a sequential sum per workgroup"
    );
    run(dev, kernels::dot(n, &bx, &by, &parts).unwrap());
    let prods: Vec<f32> = x.iter().zip(&y).map(|(a, b)| a * b).collect();
    assert_eq!(parts.to_vec(), chunks(&prods));

    let mut xs = dev.alloc::<u64>(n as usize).unwrap();
    let vals: Vec<u64> = (0..n as u64)
        .map(|i| i * i * 1_000_003 + u64::MAX / 3)
        .collect();
    xs.copy_from_slice(&vals);
    let p64 = dev.alloc::<u64>(kernels::workgroups(n)).unwrap();
    run(dev, kernels::reduce_sum_u64(n, &xs, &p64).unwrap());
    let total = p64.to_vec().iter().fold(0u64, |a, b| a.wrapping_add(*b));
    assert_eq!(total, vals.iter().fold(0u64, |a, b| a.wrapping_add(*b)));
}

#[test]
fn gemm_matches_a_naive_cpu_product_on_ragged_sizes() {
    let env = Env::new();
    let dev = env.dev();
    let (m, n, k) = (37usize, 23usize, 19usize);
    let (a, b) = (data(m * k, 5), data(k * n, 6));
    let (ba, bb, bc) = (
        upload(dev, &a),
        upload(dev, &b),
        dev.alloc::<f32>(m * n).unwrap(),
    );
    run(
        dev,
        kernels::gemm(m as u32, n as u32, k as u32, &ba, &bb, &bc).unwrap(),
    );
    let got = bc.to_vec();
    for r in 0..m {
        for c in 0..n {
            let want: f32 = (0..k).map(|i| a[r * k + i] * b[i * n + c]).sum();
            let g = got[r * n + c];
            assert!(
                (g - want).abs() <= 1e-3 * want.abs().max(1.0),
                "C[{r}][{c}] = {g}, want {want}"
            );
        }
    }
}

#[test]
fn scan_histogram_and_checksum_match_the_cpu() {
    let env = Env::new();
    let dev = env.dev();
    let n = 3001usize;
    let input: Vec<u32> = (0..n as u32)
        .map(|i| i.wrapping_mul(2_654_435_761) >> 7)
        .collect();
    let mut bin = dev.alloc::<u32>(n).unwrap();
    bin.copy_from_slice(&input);

    let out = dev.alloc::<u32>(n).unwrap();
    run(
        dev,
        kernels::exclusive_scan_u32(n as u32, &bin, &out).unwrap(),
    );
    let mut acc = 0u32;
    let want: Vec<u32> = input
        .iter()
        .map(|v| {
            let o = acc;
            acc = acc.wrapping_add(*v);
            o
        })
        .collect();
    assert_eq!(out.to_vec(), want);

    let hist = dev.alloc::<u32>(17).unwrap();
    run(dev, kernels::histogram_u32(n as u32, &bin, &hist).unwrap());
    let mut h = vec![0u32; 17];
    input.iter().for_each(|v| h[(*v % 17) as usize] += 1);
    assert_eq!(hist.to_vec(), h);

    let parts = dev.alloc::<u32>(kernels::workgroups(n as u32)).unwrap();
    run(dev, kernels::checksum_u32(n as u32, &bin, &parts).unwrap());
    let fnv = |w: &[u32]| {
        let mut h: u32 = 0x811c_9dc5;
        for x in w {
            for b in x.to_le_bytes() {
                h = (h ^ b as u32).wrapping_mul(0x0100_0193);
            }
        }
        h
    };
    let want: Vec<u32> = input.chunks(256).map(fnv).collect();
    assert_eq!(parts.to_vec(), want);
}

fn fault(r: Result<(), WaitError>) -> (ErrorCode, u32, u64) {
    match r {
        Err(WaitError::Faulted(f)) => (f.code.expect("known"), f.detail, f.address),
        other => panic!("expected a fault, got {other:?}"),
    }
}

#[test]
fn bad_dispatches_stop_only_their_queue_with_a_typed_error() {
    let env = Env::new();
    let dev = env.dev();
    let small = dev.alloc::<f32>(10).unwrap();
    let big = dev.alloc::<f32>(100).unwrap();
    let submit = |cmd: Command| {
        let mut q = dev.create_queue().unwrap();
        let r = q.submit(cmd).unwrap().wait(LONG);
        (fault(r), big.to_vec())
    };
    let addr = |b: &userq::Buffer<f32>| KernelArg::Address(b.device_address());

    let ((code, detail, _), _) = submit(Command::dispatch(999, [1, 1, 1], [1, 1, 1], &[]));
    assert_eq!((code, detail), (ErrorCode::UnknownKernel, 999));
    // Wrong count.
    let ((code, _, _), _) = submit(Command::dispatch(
        kernels::SCALE_F32,
        [10, 1, 1],
        [1, 1, 1],
        &[KernelArg::U64(10)],
    ));
    assert_eq!(code, ErrorCode::BadKernelArgs);
    // A buffer too small for n: nothing may be written past it (or anywhere).
    let ((code, detail, address), after) = submit(Command::dispatch(
        kernels::AXPY_F32,
        [100, 1, 1],
        [32, 1, 1],
        &[
            KernelArg::U64(100),
            KernelArg::F32(1.0),
            addr(&small),
            addr(&big),
        ],
    ));
    assert_eq!(
        (code, detail, address),
        (ErrorCode::BadKernelArgs, 2, small.device_address())
    );
    assert!(after.iter().all(|&v| v == 0.0));
    // An address outside the VM.
    let ((code, detail, _), _) = submit(Command::dispatch(
        kernels::SCALE_F32,
        [1, 1, 1],
        [1, 1, 1],
        &[
            KernelArg::U64(1),
            KernelArg::F32(1.0),
            KernelArg::Address(0xdead_0000),
        ],
    ));
    assert_eq!((code, detail), (ErrorCode::BadKernelArgs, 2));
    // An f32 argument with garbage in its high half.
    let ((code, detail, _), _) = submit(Command::dispatch(
        kernels::SCALE_F32,
        [1, 1, 1],
        [1, 1, 1],
        &[KernelArg::U64(1), KernelArg::U64(1 << 40), addr(&big)],
    ));
    assert_eq!((code, detail), (ErrorCode::BadKernelArgs, 1));
    // Grids of zero, and too large workgroups.
    for (grid, wg) in [
        ([0, 1, 1], [1, 1, 1]),
        ([8, 1, 1], [0, 1, 1]),
        ([8, 8, 1], [64, 64, 1]),
    ] {
        let ((code, _, _), _) = submit(Command::dispatch(
            kernels::SPIN,
            grid,
            wg,
            &[KernelArg::U64(1)],
        ));
        assert_eq!(code, ErrorCode::BadGrid, "{grid:?} {wg:?}");
    }
    // The host-side helpers refuse what they can see.
    assert!(matches!(
        kernels::axpy(100, 1.0, &small, &big),
        Err(kernels::LaunchError::BufferTooSmall {
            arg: 2,
            len: 10,
            needed: 100
        })
    ));
    // The device still runs good work.
    run(dev, kernels::scale(100, 2.0, &big).unwrap());
}

/// A custom kernel: out[i] = i * i.
struct Squares;
impl Kernel for Squares {
    fn name(&self) -> &str {
        "squares"
    }
    fn signature(&self) -> &[ArgKind] {
        &[ArgKind::U64, ArgKind::Buffer]
    }
    fn validate(&self, a: &Args, _: &userq::uapi::packet::Dispatch) -> Result<(), ArgError> {
        userq::firmware::need(a, 1, a.u64(0), 8)
    }
    fn run(&self, a: &Args, wg: &mut Workgroup, _: &Checkpoint<'_>) -> WorkgroupStatus {
        let out = a.buffer(1).words64();
        for i in wg.range(0) {
            if i < a.u64(0) {
                out[i as usize].store(i * i, Ordering::Relaxed);
            }
        }
        WorkgroupStatus::Done
    }
}

#[test]
fn a_custom_kernel_registered_on_an_embedded_device_runs() {
    let id = kernels::FIRST_CUSTOM + 1;
    let env = Env::with(Device::builder().kernel(id, Arc::new(Squares)));
    let dev = env.dev();
    let out = dev.alloc::<u64>(300).unwrap();
    run(
        dev,
        Command::dispatch(
            id,
            [300, 1, 1],
            [64, 1, 1],
            &[
                KernelArg::U64(300),
                KernelArg::Address(out.device_address()),
            ],
        ),
    );
    assert_eq!(out.to_vec(), (0..300u64).map(|i| i * i).collect::<Vec<_>>());
}

#[test]
fn a_long_dispatch_does_not_hold_up_another_queue() {
    let env = Env::new();
    let dev = env.dev();
    // Seconds of work: more than the default job timeout allows.
    let mut long = dev
        .queue()
        .job_timeout(Duration::from_secs(60))
        .create()
        .unwrap();
    let mut short = dev.create_queue().unwrap();
    // 400 workgroups of 5 ms: 2 s of work on one engine.
    let busy = long.submit(kernels::spin(400, 5_000_000).unwrap()).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let t = Instant::now();
    let out = dev.alloc::<f32>(1000).unwrap();
    short
        .submit(kernels::scale(1000, 1.0, &out).unwrap())
        .unwrap()
        .wait(LONG)
        .unwrap();
    let waited = t.elapsed();
    assert!(
        busy.poll() == Ok(false),
        "the long dispatch is still running"
    );
    assert!(
        waited < Duration::from_millis(500),
        "a small dispatch waited {waited:?} behind a long one"
    );
    busy.wait(LONG).unwrap();
}
