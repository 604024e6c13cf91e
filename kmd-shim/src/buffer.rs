//! DOC: buffers: ALLOC_BUFFER, IMPORT_BUFFER, FREE_BUFFER, and where buffers go in a VM.
//!
//! A buffer is a sealed memfd (whole pages) mapped into a context's device address space.
//! Each context places its buffers from `VA_BASE` up, 64 KiB-aligned, with an unmapped
//! 64 KiB guard after each; addresses are never reused within a context. The VM maps
//! exactly the bytes asked for, so a kernel's view of the buffer ends where the buffer
//! does.
//!
//! kmd-shim keeps one descriptor of every buffer memfd (a `BufferObject`), so that
//! IMPORT_BUFFER can recognise it by identity and map it into another context. An import
//! is charged nothing: the bytes stay charged to the budget from the allocation until the
//! last mapping of the memfd goes, whoever allocated it.
//!
//! Both ioctls reserve the address (and, for an allocation, the budget bytes) under the
//! table lock as a `BufferReservation`, which gives both back if the memfd or the
//! firmware's mapping fails.

use crate::context::ContextRecord;
use crate::device::{Device, Table};
use rustix::fd::{AsFd, OwnedFd};
use userq_uapi::fwmsg::FwRequest;
use userq_uapi::ioctl::{BufferReply, MAX_BUFFER_SIZE};
use userq_uapi::layout::PAGE_SIZE;
use userq_uapi::os;
use userq_uapi::shm::Sealing;
use userq_uapi::KmdStatus;

/// (device, inode) of a memfd: how kmd-shim recognises an object a client hands back.
pub(crate) type ObjectIdentity = (u64, u64);

/// Alignment of buffer addresses, and the size of the guard after each buffer.
const VA_ALIGN: u64 = 64 << 10;

/// A buffer mapped into a context.
#[derive(Clone, Copy)]
pub(crate) struct BufferRecord {
    /// Identity of its memfd, once created.
    object: Option<ObjectIdentity>,
    /// Bytes reserved in the budget before the memfd existed (moved to the object once it
    /// does; zero for an import).
    reserved: u64,
    /// Bytes this context allocated for it (whole pages; zero for an import): what counts
    /// against [`crate::Limits::max_bytes_per_context`].
    allocated: u64,
}

/// A buffer memfd any context may import.
pub(crate) struct BufferObject {
    /// Bytes the VM maps (as asked at allocation).
    size: u64,
    /// Bytes charged to the budget: the memory lives, and stays charged, until the last
    /// mapping of it goes, whoever allocated it.
    charged: u64,
    /// The memfd, kept to map it into importers.
    fd: OwnedFd,
    /// Mappings of it, in all contexts.
    refs: usize,
    /// An on-demand buffer's host copy: not importable (its device pages belong to one
    /// context's window).
    on_demand: bool,
}

/// Whole pages for `bytes`.
pub(crate) fn whole_pages(bytes: u64) -> u64 {
    bytes.div_ceil(PAGE_SIZE as u64) * PAGE_SIZE as u64
}

impl ContextRecord {
    /// Bytes of buffers this context allocated and still maps.
    fn allocated_bytes(&self) -> u64 {
        self.buffers.values().map(|b| b.allocated).sum()
    }

    /// Places a buffer of `bytes` (whole pages) in the context's VM, 64 KiB-aligned with an
    /// unmapped guard range after it, and records it.
    fn place_buffer(&mut self, bytes: u64, record: BufferRecord) -> Result<u64, KmdStatus> {
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
    pub(crate) fn release_buffer(&mut self, b: BufferRecord) {
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
}

/// A buffer address in a context's VM, its mapping count and its budget bytes (for an
/// allocation) or its reference on the memfd (for an import), reserved in the table. Until
/// committed, dropping it removes the record and gives all of it back.
struct BufferReservation<'a> {
    dev: &'a Device,
    ctx: u32,
    va: u64,
    armed: bool,
}

impl BufferReservation<'_> {
    /// Keeps the mapping of an import.
    fn commit(mut self) {
        self.armed = false;
    }

    /// Keeps the mapping of an allocation, whose memfd now exists: records the memfd,
    /// which carries the budget charge from now on.
    fn commit_object(mut self, identity: ObjectIdentity, object: BufferObject) {
        let mut t = self.dev.table();
        t.buffer_objects.insert(identity, object);
        if let Some(b) = t
            .contexts
            .get_mut(&self.ctx)
            .and_then(|c| c.buffers.get_mut(&self.va))
        {
            b.object = Some(identity);
            b.reserved = 0; // the object carries the charge now
        }
        drop(t);
        self.armed = false;
    }
}

impl Drop for BufferReservation<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut t = self.dev.table();
        if let Some(b) = t
            .contexts
            .get_mut(&self.ctx)
            .and_then(|c| c.buffers.remove(&self.va))
        {
            t.release_buffer(b);
        }
    }
}

impl Device {
    /// Reserves an address in `ctx`'s VM and `pages` bytes of the budget for a new buffer.
    fn reserve_allocation(&self, ctx: u32, pages: u64) -> Result<BufferReservation<'_>, KmdStatus> {
        let mut t = self.table();
        if t.memory_used + pages > self.limits.memory_budget {
            return Err(KmdStatus::OutOfMemory);
        }
        if t.buffer_mappings >= self.limits.max_buffers {
            return Err(KmdStatus::LimitExceeded);
        }
        let c = t.contexts.get_mut(&ctx).ok_or(KmdStatus::NoContext)?;
        if c.buffers.len() >= self.limits.max_buffers_per_context {
            return Err(KmdStatus::LimitExceeded);
        }
        if c.allocated_bytes() + pages > self.limits.max_bytes_per_context {
            return Err(KmdStatus::OutOfMemory);
        }
        let va = c.place_buffer(
            pages,
            BufferRecord {
                object: None,
                reserved: pages,
                allocated: pages,
            },
        )?;
        t.memory_used += pages;
        t.buffer_mappings += 1;
        drop(t);
        Ok(BufferReservation {
            dev: self,
            ctx,
            va,
            armed: true,
        })
    }

    /// Reserves an address in `ctx`'s VM for the buffer memfd `identity` and takes a
    /// reference on it; returns the reservation, the buffer's size and a descriptor of it
    /// for the firmware.
    fn reserve_import(
        &self,
        ctx: u32,
        identity: ObjectIdentity,
    ) -> Result<(BufferReservation<'_>, u64, OwnedFd), KmdStatus> {
        let mut t = self.table();
        if t.buffer_mappings >= self.limits.max_buffers {
            return Err(KmdStatus::LimitExceeded);
        }
        let object = t.buffer_objects.get(&identity).ok_or(KmdStatus::BadFd)?;
        if object.on_demand {
            return Err(KmdStatus::InvalidArgument);
        }
        let size = object.size;
        let fd = object.fd.try_clone().map_err(|_| KmdStatus::Internal)?;
        let c = t.contexts.get_mut(&ctx).ok_or(KmdStatus::NoContext)?;
        if c.buffers.len() >= self.limits.max_buffers_per_context {
            return Err(KmdStatus::LimitExceeded);
        }
        let va = c.place_buffer(
            whole_pages(size),
            BufferRecord {
                object: Some(identity),
                reserved: 0,
                allocated: 0,
            },
        )?;
        t.buffer_mappings += 1;
        if let Some(o) = t.buffer_objects.get_mut(&identity) {
            o.refs += 1;
        }
        drop(t);
        let reservation = BufferReservation {
            dev: self,
            ctx,
            va,
            armed: true,
        };
        Ok((reservation, size, fd))
    }

    /// ALLOC_BUFFER: the reply, and the buffer's memfd (rw).
    pub fn alloc_buffer(
        &self,
        ctx: u32,
        size: u64,
        flags: u64,
    ) -> Result<(BufferReply, [OwnedFd; 1]), KmdStatus> {
        let on_demand = flags & userq_uapi::paging::ON_DEMAND != 0;
        if size == 0 || size > MAX_BUFFER_SIZE {
            return Err(KmdStatus::InvalidArgument);
        }
        // The VM maps exactly the bytes asked for; the memfd (and the budget) are whole pages.
        let pages = whole_pages(size);
        let mapping = self.reserve_allocation(ctx, pages)?;
        let va = mapping.va;
        let fd = os::create_memfd("userq-buffer", pages, Sealing::Final).map_err(|e| match e {
            rustix::io::Errno::NOSPC | rustix::io::Errno::NOMEM | rustix::io::Errno::FBIG => {
                KmdStatus::OutOfMemory
            }
            _ => KmdStatus::Internal,
        })?;
        // Everything that can fail on this side first: once the firmware has mapped the
        // buffer, only the commit remains.
        let identity = os::object_identity(fd.as_fd()).map_err(|_| KmdStatus::Internal)?;
        let kept = fd.try_clone().map_err(|_| KmdStatus::Internal)?;
        if on_demand {
            self.alloc_on_demand(ctx, size, va, &fd)?;
        } else {
            self.map_in_firmware(ctx, va, size, fd.as_fd())?;
        }
        mapping.commit_object(
            identity,
            BufferObject {
                size,
                charged: pages,
                fd: kept,
                refs: 1,
                on_demand,
            },
        );
        Ok((BufferReply { va, size }, [fd]))
    }

    /// Sends the buffer's memfd to the firmware and has it map `size` bytes at `va` in
    /// `ctx`'s VM.
    fn map_in_firmware(
        &self,
        ctx: u32,
        va: u64,
        size: u64,
        fd: rustix::fd::BorrowedFd<'_>,
    ) -> Result<(), KmdStatus> {
        let id = self.link().new_object_id();
        self.link().call(
            FwRequest::MapBuffer {
                ctx,
                va,
                size,
                object: id,
            },
            &[(id, fd)],
        )
    }

    /// IMPORT_BUFFER: the fd must be a buffer of this device.
    pub fn import_buffer(&self, ctx: u32, fds: &[OwnedFd]) -> Result<BufferReply, KmdStatus> {
        let [fd] = fds else {
            return Err(KmdStatus::BadFd);
        };
        let identity = os::object_identity(fd.as_fd()).map_err(|_| KmdStatus::BadFd)?;
        let (mapping, size, ours) = self.reserve_import(ctx, identity)?;
        let va = mapping.va;
        self.map_in_firmware(ctx, va, size, ours.as_fd())?;
        mapping.commit();
        Ok(BufferReply { va, size })
    }

    /// Whether `ctx`'s buffer at `va` is on-demand (from the table: no wait behind the
    /// pager).
    fn is_on_demand(&self, ctx: u32, va: u64) -> Result<bool, KmdStatus> {
        let t = self.table();
        let c = t.contexts.get(&ctx).ok_or(KmdStatus::NoContext)?;
        let b = c.buffers.get(&va).ok_or(KmdStatus::NotFound)?;
        Ok(b.object
            .and_then(|id| t.buffer_objects.get(&id))
            .is_some_and(|o| o.on_demand))
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
        if self.is_on_demand(ctx, va)? {
            self.free_on_demand(ctx, va)?;
        } else {
            self.link().call(FwRequest::UnmapBuffer { ctx, va }, &[])?;
        }
        let mut t = self.table();
        if let Some(b) = t.contexts.get_mut(&ctx).and_then(|c| c.buffers.remove(&va)) {
            t.release_buffer(b);
        }
        Ok(())
    }
}
