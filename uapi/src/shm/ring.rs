//! DOC: a queue's ring in shared memory, resident from its creation.
//!
//! A GPU queue's ring buffer is pinned when the queue is created (KFD allocates it in
//! GTT; the HSA runtime never lets the CP fault on it), because the producer and the
//! command processor both touch it on every packet. Here the ring is a sealed memfd:
//! [`RingShm::create`] allocates every page of it at once ([`os::commit`]), and
//! [`RingShm::map`], which the client and the firmware map it with, enters every page in
//! the page tables at once (`MAP_POPULATE`). So the first lap of a new ring costs what
//! every later lap costs: no store of a packet takes a page fault (before this, the first
//! lap of a 65536-entry ring took 1024 faults in the client and as many in the firmware,
//! and its 256-submit blocks cost 60–200 ns per submit instead of 7–17 ns), and a ring
//! too big for the memory left is refused when the queue is created instead of raising
//! `SIGBUS` in whichever process touches the page that could not be allocated. A queue's
//! profile object, written per packet too when profiling is on, is made resident the
//! same way ([`super::ShmBytes::map_resident`]).

use super::{check_header, header, map_raw, Fill, Sealing};
use crate::layout::{magic, ring_object_size, HeaderError, RingHeader, RING_PACKETS_OFFSET};
use crate::os::{self, MapError};
use crate::packet::PACKET_SIZE;
use core::sync::atomic::{AtomicU64, Ordering};
use memmap2::MmapRaw;
use rustix::fd::{AsFd, BorrowedFd, OwnedFd};
use rustix::io;

/// A queue's ring: its [`RingHeader`] and `entries` packet slots of [`PACKET_SIZE`] bytes,
/// mapped read-write by the client (packets) and the firmware (read index). Every page of
/// it is allocated from its creation; a handle from [`RingShm::map`] has them all mapped.
pub struct RingShm {
    map: MmapRaw,
    mask: u64,
}

// SAFETY: shared memory reached only through atomics.
unsafe impl Send for RingShm {}
// SAFETY: as above.
unsafe impl Sync for RingShm {}

impl core::fmt::Debug for RingShm {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("RingShm")
            .field("entries", &(self.mask + 1))
            .finish()
    }
}

/// One packet slot: eight 64-bit words.
pub type PacketSlot = [AtomicU64; PACKET_SIZE / 8];

impl RingShm {
    /// Creates a ring of `entries` (a power of two) packets for queue slot `slot`, with
    /// all of its memory allocated now: `ENOMEM` or `ENOSPC` if there is not enough. The
    /// handle returned is mapped lazily (its creator only writes the header); the users
    /// of the ring map it with [`RingShm::map`].
    pub fn create(entries: u32, slot: u32) -> io::Result<(OwnedFd, RingShm)> {
        if !entries.is_power_of_two() {
            return Err(io::Errno::INVAL);
        }
        let size = ring_object_size(entries);
        let fd = os::create_memfd("userq-ring", size as u64, Sealing::Final)?;
        os::commit(fd.as_fd(), size as u64)?;
        let map = map_raw(fd.as_fd(), size, true, Fill::Lazy).map_err(|_| io::Errno::NOMEM)?;
        header(&map).init(magic::RING, entries, slot as u64);
        Ok((
            fd,
            RingShm {
                map,
                mask: entries as u64 - 1,
            },
        ))
    }

    /// Maps a ring that must hold `entries` (a power of two) packets, checking its size,
    /// magic, ABI version and entry count. The mapping is populated: no access to it
    /// faults later.
    pub fn map(fd: BorrowedFd<'_>, entries: u32) -> Result<RingShm, MapError> {
        if !entries.is_power_of_two() {
            return Err(MapError::Io(io::Errno::INVAL));
        }
        let map = map_raw(fd, ring_object_size(entries), true, Fill::Populate)?;
        check_header(&map, magic::RING)?;
        let found = header(&map).param.load(Ordering::Relaxed);
        if found != entries {
            return Err(HeaderError::BadParam {
                expected: entries,
                found,
            }
            .into());
        }
        Ok(RingShm {
            map,
            mask: entries as u64 - 1,
        })
    }

    /// Entries (packets) in the ring.
    #[inline]
    pub fn entries(&self) -> u64 {
        self.mask + 1
    }

    /// The header.
    #[inline]
    pub fn header(&self) -> &RingHeader {
        // SAFETY: the mapping starts with a RingHeader (checked at map time), a repr(C)
        // struct of atomics; the reference borrows `self`.
        unsafe { &*self.map.as_ptr().cast::<RingHeader>() }
    }

    /// The slot of packet `index` (any index: it is masked into the ring).
    #[inline]
    pub fn slot(&self, index: u64) -> &PacketSlot {
        let offset = RING_PACKETS_OFFSET + (index & self.mask) as usize * PACKET_SIZE;
        // SAFETY: `index & mask < entries`, and the mapping is `ring_object_size(entries)`
        // bytes, so the slot is inside it; it is 64-byte aligned (page-aligned base, offset
        // a multiple of 64) and made of atomics. The reference borrows `self`.
        unsafe { &*self.map.as_ptr().add(offset).cast::<PacketSlot>() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{MAX_RING_ENTRIES, PAGE_SIZE};

    /// Minor page faults this thread has taken (`minflt`, field 10 of
    /// `/proc/thread-self/stat`; the fields after the command name's closing parenthesis
    /// start at field 3).
    fn minor_faults() -> u64 {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
        let after_comm = &stat[stat.rfind(')').unwrap() + 1..];
        after_comm
            .split_whitespace()
            .nth(7)
            .unwrap()
            .parse()
            .unwrap()
    }

    /// Resident bytes of the mapping that starts at `addr` (its `Rss` in
    /// `/proc/self/smaps`), whatever the page size.
    fn resident_bytes(addr: *const u8) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let start = format!("{:x}-", addr as usize);
        let mut lines = smaps.lines().skip_while(|l| !l.starts_with(&start));
        assert!(lines.next().is_some(), "mapping at {start} not in smaps");
        let rss = lines
            .find_map(|l| l.strip_prefix("Rss:"))
            .expect("an Rss line");
        rss.trim()
            .trim_end_matches("kB")
            .trim()
            .parse::<u64>()
            .unwrap()
            * 1024
    }

    #[test]
    fn the_ring_masks_its_index_and_checks_its_size_and_entries() {
        let (rfd, ring) = RingShm::create(4, 0).unwrap();
        ring.slot(5)[0].store(1, Ordering::Relaxed);
        assert_eq!(ring.slot(1)[0].load(Ordering::Relaxed), 1);
        assert!(
            RingShm::map(rfd.as_fd(), 8).is_err(),
            "too small for 8 entries"
        );
        assert!(matches!(
            RingShm::map(rfd.as_fd(), 2),
            Err(MapError::Header(HeaderError::BadParam { .. }))
        ));
        assert_eq!(RingShm::map(rfd.as_fd(), 4).unwrap().entries(), 4);
    }

    #[test]
    fn a_new_ring_is_allocated_and_storing_a_whole_lap_takes_no_page_fault() {
        let entries = MAX_RING_ENTRIES;
        let size = ring_object_size(entries);
        let pages = (size / PAGE_SIZE) as u64;
        let (fd, _creator) = RingShm::create(entries, 0).unwrap();
        // Allocated at creation: a sparse memfd would hold no blocks yet.
        let st = rustix::fs::fstat(&fd).unwrap();
        assert!(
            st.st_blocks as u64 * 512 >= size as u64,
            "{} bytes allocated of {size}",
            st.st_blocks * 512
        );
        // The client's mapping and the firmware's, and a lap through each: lazily mapped,
        // every page's first store would fault (`pages` faults per lap).
        let client = RingShm::map(fd.as_fd(), entries).unwrap();
        let firmware = RingShm::map(fd.as_fd(), entries).unwrap();
        for ring in [&client, &firmware] {
            // Mapped whole before any access (also with huge pages, where a lazy lap
            // would take only a few faults).
            assert_eq!(resident_bytes(ring.map.as_ptr()), size as u64);
            let before = minor_faults();
            for i in 0..ring.entries() {
                ring.slot(i)[0].store(i, Ordering::Relaxed);
            }
            let faults = minor_faults() - before;
            // A few for the reads of /proc itself, never one per page.
            assert!(faults < 16, "{faults} page faults over {pages} pages");
        }
        assert_eq!(firmware.slot(7)[0].load(Ordering::Relaxed), 7);
    }
}
