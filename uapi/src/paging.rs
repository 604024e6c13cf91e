//! DOC: on-demand device memory: page size, fault batches, access kinds, migration
//! directions and the paging statistics.
//!
//! An *on-demand* buffer (ALLOC_BUFFER with [`ON_DEMAND`]) starts with no device pages.
//! Its memfd is the host backing. kmd-shim owns the device-memory pool (one memfd of the
//! budget's size, [`crate::fwmsg::boot::POOL`]); a page is *resident* when its data lives
//! in a pool slot that the firmware has mapped into the buffer's device window. A
//! workgroup whose footprint touches a page that is not resident faults before it starts;
//! kmd-shim services the fault (makes room, copies the data in, maps, replies) and the
//! workgroup runs. The coherence rule for the host is in the runtime's `Buffer` docs:
//! host access migrates the pages it touches back to host memory first.

/// Size of a device page: the unit of residency, faults, migration and eviction. 64 KiB,
/// like AMD's fragment size and xe's 64K pages: large enough that a batch of faults moves
/// data at close to memcpy speed.
pub const DEVICE_PAGE: u64 = 64 << 10;

/// Most faults one batch carries (NVIDIA UVM services up to 256 per batch).
pub const FAULT_BATCH_MAX: usize = 256;

/// Faults in one batch are sorted so that pages of one 2 MiB region are serviced
/// together, as UVM and xe group them.
pub const FAULT_REGION: u64 = 2 << 20;

/// Device memory when no budget is given: 256 MiB.
pub const DEFAULT_VRAM: u64 = 256 << 20;

/// Largest device-memory budget (the pool is a sparse memfd; this bounds its slot table).
pub const MAX_VRAM: u64 = 64 << 30;

/// ALLOC_BUFFER flag: the buffer is on-demand (no device pages until a kernel touches it).
pub const ON_DEMAND: u64 = 1;

/// How a workgroup touches a range of a buffer.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Access {
    /// Reads only.
    Read = 0,
    /// Writes (and maybe reads).
    Write = 1,
}

impl Access {
    /// From its wire value.
    pub fn from_u64(v: u64) -> Option<Self> {
        match v {
            0 => Some(Access::Read),
            1 => Some(Access::Write),
            _ => None,
        }
    }

    /// "read" or "write".
    pub fn name(self) -> &'static str {
        match self {
            Access::Read => "read",
            Access::Write => "write",
        }
    }
}

/// Where MIGRATE moves a range of an on-demand buffer.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrateTo {
    /// Back to host memory: resident pages are invalidated, copied out and released, so the
    /// host copy is the only one (what host access does first).
    Host = 0,
    /// Into device memory (a prefetch): pages not resident are faulted in now.
    Device = 1,
}

impl MigrateTo {
    /// From its wire value.
    pub fn from_u64(v: u64) -> Option<Self> {
        match v {
            0 => Some(MigrateTo::Host),
            1 => Some(MigrateTo::Device),
            _ => None,
        }
    }
}

/// Device-wide paging counters, named like xe's SVM statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PagingStats {
    /// Page faults reported by the firmware (each a page of one workgroup's footprint).
    pub faults: u64,
    /// Fault batches serviced.
    pub batches: u64,
    /// Pages copied into device memory (faults and prefetches).
    pub pages_in: u64,
    /// Pages evicted: copied back to host memory and their pool slot released.
    pub pages_out: u64,
    /// Faults on pages that had been resident before and were evicted.
    pub refaults: u64,
    /// Faults at addresses no on-demand mapping covers (memory violations).
    pub violations: u64,
    /// Time spent servicing fault batches, nanoseconds.
    pub service_ns: u64,
    /// Of that and of evictions, time spent copying data, nanoseconds.
    pub migrate_ns: u64,
    /// Pool slots holding a page now.
    pub resident_pages: u64,
    /// Pool slots in all: the budget in pages.
    pub budget_pages: u64,
    /// Most slots ever held at once.
    pub peak_resident_pages: u64,
    /// Evictions that the `WaitForIdleJobs` policy gave up on (deadlocks caught).
    pub deadlocks: u64,
}

impl PagingStats {
    /// The two halves PAGING_STATS replies with (part 0 and part 1), six values each.
    pub fn parts(&self) -> [[u64; 6]; 2] {
        [
            [
                self.faults,
                self.batches,
                self.pages_in,
                self.pages_out,
                self.refaults,
                self.violations,
            ],
            [
                self.service_ns,
                self.migrate_ns,
                self.resident_pages,
                self.budget_pages,
                self.peak_resident_pages,
                self.deadlocks,
            ],
        ]
    }

    /// From the two halves.
    pub fn from_parts(p: [[u64; 6]; 2]) -> Self {
        let [[faults, batches, pages_in, pages_out, refaults, violations], [service_ns, migrate_ns, resident_pages, budget_pages, peak_resident_pages, deadlocks]] =
            p;
        PagingStats {
            faults,
            batches,
            pages_in,
            pages_out,
            refaults,
            violations,
            service_ns,
            migrate_ns,
            resident_pages,
            budget_pages,
            peak_resident_pages,
            deadlocks,
        }
    }

    /// Bytes moved in both directions.
    pub fn bytes_moved(&self) -> u64 {
        (self.pages_in + self.pages_out) * DEVICE_PAGE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_round_trip_through_parts() {
        let s = PagingStats {
            faults: 1,
            batches: 2,
            pages_in: 3,
            pages_out: 4,
            refaults: 5,
            violations: 6,
            service_ns: 7,
            migrate_ns: 8,
            resident_pages: 9,
            budget_pages: 10,
            peak_resident_pages: 11,
            deadlocks: 12,
        };
        assert_eq!(PagingStats::from_parts(s.parts()), s);
        assert_eq!(s.bytes_moved(), 7 * DEVICE_PAGE);
        assert_eq!(Access::from_u64(1), Some(Access::Write));
        assert_eq!(Access::from_u64(2), None);
        assert_eq!(MigrateTo::from_u64(1), Some(MigrateTo::Device));
        assert_eq!(MigrateTo::from_u64(9), None);
    }
}
