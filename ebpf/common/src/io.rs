//! Map layouts of the writeback attribution tracker.
//!
//! The tracker sees two events: a page-cache folio becoming dirty (the
//! dirtier is the current task) and a bio entering the block layer (the
//! kernel's charge is the bio's blkcg). It remembers who dirtied each range
//! of each file, and when the range is written back it charges the bytes to
//! that dirtier, wherever the kernel charged them.
//!
//! Cgroup ids are the ids of the io controller's cgroups (v1 `blkio` on
//! v1/hybrid hosts, cgroup2 otherwise): the kernfs id, which is the inode
//! number of the cgroup's directory.
//!
//! Kernel structures are read at offsets user space takes from the running
//! kernel's BTF ([`IoOffsets`]): Rust eBPF has no CO-RE relocations.
//! Ownership: user space writes `IO_OFFSETS` once; the programs write
//! everything else; user space only reads and deletes entries.

/// Entries of the per (cgroup, device) counters (LRU: the counters of
/// cgroups long gone make room for new ones).
pub const STATS_ENTRIES: u32 = 4096;
/// Entries of the per-device totals.
pub const DEVICE_ENTRIES: u32 = 256;
/// Entries of the per-inode map (LRU).
pub const INODE_ENTRIES: u32 = 16_384;
/// Entries of the per-range map (LRU).
pub const RANGE_ENTRIES: u32 = 65_536;
/// A range is 2^RANGE_SHIFT pages (2 MiB with 4 KiB pages).
pub const RANGE_SHIFT: u32 = 9;

/// `IoOffsets::flags`: the tracker is on (user space filled the offsets).
pub const OFFSETS_READY: u32 = 1;
/// `IoOffsets::flags`: `folio_nr_pages` is an order (u8), not a count (u32).
pub const NR_PAGES_IS_ORDER: u32 = 2;

/// Byte offsets of the kernel fields the programs read, from BTF.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoOffsets {
    pub flags: u32,
    /// Index of the io controller in `css_set.subsys` (`io_cgrp_id`).
    pub io_subsys_index: u32,
    pub page_size: u32,
    /// Bit of `PG_head` in the page flags word.
    pub pg_head_bit: u32,
    pub task_cgroups: u32,
    pub css_set_subsys: u32,
    pub css_cgroup: u32,
    pub cgroup_kn: u32,
    pub kn_id: u32,
    pub folio_flags: u32,
    pub folio_nr_pages: u32,
    pub page_mapping: u32,
    pub page_index: u32,
    pub mapping_host: u32,
    pub inode_ino: u32,
    pub inode_sb: u32,
    pub inode_generation: u32,
    pub sb_dev: u32,
    pub bio_opf: u32,
    pub bio_bdev: u32,
    pub bdev_dev: u32,
    pub bio_size: u32,
    pub bio_io_vec: u32,
    pub bvec_page: u32,
    pub bio_blkg: u32,
    pub blkg_blkcg: u32,
    pub blkcg_css: u32,
    /// `page.compound_head` (bit 0 set in a tail page of a large folio or
    /// THP: the rest points at the head page, which has the mapping).
    pub page_compound_head: u32,
    /// `sizeof(struct page)`: a tail page's index in its folio.
    pub page_struct_size: u32,
}

/// Counters of one (cgroup, device).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsKey {
    pub cgroup: u64,
    /// Kernel `dev_t` (major << 20 | minor).
    pub dev: u32,
    pub _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoCounters {
    /// Page-cache bytes this cgroup dirtied.
    pub dirtied: u64,
    /// Bytes of this cgroup's dirty pages written back (any context).
    pub written_back: u64,
    /// Of `written_back`, bytes the kernel charged to another cgroup.
    pub leaked: u64,
    /// Write bytes the kernel charged to this cgroup (all bios).
    pub charged_write: u64,
    /// Read bytes the kernel charged to this cgroup.
    pub charged_read: u64,
    /// Write bytes charged here whose pages were not page cache (direct IO).
    pub direct: u64,
    /// Inodes this cgroup dirtied after another cgroup had.
    pub shared_inodes: u64,
}

/// Totals of one device.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceCounters {
    /// Write bytes of file data pages (page cache of a file on this device).
    pub file_write: u64,
    /// Of `file_write`, bytes whose dirtier the tracker knew.
    pub attributed: u64,
    /// Write bytes of other pages: metadata, journal, direct IO.
    pub other_write: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct InodeKey {
    pub dev: u32,
    pub _pad: u32,
    pub ino: u64,
}

/// Who dirtied an inode.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InodeInfo {
    /// Last dirtier.
    pub owner: u64,
    /// Another cgroup that dirtied it before (0: none).
    pub other: u64,
    /// Bytes dirtied and not yet seen written back.
    pub pending: u64,
    /// Highest range index dirtied (bounds user space's range lookups).
    pub max_range: u64,
    /// Bytes ever dirtied in it (only grows): tells user space whether
    /// writers touched the file while it was being flushed.
    pub dirtied: u64,
    pub generation: u32,
    pub _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RangeKey {
    pub dev: u32,
    pub _pad: u32,
    pub ino: u64,
    /// Page index >> RANGE_SHIFT.
    pub range: u64,
}

/// Who last dirtied a range of a file.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RangeInfo {
    pub owner: u64,
    /// Bytes dirtied and not yet seen written back.
    pub pending: u64,
}

/// Kernel `dev_t` from major and minor.
pub const fn kernel_dev(major: u32, minor: u32) -> u32 {
    (major << 20) | (minor & 0xf_ffff)
}

/// Major and minor of a kernel `dev_t`.
pub const fn split_kernel_dev(dev: u32) -> (u32, u32) {
    (dev >> 20, dev & 0xf_ffff)
}

/// `pending - done`, never below zero (pages re-dirtied while under
/// writeback are counted twice on one side).
pub const fn settle(pending: u64, done: u64) -> u64 {
    pending.saturating_sub(done)
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: plain `#[repr(C)]` integers, explicit padding; any bit pattern
    // is a valid value.
    unsafe impl aya::Pod for IoOffsets {}
    unsafe impl aya::Pod for StatsKey {}
    unsafe impl aya::Pod for IoCounters {}
    unsafe impl aya::Pod for DeviceCounters {}
    unsafe impl aya::Pod for InodeKey {}
    unsafe impl aya::Pod for InodeInfo {}
    unsafe impl aya::Pod for RangeKey {}
    unsafe impl aya::Pod for RangeInfo {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_dev_round_trips() {
        assert_eq!(kernel_dev(7, 3), (7 << 20) | 3);
        assert_eq!(split_kernel_dev(kernel_dev(259, 65_537)), (259, 65_537));
        assert_eq!(settle(10, 4), 6);
        assert_eq!(settle(4, 10), 0);
    }

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(core::mem::size_of::<IoOffsets>(), 29 * 4);
        assert_eq!(core::mem::size_of::<StatsKey>(), 16);
        assert_eq!(core::mem::size_of::<InodeKey>(), 16);
        assert_eq!(core::mem::size_of::<RangeKey>(), 24);
        assert_eq!(core::mem::size_of::<InodeInfo>(), 48);
    }
}
