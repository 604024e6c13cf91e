//! DOC: serving every connection without a thread each: one epoll set and a small fixed
//! pool of workers.
//!
//! The listening socket and every connection are in one epoll set, each registered
//! `EPOLLONESHOT`: an event goes to exactly one worker, and the registration stays
//! disarmed until that worker re-arms it, so one connection's requests are handled one at
//! a time and in order, by whichever worker is free. A worker serves one request per event
//! (then re-arms), so a client that streams requests cannot keep a worker from the others.
//! A request that waits for a firmware ack holds its worker for that time (bounded by the
//! ack timeout); the other workers go on.
//!
//! Connections are bounded ([`ServerLimits::max_connections`]). A connection that has not
//! opened its context within [`ServerLimits::handshake_timeout`] is closed, and when the
//! bound is reached a new connection takes the place of the oldest one that has not opened
//! a context: a flood of idle connections cannot lock well-behaved clients out, since
//! those send OPEN_CONTEXT at once. With every connection holding a context, a newcomer
//! is told `LimitExceeded` and closed. So is a newcomer when kmd-shim is out of
//! descriptors with no connection to evict: a descriptor held in reserve is given up for a
//! moment to accept it. Replies are sent without waiting, so a client that
//! does not read them loses its connection once its queue is full, instead of holding a
//! worker. Thousands of idle connections cost a descriptor each and no thread.

use crate::client;
use crate::device::Device;
use crate::socket::Listener;
use rustix::event::epoll;
use rustix::fd::OwnedFd;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::*};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use userq_uapi::KmdStatus;

/// Bounds of the connection server.
#[derive(Debug, Clone)]
pub struct ServerLimits {
    /// Connections served at once.
    pub max_connections: usize,
    /// How long a connection may stay without a context.
    pub handshake_timeout: Duration,
    /// Worker threads serving requests.
    pub workers: usize,
    /// How long receiving a request already announced may block (replies are sent
    /// without waiting).
    pub socket_timeout: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            max_connections: 1024,
            handshake_timeout: Duration::from_secs(2),
            workers: 4,
            socket_timeout: Duration::from_secs(1),
        }
    }
}

/// The listening socket's key in the epoll set; connections have keys from 1.
const LISTENER: u64 = 0;

/// How many connections one listener event accepts before the listener is re-armed.
const ACCEPT_BATCH: usize = 64;

/// How often a worker looks for connections past their handshake timeout.
const REAP_PERIOD: Duration = Duration::from_millis(100);

struct Conn {
    sock: Arc<OwnedFd>,
    ctx: Option<u32>,
    since: Instant,
    /// A worker is serving it (it is disarmed in the epoll set meanwhile).
    busy: bool,
}

/// The connection server.
pub(crate) struct Server {
    epoll: OwnedFd,
    conns: Mutex<HashMap<u64, Conn>>,
    next_key: AtomicU64,
    last_reap: Mutex<Instant>,
    stopping: AtomicBool,
    limits: ServerLimits,
    /// A descriptor held in reserve (`/dev/null`): out of descriptors with no connection to
    /// evict, it is closed to accept one waiting connection, answer it `LimitExceeded` and
    /// close it, and then opened again, so that the connections waiting in the backlog hear
    /// why instead of waiting for an answer that never comes.
    spare: Mutex<Option<OwnedFd>>,
}

fn armed() -> epoll::EventFlags {
    epoll::EventFlags::IN | epoll::EventFlags::RDHUP | epoll::EventFlags::ONESHOT
}

impl Server {
    /// A server for `listener` (registered at once).
    pub(crate) fn new(listener: &Listener, limits: ServerLimits) -> std::io::Result<Server> {
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        epoll::add(
            &epoll,
            listener.fd(),
            epoll::EventData::new_u64(LISTENER),
            armed(),
        )?;
        Ok(Server {
            epoll,
            conns: Mutex::new(HashMap::new()),
            next_key: AtomicU64::new(LISTENER + 1),
            last_reap: Mutex::new(Instant::now()),
            stopping: AtomicBool::new(false),
            limits,
            // Best effort: without it (no /dev/null here) newcomers wait as before.
            spare: Mutex::new(open_spare().ok()),
        })
    }

    /// Worker threads to start.
    pub(crate) fn workers(&self) -> usize {
        self.limits.workers.max(1)
    }

    /// A worker's body: serves events until [`Server::stop`].
    pub(crate) fn work(&self, dev: &Device, listener: &Listener) {
        let mut events = Vec::with_capacity(1);
        let period = rustix::time::Timespec {
            tv_sec: 0,
            tv_nsec: REAP_PERIOD.as_nanos() as i64,
        };
        while !self.stopping.load(Acquire) {
            events.clear();
            match epoll::wait(
                &self.epoll,
                rustix::buffer::spare_capacity(&mut events),
                Some(&period),
            ) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(_) => return,
            }
            for ev in events.drain(..) {
                match ev.data.u64() {
                    LISTENER => self.accept(listener),
                    key => self.serve(dev, key),
                }
            }
            self.reap_if_due();
        }
    }

    /// Takes waiting connections, then re-arms the listener.
    fn accept(&self, listener: &Listener) {
        for _ in 0..ACCEPT_BATCH {
            let sock = match listener.accept() {
                Ok(s) => s,
                Err(rustix::io::Errno::INTR) | Err(rustix::io::Errno::CONNABORTED) => continue,
                Err(rustix::io::Errno::MFILE) | Err(rustix::io::Errno::NFILE) => {
                    // Out of descriptors before the connection bound: a flood of idle
                    // connections must not keep the newcomers out, so the oldest one
                    // without a context goes; with none to close, the waiting connections
                    // are turned away one by one with the spare descriptor, and without
                    // it (it could not be opened again last time), back off before the
                    // listener (still readable) is looked at again.
                    let evicted = {
                        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
                        self.evict_oldest_idle(&mut conns)
                    };
                    if evicted {
                        continue;
                    }
                    match self.turn_away_one(listener) {
                        TurnAway::Turned => continue,
                        TurnAway::NoneWaiting => break,
                        TurnAway::NoSpare => {
                            std::thread::sleep(Duration::from_millis(10));
                            break;
                        }
                    }
                }
                // AGAIN: none left.
                Err(_) => break,
            };
            if !client::peer_allowed(&sock) {
                client::refuse(&sock, KmdStatus::PermissionDenied);
                continue;
            }
            let t = Some(self.limits.socket_timeout);
            let _ = rustix::net::sockopt::set_socket_timeout(
                &sock,
                rustix::net::sockopt::Timeout::Send,
                t,
            );
            let _ = rustix::net::sockopt::set_socket_timeout(
                &sock,
                rustix::net::sockopt::Timeout::Recv,
                t,
            );
            self.admit(sock);
        }
        if !self.stopping.load(Acquire) {
            let _ = epoll::modify(
                &self.epoll,
                listener.fd(),
                epoll::EventData::new_u64(LISTENER),
                armed(),
            );
        }
    }

    /// Adds a connection, making room at the bound by closing the oldest connection that
    /// has no context yet; with no such connection, the new one is told `LimitExceeded`
    /// and closed.
    fn admit(&self, sock: OwnedFd) {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        if conns.len() >= self.limits.max_connections && !self.evict_oldest_idle(&mut conns) {
            drop(conns);
            client::refuse(&sock, KmdStatus::LimitExceeded);
            return; // dropping `sock` closes it
        }
        let key = self.next_key.fetch_add(1, Relaxed);
        let sock = Arc::new(sock);
        if epoll::add(&self.epoll, &*sock, epoll::EventData::new_u64(key), armed()).is_ok() {
            conns.insert(
                key,
                Conn {
                    sock,
                    ctx: None,
                    since: Instant::now(),
                    busy: false,
                },
            );
        }
    }

    /// Out of descriptors with every connection holding a context: frees the spare
    /// descriptor, accepts one waiting connection, tells it `LimitExceeded`, closes it and
    /// takes the spare back.
    fn turn_away_one(&self, listener: &Listener) -> TurnAway {
        let mut spare = self.spare.lock().unwrap_or_else(|e| e.into_inner());
        if spare.take().is_none() {
            // Lost to a descriptor-hungry moment earlier: try to get it back for next time.
            *spare = open_spare().ok();
            return TurnAway::NoSpare;
        }
        let turned = match listener.accept() {
            Ok(sock) => {
                client::refuse(&sock, KmdStatus::LimitExceeded);
                TurnAway::Turned
            }
            Err(rustix::io::Errno::AGAIN) => TurnAway::NoneWaiting,
            // That one went (or the call was interrupted): the next may be taken.
            Err(rustix::io::Errno::CONNABORTED) | Err(rustix::io::Errno::INTR) => TurnAway::Turned,
            // Another thread of kmd-shim took the freed descriptor first.
            Err(_) => TurnAway::NoSpare,
        };
        *spare = open_spare().ok();
        turned
    }

    /// Closes the oldest connection that has no context and no worker; returns whether
    /// there was one.
    fn evict_oldest_idle(&self, conns: &mut HashMap<u64, Conn>) -> bool {
        let oldest = conns
            .iter()
            .filter(|(_, c)| c.ctx.is_none() && !c.busy)
            .min_by_key(|(_, c)| c.since)
            .map(|(&k, _)| k);
        match oldest.and_then(|k| conns.remove(&k)) {
            Some(c) => {
                let _ = epoll::delete(&self.epoll, &*c.sock);
                true
            }
            None => false,
        }
    }

    /// Serves one request of connection `key`, then re-arms it, or closes it and reclaims
    /// its context.
    fn serve(&self, dev: &Device, key: u64) {
        let (sock, mut ctx) = {
            let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
            let Some(c) = conns.get_mut(&key) else {
                return; // closed meanwhile (reaped or evicted): a stale event
            };
            c.busy = true;
            (c.sock.clone(), c.ctx)
        };
        let keep = client::serve_one(dev, &sock, &mut ctx);
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        if keep && !self.stopping.load(Acquire) {
            if let Some(c) = conns.get_mut(&key) {
                c.ctx = ctx;
                c.busy = false;
            }
            let _ = epoll::modify(&self.epoll, &*sock, epoll::EventData::new_u64(key), armed());
            return;
        }
        conns.remove(&key);
        let _ = epoll::delete(&self.epoll, &*sock);
        drop(conns);
        drop(sock);
        if let Some(c) = ctx {
            dev.close_context(c);
        }
    }

    /// Closes connections that stayed without a context past the handshake timeout.
    fn reap_if_due(&self) {
        let Ok(mut last) = self.last_reap.try_lock() else {
            return; // another worker is at it
        };
        if last.elapsed() < REAP_PERIOD {
            return;
        }
        *last = Instant::now();
        let limit = self.limits.handshake_timeout;
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns.retain(|_, c| {
            let stale = c.ctx.is_none() && !c.busy && c.since.elapsed() > limit;
            if stale {
                let _ = epoll::delete(&self.epoll, &*c.sock);
            }
            !stale
        });
    }

    /// Makes the workers return (within [`REAP_PERIOD`]).
    pub(crate) fn stop(&self) {
        self.stopping.store(true, Release);
    }

    /// After the workers returned: closes every connection and returns the contexts to
    /// reclaim.
    pub(crate) fn close_all(&self) -> Vec<u32> {
        let conns = std::mem::take(&mut *self.conns.lock().unwrap_or_else(|e| e.into_inner()));
        conns
            .into_values()
            .filter_map(|c| {
                let _ = rustix::net::shutdown(&*c.sock, rustix::net::Shutdown::Both);
                c.ctx
            })
            .collect()
    }
}

/// What [`Server::turn_away_one`] did.
enum TurnAway {
    /// A waiting connection was told `LimitExceeded` and closed (or had gone already).
    Turned,
    /// No connection was waiting.
    NoneWaiting,
    /// There was no spare descriptor to give up, or it was taken before the accept.
    NoSpare,
}

/// The spare descriptor [`Server::turn_away_one`] gives up for a moment.
fn open_spare() -> std::io::Result<OwnedFd> {
    Ok(rustix::fs::open(
        "/dev/null",
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )?)
}
