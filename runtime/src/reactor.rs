//! Awaiting fence points from any async runtime: [`FencePoint`] is `IntoFuture`.
//!
//! One reactor thread per process (started at the first pending await) watches every
//! pending point: it registers as a host waiter on their fences, sleeps on all their wake
//! words and its own kick word at once with `futex_waitv`, and wakes the tasks whose
//! points were reached or failed. There is no thread per waiter.

use crate::error::WaitError;
use crate::fence::FencePoint;
use crate::wait::Registered;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering::*};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use userq_uapi::shm::Word32;
use userq_uapi::sync;

/// The waker slot a future shares with the reactor; `None` once the reactor woke it.
type Slot = Arc<Mutex<Option<Waker>>>;

struct Reactor {
    entries: Mutex<Vec<(FencePoint, Slot)>>,
    /// Bumped whenever an entry is added, so the reactor's sleep ends. In-process memory,
    /// but waited on with rustix's (shared) futex rather than `atomic-wait`: the reactor
    /// sleeps on it and on the fences' shared wake words in one `futex_waitv`, which
    /// `atomic-wait` cannot do, and a private wait would not match a shared wake.
    kick: AtomicU32,
}

fn reactor() -> &'static Reactor {
    static R: OnceLock<&'static Reactor> = OnceLock::new();
    R.get_or_init(|| {
        let r: &'static Reactor = Box::leak(Box::new(Reactor {
            entries: Mutex::new(Vec::new()),
            kick: AtomicU32::new(0),
        }));
        std::thread::Builder::new()
            .name("userq-reactor".into())
            .spawn(move || r.run())
            .expect("spawning the userq reactor thread");
        r
    })
}

impl Reactor {
    fn add(&self, point: FencePoint, slot: Slot) {
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((point, slot));
        self.kick.fetch_add(1, Release);
        sync::futex_wake_all(&self.kick);
    }

    fn run(&self) {
        loop {
            // The kick word before the entries: a future added after this load bumps it,
            // so the sleep below cannot miss it.
            let kick_seen = self.kick.load(Acquire);
            // Drop entries whose future is gone (only the reactor holds the slot).
            let points: Vec<(FencePoint, Slot)> = {
                let mut e = self.entries.lock().unwrap_or_else(|e| e.into_inner());
                e.retain(|(_, slot)| Arc::strong_count(slot) > 1);
                e.clone()
            };
            if points.is_empty() {
                sync::futex_wait(&self.kick, kick_seen, None);
                continue;
            }
            let pts: Vec<FencePoint> = points.iter().map(|(p, _)| p.clone()).collect();
            let targets: Vec<_> = pts.iter().map(FencePoint::target).collect();
            let _registered = Registered::new(&targets);
            // The kick word first: with more points than one futex_waitv takes, the fallback
            // waits on the first word (in short slices), and new futures must still wake us.
            let words: Vec<&dyn Word32> = std::iter::once(&self.kick as &dyn Word32)
                .chain(pts.iter().map(|p| p.wake_word() as &dyn Word32))
                .collect();
            let mut woke = false;
            // Bounded, so a lost device is noticed even if nobody wakes the reactor.
            sync::sleep_unless(
                &words,
                || {
                    for (p, slot) in &points {
                        if p.poll_decided().is_some() {
                            if let Some(w) = slot.lock().unwrap_or_else(|e| e.into_inner()).take() {
                                w.wake();
                            }
                            woke = true;
                        }
                    }
                    woke || self.kick.load(Relaxed) != kick_seen
                },
                || Some(Duration::from_millis(200)),
            );
            if woke {
                let mut e = self.entries.lock().unwrap_or_else(|e| e.into_inner());
                e.retain(|(_, slot)| slot.lock().unwrap_or_else(|e| e.into_inner()).is_some());
                continue;
            }
            if pts.iter().any(|p| p.fence().device_gone()) {
                for (_, slot) in &points {
                    if let Some(w) = slot.lock().unwrap_or_else(|e| e.into_inner()).take() {
                        w.wake();
                    }
                }
            }
        }
    }
}

/// The future of a [`FencePoint`]: ready when the point is reached, or with the error a
/// blocking wait would return.
#[derive(Debug)]
pub struct FenceFuture {
    point: FencePoint,
    slot: Option<Slot>,
}

impl IntoFuture for FencePoint {
    type Output = Result<(), WaitError>;
    type IntoFuture = FenceFuture;

    fn into_future(self) -> FenceFuture {
        FenceFuture {
            point: self,
            slot: None,
        }
    }
}

impl Future for FenceFuture {
    type Output = Result<(), WaitError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Some(r) = self.point.poll_decided() {
            return Poll::Ready(r);
        }
        match &self.slot {
            Some(slot) => {
                let mut s = slot.lock().unwrap_or_else(|e| e.into_inner());
                match s.as_mut() {
                    Some(w) => w.clone_from(cx.waker()),
                    // The reactor woke us for a device loss it saw, or just before the
                    // point was decided: register again below.
                    None => *s = Some(cx.waker().clone()),
                }
                let readd = Arc::strong_count(slot) == 1;
                drop(s);
                if readd {
                    reactor().add(self.point.clone(), slot.clone());
                }
            }
            None => {
                let slot: Slot = Arc::new(Mutex::new(Some(cx.waker().clone())));
                reactor().add(self.point.clone(), slot.clone());
                self.slot = Some(slot);
            }
        }
        // Re-check after registering: a signal in between would otherwise be missed
        // until the reactor's next look.
        match self.point.poll_decided() {
            Some(r) => Poll::Ready(r),
            None => Poll::Pending,
        }
    }
}
