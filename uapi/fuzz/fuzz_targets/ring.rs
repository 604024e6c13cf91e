//! Whole rings of garbage, run by the firmware's real queue consumer: arbitrary slots
//! (tagged or not), an arbitrary doorbell, fence bindings and a small VM. The firmware
//! must never panic, every service must end (the budget bounds it), and a queue that
//! stopped says why in its timeline's error record.
#![no_main]

use fw_emu::exec::Resources;
use fw_emu::fence::{Binding, FenceObject};
use fw_emu::kernels::KernelLibrary;
use fw_emu::queue::{Outcome, Queue};
use fw_emu::vm::Vm;
use fw_emu::QueueId;
use libfuzzer_sys::fuzz_target;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use userq_uapi::ioctl::Priority;
use userq_uapi::layout::{FenceState, FenceWaiters, QueueState};
use userq_uapi::packet::FenceHandle;
use userq_uapi::shm::{RingShm, Sealing, Shm};

const ENTRIES: u32 = 16;

fn fence(id: u64) -> Rc<FenceObject> {
    let (_s, state) = Shm::<FenceState>::create("fuzz-state", Sealing::Final, 0, id).unwrap();
    let (_w, waiters) = Shm::<FenceWaiters>::create("fuzz-waiters", Sealing::Final, 0, id).unwrap();
    Rc::new(FenceObject::new(id, state, waiters))
}

fuzz_target!(|data: &[u8]| {
    let word = |i: usize| {
        let mut b = [0u8; 8];
        for (j, byte) in b.iter_mut().enumerate() {
            *byte = data.get(i * 8 + j).copied().unwrap_or(0);
        }
        u64::from_le_bytes(b)
    };
    let (_fd, ring) = RingShm::create(ENTRIES, 0).unwrap();
    for i in 0..ENTRIES as u64 {
        for (k, w) in ring.slot(i).iter().enumerate() {
            w.store(word(1 + i as usize * 8 + k), Relaxed);
        }
    }
    let timeline = fence(1);
    let mut bindings = HashMap::new();
    bindings.insert(
        FenceHandle(1),
        Binding {
            fence: fence(2),
            writable: true,
            waiter_slot: 0,
        },
    );
    bindings.insert(
        FenceHandle(2),
        Binding {
            fence: timeline.clone(),
            writable: false,
            waiter_slot: 1,
        },
    );
    let vm = Vm::default();
    let kernels = KernelLibrary::builtin();
    let res = Resources {
        bindings: &bindings,
        vm: &vm,
        kernels: &kernels,
    };
    let id = QueueId { ctx: 1, slot: 0 };
    let mut q = Queue::new(id, ring, Priority::Normal, None, timeline.clone());
    let doorbell = AtomicU64::new(word(0));
    for _ in 0..4 {
        match q.service(&doorbell, &res, 8) {
            Outcome::Faulted(_) => {
                let st = timeline.state();
                assert_eq!(st.queue.state.load(Relaxed), QueueState::Error as u32);
                assert_ne!(st.record.code.load(Relaxed), 0);
                break;
            }
            Outcome::Idle | Outcome::Parked | Outcome::Dispatched(_) => break,
            Outcome::More => {}
        }
    }
    let _ = q.pending_signals(&doorbell);
});
