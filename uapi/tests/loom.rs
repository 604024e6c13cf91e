//! loom models of the three protocols everything else rests on, each step with the
//! ordering `uapi::sync` (and the firmware's ring consumer) uses, explored over every
//! interleaving and every weak-memory outcome loom knows, with bounded preemption:
//!
//! - ring publish/consume: argument words, then word 0 with the sequence tag (release),
//!   then the doorbell (release); the consumer takes a packet by its tag (acquire) or by
//!   the doorbell (acquire) and must see the whole packet;
//! - doorbell sleep/wake (`ring_doorbell` against `announce_and_sleep`): the client never
//!   leaves its work unseen by a firmware that goes to sleep, also when it skips the wake
//!   because its own earlier doorbell woke the sleep it still sees announced (a firmware
//!   that really blocks until its word moves, through two sleeps);
//! - fence wait/wake (`register_waiter` + `sleep_unless` against `signal_fence`): a waiter
//!   that sleeps is always woken, for a user fence (shared count) and for a timeline (the
//!   holder's own count, read by the firmware).
//!
//! A sleep is modelled as futex_wait's rule: the sleeper blocks only if its word still
//! holds the snapshot it took, so "no lost wake-up" is "a sleeper's snapshot is stale by
//! the end, or it saw the work". Run with
//! `RUSTFLAGS="--cfg loom" cargo test --release -p userq-uapi --test loom` (CI does).
#![cfg(loom)]

use loom::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering::*};
use loom::sync::Arc;
use loom::thread;

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(3);
    b.check(f);
}

/// A sequence tag as `packet::sequence_tag` makes it: the index plus one, high half.
fn tag(index: u64) -> u64 {
    (index + 1) << 32
}

#[test]
fn a_packet_taken_by_its_tag_or_its_doorbell_is_seen_whole() {
    model(|| {
        // One slot of three words (word 0 carries the opcode and the tag), and a doorbell.
        let slot = Arc::new([AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)]);
        let doorbell = Arc::new(AtomicU64::new(0));
        let (s, d) = (slot.clone(), doorbell.clone());
        let producer = thread::spawn(move || {
            s[1].store(0xaaaa, Relaxed);
            s[2].store(0xbbbb, Relaxed);
            s[0].store(tag(0) | 7, Release); // word 0 last
            d.store(1, Release); // then the write index
        });
        // The firmware: first by tag (the polled path), else by doorbell.
        let by_tag = slot[0].load(Acquire) >> 32 == tag(0) >> 32;
        let by_doorbell = !by_tag && doorbell.load(Acquire) >= 1;
        if by_tag || by_doorbell {
            let words: Vec<u64> = slot.iter().map(|w| w.load(Relaxed)).collect();
            assert_eq!(words, vec![tag(0) | 7, 0xaaaa, 0xbbbb], "a torn packet");
        }
        producer.join().unwrap();
    });
}

/// The doorbell's shared words.
#[derive(Default)]
struct Doorbell {
    pending: AtomicU64,  // the queue's bit in its context page
    summary: AtomicU64,  // the context's bit, device-wide
    sleeping: AtomicU64, // DeviceStatus.sleep.sleeping: the sleep's number, 0 awake
    before: AtomicU32,   // DeviceStatus.sleep.word_before
    kick: AtomicU32,     // DeviceKick.kick
}

impl Doorbell {
    /// `sync::ring_doorbell` (`wake_once_if_announced` after the bits): `woken` is the
    /// number of the sleep this client last woke.
    fn ring(&self, woken: &mut u64) {
        self.pending.fetch_or(1, Release);
        self.summary.fetch_or(1, SeqCst);
        fence(SeqCst);
        let sleep = self.sleeping.load(Relaxed);
        fence(Acquire);
        if sleep == 0 {
            *woken = 0;
        } else if sleep != *woken || self.kick.load(Relaxed) == self.before.load(Relaxed) {
            self.kick.fetch_add(1, Release);
            *woken = sleep;
        }
    }

    /// The firmware's turn (`collect_doorbells`): takes the context's bit, then the
    /// queue's. Returns whether it found each.
    fn take(&self) -> (bool, bool) {
        if self.summary.swap(0, Acquire) == 0 {
            return (false, false);
        }
        (true, self.pending.swap(0, Acquire) != 0)
    }

    /// `sync::announce_and_sleep` up to its decision: the word before the announcement,
    /// the numbered announcement, the fence, the `has_work` re-check. Returns the value a
    /// sleep would wait on, or `None` if the re-check saw work.
    fn announce(&self, n: u64) -> Option<u32> {
        let before = self.kick.load(Acquire);
        self.before.store(before, Relaxed);
        self.sleeping.store(n, Release);
        fence(SeqCst);
        if self.summary.load(Relaxed) != 0 {
            self.sleeping.store(0, Relaxed);
            return None;
        }
        Some(before)
    }
}

#[test]
fn a_rung_doorbell_is_never_left_to_a_sleeping_firmware() {
    model(|| {
        let db = Arc::new(Doorbell::default());
        let d = db.clone();
        let client = thread::spawn(move || d.ring(&mut 0));
        let sleeps_on = db.announce(1);
        // Saw work: its turn finds the context's bit, which leads it to the queue's.
        let took = match sleeps_on {
            Some(_) => (false, false),
            None => db.take(),
        };
        client.join().unwrap();
        match sleeps_on {
            // It sleeps on `kick` while it holds `w`: the client must have bumped it.
            Some(w) => assert_ne!(
                db.kick.load(Relaxed),
                w,
                "lost doorbell: the firmware sleeps"
            ),
            None => assert_eq!(took, (true, true), "the re-check's work not found"),
        }
    });
}

#[test]
fn a_doorbell_that_skips_a_wake_it_already_made_is_never_left_to_a_sleeping_firmware() {
    model(|| {
        let db = Arc::new(Doorbell::default());
        let done = Arc::new(AtomicU32::new(0));
        let (d, dn) = (db.clone(), done.clone());
        // Two doorbells of one queue, with its memory of the sleep it woke: the second
        // skips its wake when it sees the sleep the first woke.
        let client = thread::spawn(move || {
            let mut woken = 0;
            d.ring(&mut woken);
            d.ring(&mut woken);
            dn.store(1, Release);
        });
        // The firmware: a turn, sleep 1 (really blocking, until `kick` moves), a turn,
        // and the decision of sleep 2.
        db.take();
        if let Some(w) = db.announce(1) {
            // A futex wait: returns once the word differs (no ordering: a relaxed load).
            loop {
                if db.kick.load(Relaxed) != w {
                    break;
                }
                if done.load(Acquire) != 0 && db.kick.load(Relaxed) == w {
                    // Nobody will bump `kick` any more: the firmware sleeps for good,
                    // which is right only if no doorbell is left unseen.
                    assert_eq!(db.summary.load(Relaxed), 0, "lost doorbell in sleep 1");
                    client.join().unwrap();
                    return;
                }
                thread::yield_now();
            }
            db.sleeping.store(0, Relaxed);
        }
        db.take();
        let sleeps_on = db.announce(2);
        client.join().unwrap();
        if let Some(w) = sleeps_on {
            if db.summary.load(Relaxed) != 0 {
                assert_ne!(db.kick.load(Relaxed), w, "lost doorbell in sleep 2");
            }
        }
    });
}

/// One waiter and one signaller on a fence. `user`: a user fence, whose host signaller
/// reads the shared count; otherwise a timeline, whose signaller (the firmware) reads the
/// holder's own count.
fn wait_wake(user: bool) {
    model(move || {
        let value = Arc::new(AtomicU64::new(0));
        let wake = Arc::new(AtomicU32::new(0));
        let shared = Arc::new(AtomicU32::new(0)); // FenceWaiters.line.host
        let own = Arc::new(AtomicU32::new(0)); // the holder's ContextWaiters count
        let (v, w, sh, o) = (value.clone(), wake.clone(), shared.clone(), own.clone());
        let signaller = thread::spawn(move || {
            // sync::signal_fence, with the signaller's `host_waiting`
            v.store(1, Release);
            fence(SeqCst);
            let waiting = if user {
                sh.load(Relaxed) != 0
            } else {
                o.load(Relaxed) != 0
            };
            if waiting {
                w.fetch_add(1, Release);
            }
        });
        // sync::register_waiter, then sleep_unless's snapshot and re-check.
        if user {
            shared.fetch_add(1, SeqCst);
        }
        own.fetch_add(1, SeqCst);
        fence(SeqCst);
        let seen = wake.load(Relaxed);
        fence(Acquire);
        let done = value.load(Relaxed) >= 1;
        signaller.join().unwrap();
        if !done {
            assert_ne!(wake.load(Relaxed), seen, "lost wake: the waiter sleeps");
        }
        // sync::unregister_waiter, in the opposite order.
        own.fetch_sub(1, SeqCst);
        if user {
            shared.fetch_sub(1, SeqCst);
        }
        assert_eq!((own.load(Relaxed), shared.load(Relaxed)), (0, 0));
    });
}

#[test]
fn a_user_fence_waiter_is_never_left_asleep() {
    wait_wake(true);
}

#[test]
fn a_timeline_waiter_is_never_left_asleep() {
    wait_wake(false);
}

#[test]
fn a_waiter_that_saw_the_wake_sees_the_value() {
    // sleep_unless's acquire fence after the snapshot: a snapshot that already holds the
    // signaller's bump also sees the value published before it, so the re-check cannot
    // miss the value and sleep past the wake that announced it.
    model(|| {
        let value = Arc::new(AtomicU64::new(0));
        let wake = Arc::new(AtomicU32::new(0));
        let (v, w) = (value.clone(), wake.clone());
        let signaller = thread::spawn(move || {
            v.store(1, Release);
            fence(SeqCst);
            w.fetch_add(1, Release);
        });
        fence(SeqCst);
        let seen = wake.load(Relaxed);
        fence(Acquire);
        if seen == 1 {
            assert_eq!(
                value.load(Relaxed),
                1,
                "the snapshot holds the bump, not the value"
            );
        }
        signaller.join().unwrap();
    });
}

/// The page pin against the invalidation (`fw-emu/src/window.rs`): an engine pins a page
/// (`pins.fetch_add`), a SeqCst fence, then checks that it is still resident (acquire);
/// the invalidator marks it (CAS RESIDENT → INVALIDATING), a SeqCst fence, then checks the
/// pins (acquire; the unpin is a release). The slot's data is a loom cell: if both sides
/// could be in at once (the engine touching the page, the invalidator copying it out), loom
/// reports the race. (The Dekker pair is written with fences, in the code as here: loom
/// models SeqCst *accesses* only as AcqRel, and with them this model fails.)
#[test]
fn a_pinned_page_is_never_copied_out_under_its_workgroup() {
    use loom::cell::UnsafeCell;
    const RESIDENT: u32 = 1;
    const INVALIDATING: u32 = 2;
    struct Page {
        state: AtomicU32,
        pins: AtomicU32,
        data: UnsafeCell<u64>,
    }
    // SAFETY (model): the protocol under test is what makes the accesses exclusive; loom
    // checks that it does.
    unsafe impl Sync for Page {}
    model(|| {
        let page = Arc::new(Page {
            state: AtomicU32::new(RESIDENT),
            pins: AtomicU32::new(0),
            data: UnsafeCell::new(0),
        });
        let p = page.clone();
        let engine = thread::spawn(move || {
            p.pins.fetch_add(1, Relaxed);
            fence(SeqCst);
            if p.state.load(Acquire) == RESIDENT {
                // The workgroup runs: it writes the page.
                // SAFETY: the pin is held and the page was seen RESIDENT after the SeqCst
                // fence, so the invalidator is not reading it (what this model checks).
                p.data.with_mut(|d| unsafe { *d += 1 });
            }
            p.pins.fetch_sub(1, Release);
        });
        // The invalidator: mark, then copy out only once no pin is seen.
        let marked = page
            .state
            .compare_exchange(RESIDENT, INVALIDATING, Relaxed, Relaxed)
            .is_ok();
        fence(SeqCst);
        if marked && page.pins.load(Acquire) == 0 {
            // SAFETY: the page is marked INVALIDATING and no pin was seen after the fence,
            // so no workgroup writes it (what this model checks).
            page.data.with(|d| unsafe { *d });
        }
        engine.join().unwrap();
    });
}
