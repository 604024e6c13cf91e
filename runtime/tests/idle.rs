//! An embedded device's firmware thread goes to sleep when there is no work. Alone in its
//! test binary so that no other device's threads run in this process.

use std::time::{Duration, Instant};
use userq::{Command, Device, OpenMode};

fn thread_ticks(name: &str) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir("/proc/self/task")
        .expect("tasks")
        .flatten()
    {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim() == name {
            let stat = std::fs::read_to_string(t.path().join("stat")).expect("stat");
            let rest = stat.rsplit_once(") ").expect("stat format").1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks = f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime");
            out.push((t.path().display().to_string(), ticks));
        }
    }
    out
}

#[test]
fn idle_embedded_firmware_thread_uses_under_two_percent_of_a_core() {
    let dir = std::env::temp_dir().join(format!("userq-idle-{}", std::process::id()));
    let dev = Device::builder()
        .socket(dir.join("dev.sock"))
        .mode(OpenMode::Embedded)
        .open()
        .expect("embedded device");
    let mut q = dev.create_queue().expect("queue");
    for _ in 0..1000 {
        q.submit(Command::nop()).expect("submit");
    }
    q.finish(Duration::from_secs(10)).expect("finish");
    std::thread::sleep(Duration::from_millis(200));

    let before = thread_ticks("fw-emu");
    assert_eq!(before.len(), 1, "one firmware thread");
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let after = thread_ticks("fw-emu");
    let used = after[0].1 - before[0].1;
    let hz = rustix::param::clock_ticks_per_second() as f64;
    let share = used as f64 / hz / t0.elapsed().as_secs_f64();
    drop((q, dev));
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        share < 0.02,
        "idle firmware thread used {:.1}% of a core",
        share * 100.0
    );
}
