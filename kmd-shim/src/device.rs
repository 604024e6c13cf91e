//! DOC: the device table and its lock.
//!
//! One [`Device`] serves every connection. Its table records what each context holds
//! (queues, fence handles, buffer mappings: [`crate::context`]), every fence
//! ([`crate::fence`]) and every buffer memfd ([`crate::buffer`]), and the device-wide counts
//! the [`Limits`] apply to: contexts, fences, buffer mappings and the bytes charged to the
//! memory budget. The ioctls live with their objects: [`crate::context`] (OPEN_CONTEXT and
//! reclaim), [`crate::queue`], [`crate::fence`], [`crate::buffer`].
//!
//! Every ioctl follows one pattern. Under the table lock it checks the limits and *reserves*
//! what it is about to create — a context id, a queue slot and its ring bytes, a fence hold,
//! a buffer address and its budget bytes — as a guard that gives the reservation back when
//! it is dropped. With the lock released it creates the memory objects (sealed memfds) and
//! tells the firmware through [`FirmwareLink::call`]. Only then does it commit the guards
//! and answer the client, so a client never rings a doorbell the firmware has not mapped.
//! On an error the guards still armed unwind, latest first, and the client gets the status.
//!
//! The table lock protects the table and nothing else. It is held only to read and update
//! records, never across a firmware call (so never across a wait for an ack either): a slow
//! or hung firmware delays only the calls waiting for their own acks, never another
//! thread's use of the table. Nothing here waits on a fence or a job.

use crate::buffer::{BufferObject, ObjectIdentity};
use crate::context::ContextRecord;
use crate::fence::{FenceIdentity, FenceRecord};
use crate::firmware::{EventSink, FirmwareLink};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use userq_uapi::fwmsg::{FenceId, FwEvent};

/// Limits kmd-shim enforces.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Contexts open at once.
    pub max_contexts: usize,
    /// Fence handles one context may hold.
    pub max_fences_per_context: usize,
    /// Fences on the device. Each costs two mappings in kmd-shim and two in the firmware,
    /// so this stays well below the kernel's `vm.max_map_count` (65530 by default).
    pub max_fences: usize,
    /// Buffer mappings on the device, allocations and imports together (each is a mapping
    /// in the firmware; kmd-shim keeps a descriptor of each buffer, for imports).
    pub max_buffers: usize,
    /// Bytes of buffers and rings all contexts together may allocate.
    pub memory_budget: u64,
    /// Bytes of buffers one context may have allocated at once (so one client cannot take
    /// the whole budget).
    pub max_bytes_per_context: u64,
    /// Buffer mappings (allocations and imports) one context may have.
    pub max_buffers_per_context: usize,
    /// Queues one context may have (at most the 256 slots of a doorbell page).
    pub max_queues_per_context: usize,
    /// Hangs within [`Limits::ban_window`] after which a context is banned.
    pub ban_after_hangs: u32,
    /// The window of [`Limits::ban_after_hangs`].
    pub ban_window: std::time::Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_contexts: 1024,
            max_fences_per_context: userq_uapi::layout::WAITER_SLOTS,
            max_fences: 12288,
            max_buffers: 4096,
            memory_budget: 8 << 30,
            max_bytes_per_context: 2 << 30,
            max_buffers_per_context: 1024,
            max_queues_per_context: userq_uapi::layout::MAX_QUEUES_PER_CONTEXT,
            ban_after_hangs: 3,
            ban_window: std::time::Duration::from_secs(120),
        }
    }
}

/// kmd-shim's records of everything on the device. Only ever used through
/// [`Device::table`], and never held across a firmware call.
#[derive(Default)]
pub(crate) struct Table {
    /// Open contexts by id, reserved ones included.
    pub(crate) contexts: HashMap<u32, ContextRecord>,
    /// Registered fences by id.
    pub(crate) fences: HashMap<FenceId, FenceRecord>,
    /// Fences by the identity of their two objects, for IMPORT_FENCE.
    pub(crate) by_identity: HashMap<FenceIdentity, FenceId>,
    /// Buffer memfds by identity, for IMPORT_BUFFER.
    pub(crate) buffer_objects: HashMap<ObjectIdentity, BufferObject>,
    /// Buffer mappings in all contexts (allocations and imports, reserved ones included):
    /// each is a mapping in the firmware, so they count against `Limits::max_buffers` too.
    pub(crate) buffer_mappings: usize,
    /// Telemetry rows in use (a context's row indexes its telemetry lines).
    pub(crate) telemetry_rows: Vec<bool>,
    /// Where the search for a free context id starts; never 0 once the device is made.
    pub(crate) next_ctx: u32,
    /// The next fence id; ids are never reused.
    pub(crate) next_fence: FenceId,
    /// Fences being registered (counted against `Limits::max_fences` with `fences`, so
    /// creations on several connections at once cannot pass the limit).
    pub(crate) fences_registering: usize,
    /// Bytes charged to `Limits::memory_budget`: rings, buffer reservations and buffer
    /// objects.
    pub(crate) memory_used: u64,
}

/// The device: firmware link plus table.
pub struct Device {
    /// The firmware of the current generation; replaced on a restart ([`crate::restart`]).
    link: RwLock<Arc<FirmwareLink>>,
    pub(crate) limits: Limits,
    table: Mutex<Table>,
    pub(crate) verbose: bool,
    /// On-demand memory ([`crate::pager`]).
    pub(crate) pager: crate::pager::Pager,
    /// The event log ([`crate::telemetry`]); it outlives firmware generations.
    pub(crate) events: Arc<crate::telemetry::EventLogWriter>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("link", &self.link())
            .finish_non_exhaustive()
    }
}

impl Device {
    /// A device over a started firmware link.
    pub fn new(
        link: FirmwareLink,
        limits: Limits,
        verbose: bool,
        eviction: crate::pager::EvictionPolicy,
        events: Arc<crate::telemetry::EventLogWriter>,
    ) -> Self {
        Device {
            link: RwLock::new(Arc::new(link)),
            limits,
            table: Mutex::new(Table {
                next_ctx: 1,
                next_fence: 1,
                telemetry_rows: vec![false; userq_uapi::layout::TELEMETRY_CONTEXTS],
                ..Table::default()
            }),
            verbose,
            pager: crate::pager::Pager::new(eviction, events.clone()),
            events,
        }
    }

    /// The firmware link of the current generation.
    pub fn link(&self) -> Arc<FirmwareLink> {
        self.link.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Makes a restarted firmware the device's.
    pub(crate) fn replace_link(&self, link: Arc<FirmwareLink>) {
        *self.link.write().unwrap_or_else(|e| e.into_inner()) = link;
    }

    /// The current device generation (bumped by each firmware restart).
    pub fn generation(&self) -> u64 {
        self.link().generation()
    }

    /// Whether context `ctx` belongs to the current generation (a context of a lost
    /// firmware stays lost).
    pub(crate) fn is_current(&self, ctx: u32) -> bool {
        let generation = self.generation();
        self.table()
            .contexts
            .get(&ctx)
            .is_some_and(|c| c.generation == generation)
    }

    /// Locks the table. Drop the guard before any firmware call, and before a reservation
    /// guard can drop (its drop takes the lock).
    pub(crate) fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl EventSink for Device {
    fn queue_error(&self, ev: FwEvent) {
        if let FwEvent::QueueError {
            ctx,
            slot,
            code,
            packet_index,
            address,
            detail,
        } = ev
        {
            self.count_victim(ctx, code, detail);
            self.event(
                userq_uapi::layout::EventKind::QueueError,
                ctx,
                slot,
                [code as u64, address, packet_index],
            );
            if self.verbose {
                eprintln!(
                    "kmd-shim: context {ctx} queue {slot} stopped at packet {packet_index}: {} (address/index {address:#x})",
                    code.describe()
                );
            }
        }
    }

    fn hang(&self, ev: FwEvent) {
        self.on_hang(ev);
    }

    fn fault(&self, ev: FwEvent) {
        self.pager.on_fault(ev);
    }

    fn busy(&self, ev: FwEvent) {
        self.pager
            .busy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(ev);
    }

    fn device_lost(&self) {
        eprintln!("kmd-shim: firmware lost; every fence is poisoned with DeviceLost");
        self.event(
            userq_uapi::layout::EventKind::DeviceLost,
            0,
            u32::MAX,
            [self.generation(), 0, 0],
        );
        self.count_device_loss();
        self.poison_all();
    }
}
