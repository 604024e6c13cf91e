//! The device-memory pool's residency as the OS sees it, in a test binary of its own so
//! that this process holds exactly one pool: sampled from /proc while a working set four
//! times the budget streams through it, and given back to the OS once the buffer is freed.

mod common;
use common::Env;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use userq::{kernels, Device};
use userq_uapi::paging::DEVICE_PAGE;

const BUDGET: u64 = 16 * DEVICE_PAGE;

/// The pool memfd's allocated bytes, read from /proc/self/fd as any observer would.
fn pool_resident() -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    for e in std::fs::read_dir("/proc/self/fd").ok()?.flatten() {
        let Ok(target) = std::fs::read_link(e.path()) else {
            continue;
        };
        if target.to_string_lossy().starts_with("/memfd:userq-pool (") {
            return std::fs::metadata(e.path()).ok().map(|m| m.blocks() * 512);
        }
    }
    None
}

#[test]
fn the_pool_never_holds_more_than_the_budget_and_gives_memory_back() {
    let env = Env::with(Device::builder().vram(BUDGET));
    let dev = env.dev();
    assert_eq!(pool_resident(), Some(0), "a fresh pool holds nothing");
    let n = (4 * BUDGET / 4) as usize;
    let mut x = dev.alloc_on_demand::<u32>(n).unwrap();
    x.copy_from_slice(&vec![5; n]);
    let stop = Arc::new(AtomicBool::new(false));
    let (peak, samples) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let sampler = {
        let (stop, peak, samples) = (stop.clone(), peak.clone(), samples.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Some(b) = pool_resident() {
                    peak.fetch_max(b, Ordering::Relaxed);
                    samples.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_micros(500));
            }
        })
    };
    let mut q = dev
        .queue()
        .long_running(Duration::from_secs(10))
        .create()
        .unwrap();
    q.submit(kernels::stream_add_u32(n as u32, 4, n as u32, &x).unwrap())
        .unwrap()
        .wait(Duration::from_secs(60))
        .unwrap();
    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    let peak = peak.load(Ordering::Relaxed);
    assert!(samples.load(Ordering::Relaxed) > 0);
    assert!(peak > 0, "the pool never held a page");
    assert!(
        peak <= BUDGET,
        "pool resident {peak} bytes over a {BUDGET}-byte budget"
    );
    assert!(x.to_vec().iter().all(|&v| v == 9));
    // Everything went back to the host; the slots stay allocated for the next pages
    // until the pager has been idle a while (or their buffer is freed): then the OS
    // takes the memory back.
    assert_eq!(dev.paging_stats().unwrap().resident_pages, 0);
    drop(x);
    let t = std::time::Instant::now();
    while pool_resident() != Some(0) {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "pool still holds {:?}",
            pool_resident()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}
