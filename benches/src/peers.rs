//! Peers measured in the same run: a Unix-socket request/response daemon (what a naive
//! design costs), io_uring NOPs (the kernel's own user ring), and iceoryx2 publish/subscribe
//! (the fastest Rust shared-memory IPC).

use crate::proc::Role;
use crate::stats::{time_each, Latency};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// Round trips of 8 bytes to an echo server in another process.
pub fn unix_socket(dir: &Path, warmup: usize, iters: usize) -> std::io::Result<Latency> {
    let path = dir.join("echo.sock");
    let mut server = Role::spawn(
        "__echo-unix",
        &[path.display().to_string()],
        None,
        Stdio::piped(),
    )?;
    let mut line = String::new();
    BufReader::new(server.child().stdout.take().expect("piped")).read_line(&mut line)?;
    let mut s = UnixStream::connect(&path)?;
    let mut buf = [0u8; 8];
    let mut i = 0u64;
    let lat = time_each(warmup, iters, || {
        i += 1;
        s.write_all(&i.to_le_bytes()).expect("write");
        s.read_exact(&mut buf).expect("read");
    });
    drop(s);
    drop(server);
    let _ = std::fs::remove_file(&path);
    Ok(lat)
}

/// The echo server role.
pub fn unix_echo_server(path: &str) -> std::io::Result<()> {
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path)?;
    println!("ready");
    std::io::stdout().flush()?;
    let (mut s, _) = l.accept()?;
    let mut buf = [0u8; 8];
    while s.read_exact(&mut buf).is_ok() {
        s.write_all(&buf)?;
    }
    Ok(())
}

/// io_uring NOP round trips: submit one NOP and wait for its completion.
pub fn io_uring_nop(warmup: usize, iters: usize) -> std::io::Result<Latency> {
    let mut ring = io_uring::IoUring::new(64)?;
    let nop = io_uring::opcode::Nop::new().build().user_data(1);
    Ok(time_each(warmup, iters, || {
        // SAFETY: a NOP references no memory.
        unsafe { ring.submission().push(&nop).expect("ring has room") };
        ring.submit_and_wait(1).expect("io_uring_enter");
        ring.completion().next().expect("a completion");
    }))
}

/// io_uring NOPs per second, `batch` per `io_uring_enter`.
pub fn io_uring_batched(batch: usize, total: usize) -> std::io::Result<f64> {
    let mut ring = io_uring::IoUring::new(batch.next_power_of_two().max(8) as u32)?;
    let nop = io_uring::opcode::Nop::new().build().user_data(1);
    let rounds = total.div_ceil(batch);
    let t = Instant::now();
    for _ in 0..rounds {
        {
            let mut sq = ring.submission();
            for _ in 0..batch {
                // SAFETY: a NOP references no memory.
                unsafe { sq.push(&nop).expect("ring has room") };
            }
        }
        ring.submit_and_wait(batch)?;
        ring.completion().for_each(drop);
    }
    Ok((rounds * batch) as f64 / t.elapsed().as_secs_f64())
}

fn service_names() -> (String, String) {
    let id = std::process::id();
    (
        format!("userq-bench/{id}/ping"),
        format!("userq-bench/{id}/pong"),
    )
}

/// iceoryx2 publish/subscribe ping-pong with another process, both sides polling.
pub fn iceoryx2_ping_pong(
    warmup: usize,
    iters: usize,
) -> Result<Latency, Box<dyn std::error::Error>> {
    use iceoryx2::prelude::*;
    let (ping, pong) = service_names();
    let node = NodeBuilder::new().create::<ipc::Service>()?;
    let ping_svc = node
        .service_builder(&ping.as_str().try_into()?)
        .publish_subscribe::<u64>()
        .open_or_create()?;
    let pong_svc = node
        .service_builder(&pong.as_str().try_into()?)
        .publish_subscribe::<u64>()
        .open_or_create()?;
    let publisher = ping_svc.publisher_builder().create()?;
    let subscriber = pong_svc.subscriber_builder().create()?;
    let child = Role::spawn(
        "__iceoryx2",
        &[ping.clone(), pong.clone()],
        None,
        Stdio::null(),
    )?;
    // Handshake: samples reach only subscribers that exist, so ping until one comes back.
    let deadline = Instant::now() + Duration::from_secs(20);
    'connected: loop {
        publisher.send_copy(0)?;
        let t = Instant::now();
        while t.elapsed() < Duration::from_millis(5) {
            if let Some(s) = subscriber.receive()? {
                if *s == 0 {
                    break 'connected;
                }
            }
        }
        if Instant::now() > deadline {
            return Err("iceoryx2 peer did not answer".into());
        }
    }
    while subscriber.receive()?.is_some() {}
    let mut i = 0u64;
    let mut patience = crate::patience::Patience::new();
    let lat = time_each(warmup, iters, || {
        i += 1;
        publisher.send_copy(i).expect("send");
        loop {
            match subscriber.receive().expect("receive") {
                Some(s) if *s == i => break,
                _ => {
                    core::hint::spin_loop();
                    patience.spun(i);
                }
            }
        }
    });
    publisher.send_copy(u64::MAX)?;
    drop(child);
    Ok(lat)
}

/// The iceoryx2 echo role.
pub fn iceoryx2_echo(ping: &str, pong: &str) -> Result<(), Box<dyn std::error::Error>> {
    use iceoryx2::prelude::*;
    let node = NodeBuilder::new().create::<ipc::Service>()?;
    let ping_svc = node
        .service_builder(&ping.try_into()?)
        .publish_subscribe::<u64>()
        .open_or_create()?;
    let pong_svc = node
        .service_builder(&pong.try_into()?)
        .publish_subscribe::<u64>()
        .open_or_create()?;
    let subscriber = ping_svc.subscriber_builder().create()?;
    let publisher = pong_svc.publisher_builder().create()?;
    loop {
        match subscriber.receive()? {
            Some(s) if *s == u64::MAX => return Ok(()),
            Some(s) => {
                publisher.send_copy(*s)?;
            }
            None => core::hint::spin_loop(),
        }
    }
}
