//! On-demand paging in one process (embedded device): faults, eviction, refaults,
//! exact results after replays, memory violations, frees under running kernels, and the
//! pool's residency read from the OS.

mod common;
use common::Env;
use std::time::Duration;
use userq::{kernels, Device, ErrorCode, WaitError};
use userq_uapi::observe::Observer;
use userq_uapi::paging::DEVICE_PAGE;

const LONG: Duration = Duration::from_secs(60);
/// 16 device pages of device memory.
const VRAM: u64 = 16 * DEVICE_PAGE;

fn words_per_page() -> usize {
    (DEVICE_PAGE / 4) as usize
}

#[test]
fn a_working_set_four_times_the_budget_streams_with_exact_results() {
    let env = Env::with(Device::builder().vram(VRAM));
    let dev = env.dev();
    // 64 pages of data through 16 pages of device memory.
    let n = 64 * words_per_page();
    let mut x = dev.alloc_on_demand::<u32>(n).unwrap();
    let init: Vec<u32> = (0..n as u32).collect();
    x.copy_from_slice(&init);
    let mut q = dev
        .queue()
        .long_running(Duration::from_secs(10))
        .create()
        .unwrap();
    // 2 persistent workgroups, each streaming its half (32 pages, twice the budget) 3
    // times: every pass refaults what the previous one evicted.
    let done = q
        .submit(kernels::stream_add_u32(n as u32, 3, (n / 2) as u32, &x).unwrap())
        .unwrap();
    done.wait(LONG).unwrap();
    let got = x.to_vec();
    for (i, v) in got.iter().enumerate() {
        assert_eq!(*v, i as u32 + 3, "word {i}");
    }
    let s = dev.paging_stats().unwrap();
    assert!(s.faults >= 64 * 3, "{s:?}");
    assert!(s.pages_out >= 64, "{s:?}");
    assert!(s.refaults > 0, "{s:?}");
    assert_eq!(s.budget_pages, 16);
    assert!(s.peak_resident_pages <= 16, "{s:?}");
    // After to_vec every page went back to the host (the OS's view: tests/pool.rs).
    assert_eq!(s.resident_pages, 0, "{s:?}");
    // The telemetry carries every counter PAGING_STATS gives (kmd-shim publishes them
    // as it releases the pager; bounded wait for that store).
    let obs = Observer::connect(dev.socket_path()).expect("observe");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while obs.snapshot().paging != s && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(obs.snapshot().paging, s);
}

#[test]
fn reductions_and_histograms_are_exact_after_faults() {
    let env = Env::with(Device::builder().vram(8 * DEVICE_PAGE));
    let dev = env.dev();
    let n = 40 * words_per_page();
    let mut input = dev.alloc_on_demand::<u32>(n).unwrap();
    let data: Vec<u32> = (0..n as u32)
        .map(|i| i.wrapping_mul(2654435761) % 97)
        .collect();
    input.copy_from_slice(&data);
    let hist = dev.alloc_on_demand::<u32>(97).unwrap();
    let mut q = dev.create_queue().unwrap();
    q.submit(kernels::histogram_u32(n as u32, &input, &hist).unwrap())
        .unwrap()
        .wait(LONG)
        .unwrap();
    let mut want = vec![0u32; 97];
    for v in &data {
        want[*v as usize] += 1;
    }
    assert_eq!(hist.to_vec(), want);
    let s = dev.paging_stats().unwrap();
    // Every input page came in (faulted or fetched ahead of its workgroup), and the
    // budget forced evictions.
    assert!(s.faults > 0 && s.pages_in >= 40 && s.pages_out > 0, "{s:?}");
}

#[test]
fn an_address_outside_every_mapping_stops_only_that_queue() {
    let env = Env::with(Device::builder().vram(VRAM));
    let dev = env.dev();
    let n = 4 * words_per_page();
    let x = dev.alloc_on_demand::<u32>(n).unwrap();
    let mut good = dev.create_queue().unwrap();
    let mut bad = dev.create_queue().unwrap();
    let freed = dev.alloc_on_demand::<u32>(n).unwrap();
    let va = freed.device_address();
    drop(freed);
    good.submit(kernels::fill_u32(n as u32, 9, &x).unwrap())
        .unwrap()
        .wait(LONG)
        .unwrap();
    assert!(x.to_vec().iter().all(|&v| v == 9));
    // A raw dispatch at the freed address: refused, naming it; only that queue stops.
    let stale = userq::Command::dispatch(
        userq_uapi::kernels::FILL_U32,
        [64, 1, 1],
        [64, 1, 1],
        &[
            userq::KernelArg::U64(64),
            userq::KernelArg::U64(1),
            userq::KernelArg::U64(va),
        ],
    );
    match bad.submit(stale).unwrap().wait(LONG) {
        Err(WaitError::Faulted(f)) => {
            assert_eq!(f.code, Some(ErrorCode::BadKernelArgs));
            assert_eq!((f.address, f.detail), (va, 2), "the address, as argument 2");
        }
        other => panic!("expected a fault, got {other:?}"),
    }
    // The other queue goes on.
    good.submit(kernels::fill_u32(n as u32, 5, &x).unwrap())
        .unwrap()
        .wait(LONG)
        .unwrap();
    assert!(x.to_vec().iter().all(|&v| v == 5));
}

#[test]
fn bad_budgets_and_sizes_are_typed_errors() {
    let dir = std::env::temp_dir().join(format!("userq-paging-bad-{}", std::process::id()));
    let r = Device::builder()
        .vram(DEVICE_PAGE - 1)
        .socket(dir.join("dev.sock"))
        .mode(userq::OpenMode::Embedded)
        .open();
    assert!(r.is_err(), "a budget below one page must be refused");
    let _ = std::fs::remove_dir_all(&dir);
    let env = Env::with(Device::builder().vram(VRAM));
    let dev = env.dev();
    assert!(matches!(
        dev.alloc_on_demand::<u32>(0),
        Err(userq::AllocError::BadSize)
    ));
    assert!(dev.alloc_on_demand::<u8>(usize::MAX).is_err());
    // An on-demand buffer cannot be imported.
    let b = dev.alloc_on_demand::<u32>(16).unwrap();
    let other = env.second();
    assert!(other.import_buffer::<u32>(b.export().unwrap()).is_err());
}

/// One long-running streaming job over twice the budget: it must evict its own pages to
/// go on. Returns how its fence ended.
fn stream_twice_the_budget(builder: userq::DeviceBuilder) -> (Result<(), WaitError>, Env) {
    let env = Env::with(builder.vram(8 * DEVICE_PAGE));
    let n = 16 * words_per_page();
    let r = {
        let dev = env.dev();
        let mut x = dev.alloc_on_demand::<u32>(n).unwrap();
        x.copy_from_slice(&vec![1u32; n]);
        let mut q = dev
            .queue()
            .long_running(Duration::from_secs(10))
            .create()
            .unwrap();
        let r = q
            .submit(kernels::stream_add_u32(n as u32, 2, n as u32, &x).unwrap())
            .unwrap()
            .wait(LONG);
        if r.is_ok() {
            assert!(x.to_vec().iter().all(|&v| v == 3));
        }
        r
    };
    (r, env)
}

#[test]
fn the_counterfactual_policy_deadlocks_where_path_3_finishes() {
    // Path 3 (the default): invalidate, refault, finish.
    let (r, env) = stream_twice_the_budget(Device::builder());
    r.expect("path 3 finishes");
    let s = env.dev().paging_stats().unwrap();
    assert_eq!(s.deadlocks, 0);
    assert!(s.refaults > 0, "{s:?}");
    drop(env);
    // The dma-fence way: eviction waits for the job, the job waits for its fault. The
    // watchdog catches the cycle and the run ends with an error instead of hanging.
    let t = std::time::Instant::now();
    let (r, env) = stream_twice_the_budget(
        Device::builder().eviction_waits_for_jobs(Duration::from_millis(300)),
    );
    match r {
        Err(WaitError::Faulted(f)) => assert_eq!(f.code, Some(ErrorCode::EvictionDeadlock)),
        other => panic!("expected the deadlock to be caught, got {other:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(30));
    assert_eq!(env.dev().paging_stats().unwrap().deadlocks, 1);
}

#[test]
fn pages_of_a_running_long_running_kernel_are_evicted_and_refaulted() {
    let env = Env::with(Device::builder().vram(12 * DEVICE_PAGE));
    let dev = env.dev();
    let other = env.second();
    let nx = 8 * words_per_page();
    let mut x = dev.alloc_on_demand::<u32>(nx).unwrap();
    x.copy_from_slice(&vec![0u32; nx]);
    let mut long = dev
        .queue()
        .long_running(Duration::from_secs(10))
        .create()
        .unwrap();
    let passes = 40;
    let streaming = long
        .submit(kernels::stream_add_u32(nx as u32, passes, nx as u32, &x).unwrap())
        .unwrap();
    // Another context fills 12 pages again and again: the pool cannot hold both, so the
    // streaming kernel's pages are invalidated under it.
    let ny = 12 * words_per_page();
    let y = other.alloc_on_demand::<u32>(ny).unwrap();
    let mut q = other.create_queue().unwrap();
    for round in 0..10u32 {
        q.submit(kernels::fill_u32(ny as u32, round, &y).unwrap())
            .unwrap()
            .wait(LONG)
            .unwrap();
    }
    assert!(y.to_vec().iter().all(|&v| v == 9));
    streaming.wait(LONG).unwrap();
    assert!(x.to_vec().iter().all(|&v| v == passes));
    let s = dev.paging_stats().unwrap();
    assert!(s.refaults > 0 && s.pages_out > 0, "{s:?}");
    assert!(s.peak_resident_pages <= 12, "{s:?}");
}

/// A dispatch that names an on-demand buffer by its address only (holding nothing), as a
/// raw client would: the buffer can then be freed while the kernel runs.
fn raw_stream(va: u64, n: usize, passes: u64) -> userq::Command {
    userq::Command::dispatch(
        userq_uapi::kernels::STREAM_ADD_U32,
        [1, 1, 1],
        [1, 1, 1],
        &[
            userq::KernelArg::U64(n as u64),
            userq::KernelArg::U64(passes),
            userq::KernelArg::U64(n as u64),
            userq::KernelArg::U64(va),
        ],
    )
}

#[test]
fn a_buffer_freed_under_its_running_kernel_stops_that_queue_only() {
    let env = Env::with(Device::builder().vram(8 * DEVICE_PAGE));
    let dev = env.dev();
    let other = env.second();
    // Another context's data, to check that nothing touches it.
    let n_other = 6 * words_per_page();
    let mut mine = other.alloc_on_demand::<u32>(n_other).unwrap();
    mine.copy_from_slice(&vec![11; n_other]);
    let mut oq = other.create_queue().unwrap();

    let n = 16 * words_per_page();
    let x = dev.alloc_on_demand::<u32>(n).unwrap();
    let mut q = dev
        .queue()
        .long_running(Duration::from_secs(10))
        .create()
        .unwrap();
    let running = q
        .submit(raw_stream(x.device_address(), n, 1_000_000))
        .unwrap();
    // Let it fault and stream a while, then free the buffer under it.
    let t = std::time::Instant::now();
    while dev.paging_stats().unwrap().faults < 20 {
        assert!(t.elapsed() < LONG, "the kernel never faulted");
        std::thread::sleep(Duration::from_millis(1));
    }
    let va = x.device_address();
    drop(x);
    match running.wait(LONG) {
        Err(WaitError::Faulted(f)) => {
            assert_eq!(f.code, Some(ErrorCode::BufferFreed), "{f:?}");
            assert_eq!(f.address, va);
        }
        other => panic!("expected BufferFreed, got {other:?}"),
    }
    // The other context's work and data are untouched.
    oq.submit(kernels::fill_u32(16, 3, &mine).unwrap())
        .unwrap()
        .wait(LONG)
        .unwrap();
    let got = mine.to_vec();
    assert!(got[..16].iter().all(|&v| v == 3));
    assert!(got[16..].iter().all(|&v| v == 11));
}

#[test]
fn faults_racing_with_frees_give_typed_errors_and_touch_no_other_vm() {
    let env = Env::with(Device::builder().vram(8 * DEVICE_PAGE));
    let dev = env.dev();
    let other = env.second();
    let n_other = 4 * words_per_page();
    let mut theirs = other.alloc_on_demand::<u32>(n_other).unwrap();
    theirs.copy_from_slice(&vec![7; n_other]);
    let mut tq = other.create_queue().unwrap();
    let n = 8 * words_per_page();
    let mut outcomes = std::collections::BTreeMap::new();
    for round in 0..40u64 {
        let x = dev.alloc_on_demand::<u32>(n).unwrap();
        let mut q = dev
            .queue()
            .long_running(Duration::from_secs(10))
            .create()
            .unwrap();
        let f = q.submit(raw_stream(x.device_address(), n, 2)).unwrap();
        // Free at a different point of the kernel's progress each round.
        let spins = round * 997 % 20_000;
        for _ in 0..spins {
            std::hint::spin_loop();
        }
        drop(x);
        let outcome = match f.wait(LONG) {
            Ok(()) => "completed".to_string(),
            Err(WaitError::Faulted(fault)) => {
                let code = fault.code.expect("a known code");
                assert!(
                    matches!(
                        code,
                        ErrorCode::BufferFreed
                            | ErrorCode::MemoryViolation
                            | ErrorCode::BadKernelArgs
                    ),
                    "round {round}: {fault:?}"
                );
                format!("{code:?}")
            }
            Err(e) => panic!("round {round}: {e:?}"),
        };
        *outcomes.entry(outcome).or_insert(0) += 1;
        // The other context works on, and its data is intact.
        tq.submit(kernels::fill_u32(8, round as u32, &theirs).unwrap())
            .unwrap()
            .wait(LONG)
            .unwrap();
        let got = theirs.to_vec();
        assert!(got[..8].iter().all(|&v| v == round as u32));
        assert!(
            got[8..].iter().all(|&v| v == 7),
            "round {round}: another VM was touched"
        );
    }
    assert!(
        outcomes.len() > 1 || outcomes.contains_key("BufferFreed"),
        "{outcomes:?}"
    );
}

/// Round trips of a small dispatch on an ordinary buffer for `span`: their durations,
/// sorted.
fn round_trips(dev: &Device, span: Duration) -> Vec<Duration> {
    let b = dev.alloc::<u32>(256).unwrap();
    let mut q = dev.create_queue().unwrap();
    let start = std::time::Instant::now();
    let mut t = Vec::new();
    while start.elapsed() < span {
        let s = std::time::Instant::now();
        q.submit(kernels::fill_u32(256, t.len() as u32, &b).unwrap())
            .unwrap()
            .wait(LONG)
            .unwrap();
        t.push(s.elapsed());
    }
    t.sort();
    t
}

#[test]
fn another_contexts_fault_storm_delays_round_trips_by_at_most_a_few_time_slices() {
    let env = Env::with(Device::builder().vram(8 * DEVICE_PAGE));
    let dev = env.dev();
    let innocent = env.second();
    let quiet = round_trips(&innocent, Duration::from_millis(300));
    // A fault storm: a streaming workgroup over four times the budget (every page it
    // reaches was evicted by the ones before it).
    let n = 32 * words_per_page();
    let x = dev.alloc_on_demand::<u32>(n).unwrap();
    let mut q = dev
        .queue()
        .long_running(Duration::from_secs(10))
        .create()
        .unwrap();
    let storm = q
        .submit(kernels::stream_add_u32(n as u32, 1000, n as u32, &x).unwrap())
        .unwrap();
    let faults_before = dev.paging_stats().unwrap().faults;
    let busy = round_trips(&innocent, Duration::from_secs(1));
    let faults = dev.paging_stats().unwrap().faults - faults_before;
    drop(q); // destroys the queue: the storm stops
    let _ = storm.wait(LONG);
    let p99 = |t: &[Duration]| t[t.len() * 99 / 100];
    assert!(faults > 50, "no storm happened ({faults} faults)");
    // The engine is shared in 1 ms slices; paging work runs in kmd-shim, not on the
    // command processor or the engines, so the innocent queue waits for slices, not for
    // fault service. Generous bound: 50 ms.
    assert!(
        p99(&busy) < Duration::from_millis(50),
        "p99 {:?} during {faults} faults, {:?} quiet",
        p99(&busy),
        p99(&quiet)
    );
}

#[test]
fn small_dispatches_on_on_demand_buffers_run_on_the_command_processor_and_fault_from_there() {
    // One workgroup's worth of items: the command processor runs it itself, paged or not.
    const ITEMS: u32 = userq::uapi::packet::MAX_WORKGROUP_ITEMS as u32;
    let env = Env::with(Device::builder().engines(1).vram(VRAM));
    let dev = env.dev();
    let obs = Observer::connect(dev.socket_path()).expect("observe");
    let buf = dev.alloc_on_demand::<u32>(ITEMS as usize).unwrap();
    let mut q = dev.create_queue().unwrap();
    // The first one faults (no page is resident yet); the next ten find the page resident.
    // No host access in between: it would migrate the page back.
    for i in 0..11 {
        q.submit(kernels::fill_u32(ITEMS, i, &buf).unwrap())
            .unwrap()
            .wait(LONG)
            .unwrap();
    }
    assert_eq!(buf.to_vec(), vec![10; ITEMS as usize]);
    let per = ITEMS as u64 / 256; // fill's workgroups of 256 items
    let total = 11 * per;
    // The figures arrive with the firmware's 10 ms tick.
    let t = std::time::Instant::now();
    let snap = loop {
        let s = obs.snapshot();
        let all = s.inline.workgroups + s.engines.iter().map(|e| e.workgroups).sum::<u64>();
        if all >= total || t.elapsed() > Duration::from_secs(10) {
            break s;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let engines: u64 = snap.engines.iter().map(|e| e.workgroups).sum();
    assert_eq!(snap.inline.workgroups + engines, total, "{snap:?}");
    // The ten resident ones ran on the command processor; the faulting one resumed there
    // too unless it outlasted one help slice (then the engine took the rest).
    assert!(snap.inline.workgroups >= 10 * per, "{snap:?}");
    let stats = dev.paging_stats().unwrap();
    assert!(stats.faults >= 1, "the first dispatch faulted: {stats:?}");
    // A larger one on cold pages: the command processor helps while the engine wakes,
    // faults from there (its look-ahead bounded), and the engine finishes after the reply.
    let n = 4 * words_per_page();
    let big = dev.alloc_on_demand::<u32>(n).unwrap();
    q.submit(kernels::fill_u32(n as u32, 9, &big).unwrap())
        .unwrap()
        .wait(LONG)
        .unwrap();
    assert_eq!(big.to_vec(), vec![9; n]);
}
