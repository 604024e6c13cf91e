//! `userq-bench`: userq against the machine's floors and against peers, in one run.
//!
//! ```text
//! userq-bench [compare|floors|latency|peers|throughput|scaling|idle|submit|sched|resets|paging|observe]
//!             [--iters N] [--quick] [--json] [--plot DIR]
//! ```
//!
//! `userq-bench --help` lists them. The tool re-executes itself in hidden roles (first
//! argument `__…`) for the processes it measures; those are not part of the CLI.
//!
//! ```text
//! ```

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use userq::WaitMode;
use userq_benches::device::{self, DeviceProcs, Mode};
use userq_benches::report::{
    LatencyRow, Report, ScalingRow, ThroughputRow, EXCHANGE_FLOOR, FUTEX_FLOOR, KERNEL_LAUNCH,
    KERNEL_LAUNCH_16, POLL_FLOOR,
};
use userq_benches::{cold, floors, peers, plot, proc, round_trip, rounds, submit};

/// The run's directory (sockets, a daemon's objects): removed when the run ends, also by
/// a panic's unwinding (a floor whose partner stopped answering ends the run that way).
struct RunDir(PathBuf);

impl Drop for RunDir {
    fn drop(&mut self) {
        proc::kill_all();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The batch of the paired throughput rounds: io_uring's best in the sweep, and as good
/// as any for userq (whose sweep is flat from 4 up).
const THROUGHPUT_BATCH: usize = 256;
/// The name of the idle-queues row.
const IDLE_QUEUES: &str = "userq NOP, daemon, spin, 4096 idle queues from 64 processes";

/// userq against the machine's floors and against peers, measured in one run.
#[derive(Debug, Parser)]
#[command(name = "userq-bench", version, about)]
struct Cli {
    /// What to measure (default: compare, which runs all of them in one process tree).
    #[command(subcommand)]
    what: Option<What>,
    /// Round trips per latency measurement (blocking ones use N/5) [default: 50000, or
    /// 5000 with --quick].
    #[arg(long, global = true, value_name = "N",
          value_parser = clap::value_parser!(u64).range(100..=10_000_000))]
    iters: Option<u64>,
    /// A short run: N = 5000, smaller throughput and scaling runs.
    #[arg(long, global = true)]
    quick: bool,
    /// Print the results as JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// Write latency-cdf.png, throughput.png and scaling.png into DIR.
    #[arg(long, global = true, value_name = "DIR")]
    plot: Option<PathBuf>,
}

/// One part of the comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Subcommand)]
enum What {
    /// Everything below, one part after the other.
    Compare,
    /// Cache-line and shared-futex ping-pong between two processes.
    Floors,
    /// userq NOP round trips, daemon and embedded mode, spinning and blocking.
    Latency,
    /// Unix-socket daemon, io_uring NOP, iceoryx2 pub/sub ping-pong.
    Peers,
    /// NOPs/s on one queue vs batch size, and io_uring batched NOPs.
    Throughput,
    /// 1, 16, 256 queues across 1, 4, 16 client processes.
    Scaling,
    /// fw-emu CPU use 10 ms after the last work.
    Idle,
    /// Host-side submit cost and the syscalls it makes.
    Submit,
    /// Engine scheduler: fairness, priority under load, 64 queues from 4 processes.
    Sched,
    /// Hang detection and reset time, innocent round trips during a reset storm, client
    /// kills, firmware kill and restart.
    Resets,
    /// On-demand paging: single fault round trip, batched fault service and copy
    /// bandwidth, eviction + refault cost, innocent round trips during a fault storm.
    Paging,
    /// What telemetry and per-packet profiling cost the round trip (on vs off).
    Observe,
}

struct Opts {
    what: What,
    iters: usize,
    quick: bool,
    json: bool,
    plot: Option<PathBuf>,
}

impl From<Cli> for Opts {
    fn from(c: Cli) -> Opts {
        Opts {
            what: c.what.unwrap_or(What::Compare),
            iters: c
                .iters
                .map_or(if c.quick { 5_000 } else { 50_000 }, |n| n as usize),
            quick: c.quick,
            json: c.json,
            plot: c.plot,
        }
    }
}

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn role(name: &str, args: &[String]) -> Res<()> {
    let arg = |i: usize| {
        args.get(i)
            .map(String::as_str)
            .ok_or("missing role argument")
    };
    match name {
        "__floor-poll" => floors::poll_floor_child(arg(0)?)?,
        "__floor-futex" => floors::futex_floor_child(arg(0)?)?,
        "__floor-exchange" => floors::exchange_floor_child(arg(0)?)?,
        "__floor-stream" => floors::stream_floor_child(arg(0)?)?,
        "__echo-unix" => peers::unix_echo_server(arg(0)?)?,
        "__iceoryx2" => peers::iceoryx2_echo(arg(0)?, arg(1)?)?,
        "__kmd" => device::kmd_role(arg(0)?, arg(1)?.parse()?)?,
        "__fw" => device::fw_role(args)?,
        "__embedded" => device::embedded_role(arg(0)?, arg(1)?.parse()?)?,
        "__scale" => device::scale_role(arg(0)?, arg(1)?.parse()?, arg(2)?.parse()?)?,
        "__sched-client" => {
            userq_benches::sched::client_role(arg(0)?, arg(1)?.parse()?, arg(2)?.parse()?)?
        }
        "__idle-queues" => device::idle_queues_role(arg(0)?, arg(1)?.parse()?)?,
        "__submit-probe" => submit::submit_probe_role(arg(0)?, arg(1)?, arg(2)?.parse()?)?,
        "__victim" => userq_benches::resets::victim_role(arg(0)?)?,
        "__lost-waiter" => userq_benches::resets::lost_waiter_role(arg(0)?)?,
        "__fault-storm" => userq_benches::paging::fault_storm_role(arg(0)?)?,
        _ => return Err(format!("unknown role {name}").into()),
    }
    Ok(())
}

fn run(o: &Opts, dir: &std::path::Path, r: &mut Report) -> Res<()> {
    let all = o.what == What::Compare;
    let (n, nb) = (o.iters, (o.iters / 5).max(100));
    let warm = (n / 10).max(100);
    let say = |s: &str| {
        if !o.json {
            eprintln!("userq-bench: {s}");
        }
    };
    if all || o.what == What::Floors || o.what == What::Latency {
        say("floors");
        r.latency.push(LatencyRow {
            name: POLL_FLOOR.into(),
            floor: Some("poll"),
            latency: floors::poll_floor(warm, n)?,
        });
        r.latency.push(LatencyRow {
            name: FUTEX_FLOOR.into(),
            floor: Some("futex"),
            latency: floors::futex_floor(warm / 5, nb)?,
        });
        if !(all || o.what == What::Latency) {
            // With `latency`, this floor is measured in rounds paired with userq's.
            r.latency.push(LatencyRow {
                name: EXCHANGE_FLOOR.into(),
                floor: Some("poll"),
                latency: floors::exchange_floor(warm, n)?,
            });
        }
    }
    if all || o.what == What::Latency {
        // Paired rounds: the minimal exchange and userq's spin round trip alternately, so a
        // placement change between two measurements cannot flatter or sink the ratio.
        let rounds = if o.quick { 3 } else { 7 };
        let per_round = (n / rounds).max(100);
        let warm_round = (per_round / 10).max(100);
        for mode in [Mode::Daemon, Mode::Embedded] {
            say(&format!("userq NOP round trips, {} mode", mode.name()));
            let procs = DeviceProcs::start(mode, dir)?;
            let dev = procs.connect()?;
            let name = format!("userq NOP, {}, spin", mode.name());
            // In daemon mode the cache-line ping-pong is measured beside each exchange
            // round too, for the older "≤ 1.5× the polling floor" target: on the far side
            // of the exchange from userq's round (`interleave` runs the floor first in
            // even rounds), so the exchange stays back to back with userq.
            let mut poll_rounds = Vec::new();
            let mut round = 0;
            let (paired, exchange, spin) = rounds::interleave(
                &name,
                EXCHANGE_FLOOR,
                rounds,
                || -> Res<_> {
                    let floor_first = round % 2 == 0;
                    round += 1;
                    let mut poll = || -> Res<_> {
                        if mode == Mode::Daemon {
                            poll_rounds.push(floors::poll_floor(warm_round, per_round)?.summary());
                        }
                        Ok(())
                    };
                    if floor_first {
                        poll()?;
                    }
                    let exchange = floors::exchange_floor(warm_round, per_round)?;
                    if !floor_first {
                        poll()?;
                    }
                    Ok(exchange)
                },
                || round_trip::nop_round_trip(&dev, WaitMode::Spin, warm_round, per_round),
            )?;
            if !poll_rounds.is_empty() {
                r.paired.push(rounds::Paired {
                    name: name.clone(),
                    floor: POLL_FLOOR.into(),
                    rounds: paired
                        .rounds
                        .iter()
                        .zip(poll_rounds)
                        .map(|(round, floor)| rounds::Round {
                            floor,
                            subject: round.subject,
                        })
                        .collect(),
                });
            }
            r.paired.push(paired);
            if mode == Mode::Daemon {
                r.latency.push(LatencyRow {
                    name: EXCHANGE_FLOOR.into(),
                    floor: Some("poll"),
                    latency: exchange,
                });
            }
            r.latency.push(LatencyRow {
                name,
                floor: Some("exchange"),
                latency: spin,
            });
            if mode == Mode::Daemon {
                let cold = cold::measure(&dev, o.quick, warm, nb)?;
                say(&format!(
                    "futex ping-pong from cold: the parent had to wait for its answer in {} of {} round trips",
                    cold.floor_waited, cold.floor_count
                ));
                r.paired.extend(cold.paired);
                r.latency.extend(cold.rows);
                for (name, items) in [(KERNEL_LAUNCH, 64), (KERNEL_LAUNCH_16, 4096)] {
                    r.latency.push(LatencyRow {
                        name: name.into(),
                        floor: None,
                        latency: round_trip::kernel_launch(
                            &dev,
                            items,
                            WaitMode::Spin,
                            warm / 5,
                            nb,
                        )?,
                    });
                }
            }
            let block = round_trip::nop_round_trip(&dev, WaitMode::Block, warm / 5, nb)?;
            r.latency.push(LatencyRow {
                name: format!("userq NOP, {}, block", mode.name()),
                floor: Some("futex"),
                latency: block,
            });
        }
    }
    if all || o.what == What::Peers {
        say("peers");
        r.latency.push(LatencyRow {
            name: "unix-socket daemon request/response".into(),
            floor: Some("futex"),
            latency: peers::unix_socket(dir, warm / 5, nb)?,
        });
        match peers::io_uring_nop(warm, n) {
            Ok(l) => r.latency.push(LatencyRow {
                name: "io_uring NOP (submit_and_wait)".into(),
                floor: None,
                latency: l,
            }),
            Err(e) => r.skipped.push(("io_uring".into(), e.to_string())),
        }
        match peers::iceoryx2_ping_pong(warm, n) {
            Ok(l) => r.latency.push(LatencyRow {
                name: "iceoryx2 pub/sub ping-pong".into(),
                floor: Some("poll"),
                latency: l,
            }),
            Err(e) => r.skipped.push(("iceoryx2".into(), e.to_string())),
        }
    }
    if all || o.what == What::Throughput {
        say("throughput");
        let total = if o.quick { 200_000 } else { 2_000_000 };
        let procs = DeviceProcs::start(Mode::Daemon, dir)?;
        let dev = procs.connect()?;
        for batch in [1, 4, 16, 64, 256] {
            r.throughput.push(ThroughputRow {
                system: "userq",
                batch,
                ops_per_sec: device::nop_throughput(&dev, batch, total)?,
            });
            match peers::io_uring_batched(batch, total) {
                Ok(t) => r.throughput.push(ThroughputRow {
                    system: "io_uring",
                    batch,
                    ops_per_sec: t,
                }),
                Err(e) => r
                    .skipped
                    .push((format!("io_uring batch {batch}"), e.to_string())),
            }
        }
        // The target's figure: both systems at one batch, alternately, so that a placement
        // change between two measurements cannot flatter or sink the ratio. io_uring runs
        // on one CPU and does not move with placement; userq's two sides do, and so does
        // the streaming floor measured beside userq in each round, which says how much of
        // what the placement allows userq reached.
        // Without io_uring at that batch here (a seccomp filter, an old kernel, a small
        // locked-memory limit) the sweep has said why. A peer that fails in the rounds is
        // skipped with its reason; userq failing is an error of the run.
        let batch = THROUGHPUT_BATCH;
        if r.throughput
            .iter()
            .any(|t| t.system == "io_uring" && t.batch == batch)
        {
            let paired = rounds::interleave_rates(
                batch,
                if o.quick { 3 } else { 7 },
                || device::nop_throughput(&dev, batch, total).map_err(|e| (true, e.to_string())),
                || floors::stream_floor(total as u64).map_err(|e| (false, e.to_string())),
                || peers::io_uring_batched(batch, total).map_err(|e| (false, e.to_string())),
            );
            match paired {
                Ok(p) => r.throughput_paired = Some(p),
                Err((true, e)) => return Err(e.into()),
                Err((false, e)) => r.skipped.push(("paired throughput rounds".into(), e)),
            }
        }
    }
    if all || o.what == What::Submit {
        say("submit cost");
        let procs = DeviceProcs::start(Mode::Daemon, dir)?;
        let dev = procs.connect()?;
        let rounds = if o.quick { 3 } else { 7 };
        for _ in 0..rounds {
            r.submit_rounds
                .push(submit::submit_cost(&dev, if o.quick { 200 } else { 2000 })?);
        }
        r.submit_syscalls = submit::submit_syscalls(&procs, 50_000)?;
        if r.submit_syscalls.is_none() {
            r.skipped.push((
                "syscall count of the submit path".into(),
                "strace is not installed or may not attach".into(),
            ));
        }
    }
    if all || o.what == What::Scaling {
        say("scaling");
        let procs = DeviceProcs::start(Mode::Daemon, dir)?;
        let rounds_total = if o.quick { 2_000 } else { 20_000 };
        for queues in [1usize, 16, 256] {
            for nprocs in [1usize, 4, 16] {
                if nprocs > queues {
                    continue;
                }
                let rounds = (rounds_total / queues).max(20);
                let p = device::scaling_point(&procs, queues, nprocs, rounds)?;
                r.scaling.push(ScalingRow {
                    queues,
                    procs: nprocs,
                    packets_per_sec: p.packets_per_sec,
                    summary: p.latency.summary(),
                });
            }
        }
    }
    if all || o.what == What::Scaling {
        say("idle queues");
        // 4096 idle queues from 64 processes must cost the hot queue nothing.
        let (procs_n, per_proc) = (64, 64);
        let procs = DeviceProcs::start(Mode::Daemon, dir)?;
        let dev = procs.connect()?;
        let per_round = (n / 5).max(100);
        let mut idle_fw = None;
        let (paired, _, attached) = rounds::interleave(
            IDLE_QUEUES,
            "the same queue alone",
            // Five: starting 64 processes can move the vCPUs under one half of a pair (4-5×
            // either way in about one round in three), and the median of five outlasts two.
            if o.quick { 3 } else { 5 },
            || round_trip::nop_round_trip(&dev, WaitMode::Spin, warm, per_round),
            || {
                device::with_idle_queues(&procs, procs_n, per_proc, || {
                    let l = round_trip::nop_round_trip(&dev, WaitMode::Spin, warm, per_round)?;
                    idle_fw = Some(device::idle_cpu(
                        procs.firmware_pid(),
                        Duration::from_millis(10),
                        Duration::from_secs(1),
                    )?);
                    Ok(l)
                })
            },
        )?;
        r.paired.push(paired);
        r.latency.push(LatencyRow {
            name: IDLE_QUEUES.into(),
            floor: Some("exchange"),
            latency: attached,
        });
        r.idle_cpu_with_idle_queues = idle_fw;
    }
    if all || o.what == What::Sched {
        say("scheduler");
        let procs = DeviceProcs::start(Mode::Daemon, dir)?;
        let dev = procs.connect()?;
        r.fairness = Some(userq_benches::sched::fairness(
            &dev,
            Duration::from_secs(2),
        )?);
        r.priority = Some(userq_benches::sched::priority(
            &dev,
            if o.quick { 200 } else { 1000 },
        )?);
        drop(dev);
        // Each client gives its queues 120 s in all to finish; the run gives it a little more.
        r.oversubscription = Some(userq_benches::sched::oversubscription(
            &procs,
            4,
            16,
            20,
            Duration::from_secs(150),
        )?);
    }
    if all || o.what == What::Resets {
        say("resets");
        r.resets = Some(userq_benches::resets::measure(dir, o.quick)?);
    }
    if all || o.what == What::Paging {
        say("paging");
        r.paging = Some(userq_benches::paging::measure(dir, o.quick)?);
    }
    if all || o.what == What::Observe {
        say("observability");
        r.observe = Some(userq_benches::observe::measure(dir, o.quick)?);
    }
    if all || o.what == What::Idle {
        say("idle");
        let procs = DeviceProcs::start(Mode::Daemon, dir)?;
        let dev = procs.connect()?;
        round_trip::nop_round_trip(&dev, WaitMode::Spin, 0, 10_000)?;
        r.idle_cpu = Some(device::idle_cpu(
            procs.firmware_pid(),
            Duration::from_millis(10),
            Duration::from_secs(1),
        )?);
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(name) = args.first().filter(|a| a.starts_with("__")) {
        return match role(name, &args[1..]) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("userq-bench {name}: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let o: Opts = match Cli::try_parse() {
        Ok(c) => c.into(),
        Err(e) if e.use_stderr() => {
            let _ = e.print();
            eprintln!("userq-bench: usage error (see `userq-bench --help`)");
            return ExitCode::from(2);
        }
        Err(e) => {
            // --help or --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    let dir = RunDir(std::env::temp_dir().join(format!("userq-bench-{}", std::process::id())));
    proc::reap_on_interrupt(dir.0.clone());
    let _ = std::fs::create_dir_all(&dir.0);
    let mut report = Report::default();
    let result = run(&o, &dir.0, &mut report);
    drop(dir);
    if let Err(e) = result {
        eprintln!("userq-bench: {e}");
        return ExitCode::FAILURE;
    }
    if o.json {
        println!("{}", report.json());
    } else {
        report.print();
    }
    if let Some(d) = &o.plot {
        if let Err(e) = plot::write_all(&report, d) {
            eprintln!("userq-bench: plots not written: {e}");
            return ExitCode::FAILURE;
        }
        if !o.json {
            println!("plots written to {}", d.display());
        }
    }
    ExitCode::SUCCESS
}
