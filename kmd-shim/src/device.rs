//! DOC: the device table: contexts, fences and buffers, and the ioctls that change them.
//!
//! One [`Device`] serves every connection. Each ioctl creates kmd-side records, creates the
//! memory objects (sealed memfds), tells the firmware through [`FirmwareLink::call`], and
//! only then answers the client, so a client never rings a doorbell the firmware has not
//! mapped. The table lock is never held across a firmware call's wait for its ack except
//! for the short, bounded acks themselves; nothing here waits on a fence or a job.
//!
//! Fence ownership: a fence is *held* through handles; each context's handle is one hold.
//! A user fence is *owned* by the context that created it; when the owner goes away while
//! others still hold the fence, the fence is poisoned with [`ErrorCode::OwnerDied`]
//! (waits that were already satisfied still succeed). When the last hold goes, the firmware
//! forgets the fence.

use crate::firmware::{EventSink, FirmwareLink};
use rustix::fd::{AsFd, OwnedFd};
use std::collections::HashMap;
use std::sync::atomic::Ordering::*;
use std::sync::Mutex;
use userq_uapi::error::ErrorCode;
use userq_uapi::fwmsg::{FenceId, FwEvent, FwRequest};
use userq_uapi::ioctl::{
    BufferReply, CreateFenceReply, CreateQueueReply, ImportFenceReply, OpenContextReply, Priority,
    MAX_BUFFER_SIZE,
};
use userq_uapi::layout::{
    magic, ring_object_size, DoorbellPage, FenceKind, FenceState, FenceWaiters, RingHeader,
    DOORBELL_PAGE_SIZE, MAX_QUEUES_PER_CONTEXT, MAX_RING_ENTRIES, MIN_RING_ENTRIES, PAGE_SIZE,
};
use userq_uapi::os::{self, Mapping};
use userq_uapi::packet::FenceHandle;
use userq_uapi::{sync, KmdStatus};

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
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_contexts: 1024,
            max_fences_per_context: 4096,
            max_fences: 12288,
            max_buffers: 4096,
            memory_budget: 8 << 30,
        }
    }
}

/// A buffer mapped into a context.
#[derive(Clone, Copy)]
struct BufferRecord {
    /// (device, inode) of its memfd, once created.
    object: Option<(u64, u64)>,
    /// Bytes reserved in the budget before the memfd existed (moved to the object once it
    /// does; zero for an import).
    reserved: u64,
}

/// A buffer memfd any context may import.
struct BufferObject {
    /// Bytes the VM maps (as asked at allocation).
    size: u64,
    /// Bytes charged to the budget: the memory lives, and stays charged, until the last
    /// mapping of it goes, whoever allocated it.
    charged: u64,
    /// The memfd, kept to map it into importers.
    fd: OwnedFd,
    /// Mappings of it, in all contexts.
    refs: usize,
}

/// (device, inode) of a fence's state object and of its waiter object.
type Identity = ((u64, u64), (u64, u64));

struct FenceRecord {
    kind: FenceKind,
    owner: u32,
    holds: usize,
    identity: Identity,
    state: Mapping,
    waiters: Mapping,
}

#[derive(Default)]
struct ContextRecord {
    /// Queue slot → (timeline fence, ring bytes charged to the budget).
    queues: HashMap<u32, (FenceId, u64)>,
    handles: HashMap<FenceHandle, FenceId>,
    next_handle: u32,
    /// Buffers by device address.
    buffers: HashMap<u64, BufferRecord>,
    next_va: u64,
}

#[derive(Default)]
struct Table {
    contexts: HashMap<u32, ContextRecord>,
    fences: HashMap<FenceId, FenceRecord>,
    /// Fences by the identity of their two objects, for IMPORT_FENCE.
    by_identity: HashMap<Identity, FenceId>,
    /// Buffer memfds by identity, for IMPORT_BUFFER.
    buffer_objects: HashMap<(u64, u64), BufferObject>,
    /// Buffer mappings in all contexts (allocations and imports): each is a mapping in the
    /// firmware, so they count against `Limits::max_buffers` too.
    buffer_mappings: usize,
    next_ctx: u32,
    next_fence: FenceId,
    memory_used: u64,
}

impl ContextRecord {
    /// Places a buffer of `bytes` (whole pages) in the context's VM, 64 KiB-aligned with an
    /// unmapped guard range after it, and records it.
    fn map_buffer(&mut self, bytes: u64, record: BufferRecord) -> Result<u64, KmdStatus> {
        let va = self.next_va;
        let next = (va + bytes).div_ceil(VA_ALIGN) * VA_ALIGN + VA_ALIGN;
        if next > userq_uapi::VA_END {
            return Err(KmdStatus::OutOfMemory);
        }
        self.next_va = next;
        self.buffers.insert(va, record);
        Ok(va)
    }
}

impl Table {
    /// Removes a buffer mapping; the memfd and its charge go with the last mapping.
    fn release_buffer(&mut self, b: BufferRecord) {
        self.buffer_mappings -= 1;
        self.memory_used -= b.reserved;
        if let Some(id) = b.object {
            if let Some(o) = self.buffer_objects.get_mut(&id) {
                o.refs -= 1;
                if o.refs == 0 {
                    self.memory_used -= o.charged;
                    self.buffer_objects.remove(&id);
                }
            }
        }
    }

    fn forget_fence(&mut self, fence: FenceId) {
        if let Some(f) = self.fences.remove(&fence) {
            self.by_identity.remove(&f.identity);
        }
    }
}

/// The device: firmware link plus table.
pub struct Device {
    link: FirmwareLink,
    limits: Limits,
    table: Mutex<Table>,
    verbose: bool,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("link", &self.link)
            .finish_non_exhaustive()
    }
}

const VA_ALIGN: u64 = 64 << 10;

impl Device {
    /// A device over a started firmware link.
    pub fn new(link: FirmwareLink, limits: Limits, verbose: bool) -> Self {
        Device {
            link,
            limits,
            table: Mutex::new(Table {
                next_ctx: 1,
                next_fence: 1,
                ..Table::default()
            }),
            verbose,
        }
    }

    /// The firmware link.
    pub fn link(&self) -> &FirmwareLink {
        &self.link
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// OPEN_CONTEXT: the reply, and the doorbell page (rw), the device status (ro) and the
    /// device kick (rw).
    pub fn open_context(&self) -> Result<(OpenContextReply, [OwnedFd; 3]), KmdStatus> {
        let ctx = {
            let mut t = self.table();
            if t.contexts.len() >= self.limits.max_contexts {
                return Err(KmdStatus::LimitExceeded);
            }
            // Skip ids still in use (after wrapping around u32).
            let mut ctx = t.next_ctx;
            while ctx == 0 || t.contexts.contains_key(&ctx) {
                ctx = ctx.wrapping_add(1);
            }
            t.next_ctx = ctx.wrapping_add(1);
            t.contexts.insert(
                ctx,
                ContextRecord {
                    next_va: userq_uapi::VA_BASE,
                    ..ContextRecord::default()
                },
            );
            ctx
        };
        let made = (|| {
            let (fd, map) = os::create_object("userq-doorbell", DOORBELL_PAGE_SIZE)
                .map_err(|_| KmdStatus::Internal)?;
            map.head::<DoorbellPage>()
                .header
                .init(magic::DOORBELL, 0, ctx as u64);
            let id = self.link.new_object_id();
            self.link.call(
                FwRequest::MapContext { ctx, doorbell: id },
                &[(id, fd.as_fd())],
            )?;
            let status = self
                .link
                .status_fd_read_only()
                .try_clone_to_owned()
                .map_err(|_| KmdStatus::Internal)?;
            let kick = self
                .link
                .kick_fd()
                .try_clone_to_owned()
                .map_err(|_| KmdStatus::Internal)?;
            let generation = self.link.status().health.generation.load(Relaxed);
            Ok((OpenContextReply { ctx, generation }, [fd, status, kick]))
        })();
        match made {
            Ok(r) => Ok(r),
            Err(e) => {
                self.table().contexts.remove(&ctx);
                Err(e)
            }
        }
    }

    /// Creates a fence's two objects and registers it with the firmware.
    fn new_fence(
        &self,
        kind: FenceKind,
        owner: u32,
        initial: u64,
    ) -> Result<(FenceId, OwnedFd, OwnedFd), KmdStatus> {
        let internal = |_| KmdStatus::Internal;
        let id = {
            let mut t = self.table();
            if t.fences.len() >= self.limits.max_fences {
                return Err(KmdStatus::LimitExceeded);
            }
            let id = t.next_fence;
            t.next_fence += 1; // u64: does not wrap in practice
            id
        };
        // A timeline's value side is written only by the firmware (and kmd-shim): sealed
        // read-only once the firmware has mapped it, below.
        let (sfd, state) = match kind {
            FenceKind::Timeline => os::create_firmware_object("userq-timeline", PAGE_SIZE),
            FenceKind::User => os::create_object("userq-fence", PAGE_SIZE),
        }
        .map_err(internal)?;
        let st = state.head::<FenceState>();
        st.header.init(magic::FENCE_STATE, kind as u32, id);
        st.slot.value.store(initial, Relaxed);
        let (wfd, waiters) =
            os::create_object("userq-fence-waiters", PAGE_SIZE).map_err(internal)?;
        waiters
            .head::<FenceWaiters>()
            .header
            .init(magic::FENCE_WAITERS, kind as u32, id);
        let identity = (
            os::object_identity(sfd.as_fd()).map_err(internal)?,
            os::object_identity(wfd.as_fd()).map_err(internal)?,
        );
        let (so, wo) = (self.link.new_object_id(), self.link.new_object_id());
        self.link.call(
            FwRequest::RegisterFence {
                fence: id,
                state: so,
                waiters: wo,
            },
            &[(so, sfd.as_fd()), (wo, wfd.as_fd())],
        )?;
        if kind == FenceKind::Timeline {
            os::seal_read_only(sfd.as_fd()).map_err(internal)?;
        }
        let mut t = self.table();
        t.by_identity.insert(identity, id);
        t.fences.insert(
            id,
            FenceRecord {
                kind,
                owner,
                holds: 0,
                identity,
                state,
                waiters,
            },
        );
        Ok((id, sfd, wfd))
    }

    /// Gives `ctx` a handle on `fence`.
    fn bind(&self, ctx: u32, fence: FenceId) -> Result<FenceHandle, KmdStatus> {
        let (handle, writable) = {
            let mut t = self.table();
            let kind = t.fences.get(&fence).ok_or(KmdStatus::NotFound)?.kind;
            let c = t.contexts.get_mut(&ctx).ok_or(KmdStatus::NoContext)?;
            if c.handles.len() >= self.limits.max_fences_per_context {
                return Err(KmdStatus::LimitExceeded);
            }
            let handle = FenceHandle(c.next_handle);
            c.next_handle = c
                .next_handle
                .checked_add(1)
                .ok_or(KmdStatus::LimitExceeded)?;
            c.handles.insert(handle, fence);
            if let Some(f) = t.fences.get_mut(&fence) {
                f.holds += 1;
            }
            (handle, kind == FenceKind::User)
        };
        let r = self.link.call(
            FwRequest::BindFence {
                ctx,
                handle,
                fence,
                writable,
            },
            &[],
        );
        if let Err(e) = r {
            self.drop_hold(ctx, handle);
            return Err(e);
        }
        Ok(handle)
    }

    /// Removes a hold from the table; tells the firmware to forget a fence nobody holds.
    fn drop_hold(&self, ctx: u32, handle: FenceHandle) -> Option<FenceId> {
        let mut t = self.table();
        let fence = t.contexts.get_mut(&ctx)?.handles.remove(&handle)?;
        let f = t.fences.get_mut(&fence)?;
        f.holds -= 1;
        if f.holds == 0 {
            t.forget_fence(fence);
            drop(t);
            let _ = self.link.call(FwRequest::DropFence { fence }, &[]);
        }
        Some(fence)
    }

    /// CREATE_QUEUE.
    pub fn create_queue(
        &self,
        ctx: u32,
        entries: u32,
        priority: Priority,
        time_slice_us: u32,
    ) -> Result<(CreateQueueReply, [OwnedFd; 3]), KmdStatus> {
        if !entries.is_power_of_two()
            || !(MIN_RING_ENTRIES..=MAX_RING_ENTRIES).contains(&entries)
            || time_slice_us > userq_uapi::ioctl::MAX_TIME_SLICE_US
        {
            return Err(KmdStatus::InvalidArgument);
        }
        let ring_bytes = ring_object_size(entries) as u64;
        let slot = {
            let mut t = self.table();
            if t.memory_used + ring_bytes > self.limits.memory_budget {
                return Err(KmdStatus::OutOfMemory);
            }
            let c = t.contexts.get(&ctx).ok_or(KmdStatus::NoContext)?;
            let slot = (0..MAX_QUEUES_PER_CONTEXT as u32)
                .find(|s| !c.queues.contains_key(s))
                .ok_or(KmdStatus::LimitExceeded)?;
            // Reserve the slot and the bytes now; released below if creation fails.
            t.memory_used += ring_bytes;
            if let Some(c) = t.contexts.get_mut(&ctx) {
                c.queues.insert(slot, (0, ring_bytes));
            }
            slot
        };
        let release_slot = || {
            let mut t = self.table();
            t.memory_used -= ring_bytes;
            if let Some(c) = t.contexts.get_mut(&ctx) {
                c.queues.remove(&slot);
            }
        };
        let (fence, sfd, wfd) = match self.new_fence(FenceKind::Timeline, ctx, 0) {
            Ok(f) => f,
            Err(e) => {
                release_slot();
                return Err(e);
            }
        };
        let handle = match self.bind(ctx, fence) {
            Ok(h) => h,
            Err(e) => {
                let _ = self.link.call(FwRequest::DropFence { fence }, &[]);
                self.table().forget_fence(fence);
                release_slot();
                return Err(e);
            }
        };
        let made = (|| {
            let size = ring_object_size(entries);
            let (rfd, ring) =
                os::create_object("userq-ring", size).map_err(|_| KmdStatus::Internal)?;
            ring.head::<RingHeader>()
                .header
                .init(magic::RING, entries, slot as u64);
            let ro = self.link.new_object_id();
            self.link.call(
                FwRequest::MapQueue {
                    ctx,
                    slot,
                    ring: ro,
                    entries,
                    priority,
                    timeline: fence,
                    time_slice_us,
                },
                &[(ro, rfd.as_fd())],
            )?;
            let state_ro = os::reopen_read_only(sfd.as_fd()).map_err(|_| KmdStatus::Internal)?;
            Ok((rfd, state_ro))
        })();
        match made {
            Ok((rfd, state_ro)) => {
                if let Some(c) = self.table().contexts.get_mut(&ctx) {
                    c.queues.insert(slot, (fence, ring_bytes));
                }
                Ok((
                    CreateQueueReply {
                        slot,
                        timeline: handle,
                        fence,
                    },
                    [rfd, state_ro, wfd],
                ))
            }
            Err(e) => {
                let _ = self.link.call(FwRequest::UnbindFence { ctx, handle }, &[]);
                self.drop_hold(ctx, handle);
                release_slot();
                Err(e)
            }
        }
    }

    /// DESTROY_QUEUE. The timeline fence stays held by its handle until released.
    pub fn destroy_queue(&self, ctx: u32, slot: u32) -> Result<(), KmdStatus> {
        {
            let t = self.table();
            let c = t.contexts.get(&ctx).ok_or(KmdStatus::NoContext)?;
            if !c.queues.contains_key(&slot) {
                return Err(KmdStatus::NotFound);
            }
        }
        self.link.call(FwRequest::UnmapQueue { ctx, slot }, &[])?;
        let mut t = self.table();
        if let Some((_, bytes)) = t
            .contexts
            .get_mut(&ctx)
            .and_then(|c| c.queues.remove(&slot))
        {
            t.memory_used -= bytes;
        }
        Ok(())
    }

    /// CREATE_FENCE: the reply, and the fence's state (rw) and waiters (rw).
    pub fn create_fence(
        &self,
        ctx: u32,
        initial: u64,
    ) -> Result<(CreateFenceReply, [OwnedFd; 2]), KmdStatus> {
        if !self.table().contexts.contains_key(&ctx) {
            return Err(KmdStatus::NoContext);
        }
        let (fence, sfd, wfd) = self.new_fence(FenceKind::User, ctx, initial)?;
        match self.bind(ctx, fence) {
            Ok(handle) => Ok((CreateFenceReply { handle, fence }, [sfd, wfd])),
            Err(e) => {
                let _ = self.link.call(FwRequest::DropFence { fence }, &[]);
                self.table().forget_fence(fence);
                Err(e)
            }
        }
    }

    /// IMPORT_FENCE: the fds must be the state and waiter objects of one live fence.
    pub fn import_fence(&self, ctx: u32, fds: &[OwnedFd]) -> Result<ImportFenceReply, KmdStatus> {
        let [sfd, wfd] = fds else {
            return Err(KmdStatus::BadFd);
        };
        let ident = (
            os::object_identity(sfd.as_fd()).map_err(|_| KmdStatus::BadFd)?,
            os::object_identity(wfd.as_fd()).map_err(|_| KmdStatus::BadFd)?,
        );
        let (fence, kind) = {
            let t = self.table();
            if !t.contexts.contains_key(&ctx) {
                return Err(KmdStatus::NoContext);
            }
            let id = *t.by_identity.get(&ident).ok_or(KmdStatus::BadFd)?;
            (id, t.fences.get(&id).ok_or(KmdStatus::BadFd)?.kind)
        };
        let handle = self.bind(ctx, fence)?;
        Ok(ImportFenceReply {
            handle,
            fence,
            kind,
        })
    }

    /// RELEASE_FENCE.
    pub fn release_fence(&self, ctx: u32, handle: FenceHandle) -> Result<(), KmdStatus> {
        {
            let t = self.table();
            let c = t.contexts.get(&ctx).ok_or(KmdStatus::NoContext)?;
            if !c.handles.contains_key(&handle) {
                return Err(KmdStatus::NotFound);
            }
        }
        self.link
            .call(FwRequest::UnbindFence { ctx, handle }, &[])?;
        self.drop_hold(ctx, handle);
        Ok(())
    }

    /// ALLOC_BUFFER: the reply, and the buffer's memfd (rw).
    pub fn alloc_buffer(
        &self,
        ctx: u32,
        size: u64,
    ) -> Result<(BufferReply, [OwnedFd; 1]), KmdStatus> {
        if size == 0 || size > MAX_BUFFER_SIZE {
            return Err(KmdStatus::InvalidArgument);
        }
        // The VM maps exactly the bytes asked for, so a kernel's view of the buffer ends where
        // the buffer does; the memfd (and the budget) are whole pages.
        let requested = size;
        let size = size.div_ceil(PAGE_SIZE as u64) * PAGE_SIZE as u64;
        let va = {
            let mut t = self.table();
            if t.memory_used + size > self.limits.memory_budget {
                return Err(KmdStatus::OutOfMemory);
            }
            if t.buffer_mappings >= self.limits.max_buffers {
                return Err(KmdStatus::LimitExceeded);
            }
            let c = t.contexts.get_mut(&ctx).ok_or(KmdStatus::NoContext)?;
            let va = c.map_buffer(
                size,
                BufferRecord {
                    object: None,
                    reserved: size,
                },
            )?;
            t.memory_used += size;
            t.buffer_mappings += 1;
            va
        };
        let made = (|| {
            let fd = rustix::fs::memfd_create(
                "userq-buffer",
                rustix::fs::MemfdFlags::CLOEXEC | rustix::fs::MemfdFlags::ALLOW_SEALING,
            )
            .map_err(|_| KmdStatus::Internal)?;
            rustix::fs::ftruncate(&fd, size).map_err(|_| KmdStatus::OutOfMemory)?;
            rustix::fs::fcntl_add_seals(
                &fd,
                rustix::fs::SealFlags::SHRINK
                    | rustix::fs::SealFlags::GROW
                    | rustix::fs::SealFlags::SEAL,
            )
            .map_err(|_| KmdStatus::Internal)?;
            let id = self.link.new_object_id();
            self.link.call(
                FwRequest::MapBuffer {
                    ctx,
                    va,
                    size: requested,
                    object: id,
                },
                &[(id, fd.as_fd())],
            )?;
            Ok(fd)
        })();
        let made = made.and_then(|fd| {
            let identity = os::object_identity(fd.as_fd()).map_err(|_| KmdStatus::Internal)?;
            let kept = fd.try_clone().map_err(|_| KmdStatus::Internal)?;
            Ok((fd, identity, kept))
        });
        match made {
            Ok((fd, identity, kept)) => {
                let mut t = self.table();
                t.buffer_objects.insert(
                    identity,
                    BufferObject {
                        size: requested,
                        charged: size,
                        fd: kept,
                        refs: 1,
                    },
                );
                if let Some(b) = t
                    .contexts
                    .get_mut(&ctx)
                    .and_then(|c| c.buffers.get_mut(&va))
                {
                    b.object = Some(identity);
                    b.reserved = 0; // the object carries the charge now
                }
                Ok((
                    BufferReply {
                        va,
                        size: requested,
                    },
                    [fd],
                ))
            }
            Err(e) => {
                let mut t = self.table();
                if let Some(b) = t.contexts.get_mut(&ctx).and_then(|c| c.buffers.remove(&va)) {
                    t.release_buffer(b);
                }
                Err(e)
            }
        }
    }

    /// IMPORT_BUFFER: the fd must be a buffer of this device.
    pub fn import_buffer(&self, ctx: u32, fds: &[OwnedFd]) -> Result<BufferReply, KmdStatus> {
        let [fd] = fds else {
            return Err(KmdStatus::BadFd);
        };
        let identity = os::object_identity(fd.as_fd()).map_err(|_| KmdStatus::BadFd)?;
        let (va, size, ours) = {
            let mut t = self.table();
            if t.buffer_mappings >= self.limits.max_buffers {
                return Err(KmdStatus::LimitExceeded);
            }
            let obj = t.buffer_objects.get(&identity).ok_or(KmdStatus::BadFd)?;
            let size = obj.size;
            let ours = obj.fd.try_clone().map_err(|_| KmdStatus::Internal)?;
            let c = t.contexts.get_mut(&ctx).ok_or(KmdStatus::NoContext)?;
            let pages = size.div_ceil(PAGE_SIZE as u64) * PAGE_SIZE as u64;
            let va = c.map_buffer(
                pages,
                BufferRecord {
                    object: Some(identity),
                    reserved: 0,
                },
            )?;
            t.buffer_mappings += 1;
            if let Some(o) = t.buffer_objects.get_mut(&identity) {
                o.refs += 1;
            }
            (va, size, ours)
        };
        let id = self.link.new_object_id();
        let r = self.link.call(
            FwRequest::MapBuffer {
                ctx,
                va,
                size,
                object: id,
            },
            &[(id, ours.as_fd())],
        );
        match r {
            Ok(()) => Ok(BufferReply { va, size }),
            Err(e) => {
                let mut t = self.table();
                if let Some(b) = t.contexts.get_mut(&ctx).and_then(|c| c.buffers.remove(&va)) {
                    t.release_buffer(b);
                }
                Err(e)
            }
        }
    }

    /// FREE_BUFFER.
    pub fn free_buffer(&self, ctx: u32, va: u64) -> Result<(), KmdStatus> {
        {
            let t = self.table();
            let c = t.contexts.get(&ctx).ok_or(KmdStatus::NoContext)?;
            if !c.buffers.contains_key(&va) {
                return Err(KmdStatus::NotFound);
            }
        }
        self.link.call(FwRequest::UnmapBuffer { ctx, va }, &[])?;
        let mut t = self.table();
        if let Some(b) = t.contexts.get_mut(&ctx).and_then(|c| c.buffers.remove(&va)) {
            t.release_buffer(b);
        }
        Ok(())
    }

    /// Suspends one queue (`slot`) or every queue of a context: when this returns, none of
    /// its packets runs and no workgroup of its dispatches is on an engine (the firmware
    /// acknowledges once running workgroups have yielded). The memory stays mapped.
    pub fn suspend(&self, ctx: u32, slot: Option<u32>) -> Result<(), KmdStatus> {
        self.link.call(FwRequest::Suspend { ctx, slot }, &[])
    }

    /// Undoes [`Device::suspend`].
    pub fn resume(&self, ctx: u32, slot: Option<u32>) -> Result<(), KmdStatus> {
        self.link.call(FwRequest::Resume { ctx, slot }, &[])
    }

    /// Reclaims everything a context owned: called when its connection closes, however
    /// the client ended.
    pub fn close_context(&self, ctx: u32) {
        let _ = self.link.call(FwRequest::UnmapContext { ctx }, &[]);
        let Some(c) = self.table().contexts.remove(&ctx) else {
            return;
        };
        let mut t = self.table();
        for b in c.buffers.values() {
            t.release_buffer(*b);
        }
        t.memory_used -= c.queues.values().map(|(_, bytes)| bytes).sum::<u64>();
        let mut to_drop = Vec::new();
        let mut to_poison = Vec::new();
        for fence in c.handles.values() {
            if let Some(f) = t.fences.get_mut(fence) {
                f.holds -= 1;
                if f.holds == 0 {
                    to_drop.push(*fence);
                }
            }
        }
        for fence in &to_drop {
            t.forget_fence(*fence);
        }
        for (id, f) in &t.fences {
            if f.owner == ctx && f.kind == FenceKind::User {
                to_poison.push(*id);
            }
        }
        drop(t);
        for fence in to_poison {
            let _ = self.link.call(
                FwRequest::PoisonFence {
                    fence,
                    code: ErrorCode::OwnerDied,
                },
                &[],
            );
        }
        for fence in to_drop {
            let _ = self.link.call(FwRequest::DropFence { fence }, &[]);
        }
    }

    /// Poisons every fence with [`ErrorCode::DeviceLost`]: the firmware is gone, so
    /// kmd-shim writes the fences itself.
    pub fn poison_all(&self) {
        let t = self.table();
        for f in t.fences.values() {
            sync::poison_fence(
                f.state.head(),
                f.waiters.head(),
                ErrorCode::DeviceLost,
                0,
                0,
                0,
            );
        }
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
        } = ev
        {
            if self.verbose {
                eprintln!(
                    "kmd-shim: context {ctx} queue {slot} stopped at packet {packet_index}: {} (address/index {address:#x})",
                    code.describe()
                );
            }
        }
    }

    fn device_lost(&self) {
        eprintln!("kmd-shim: firmware lost; every fence is poisoned with DeviceLost");
        self.poison_all();
    }
}
