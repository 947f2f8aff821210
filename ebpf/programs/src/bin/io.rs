//! Writeback attribution tracker.
//!
//! - `qos_io_dirty` (tp_btf `writeback_dirty_folio`): a folio of a file
//!   became dirty; the current task's io cgroup dirtied it. Records the
//!   dirtier per file and per 2 MiB range, counts dirtied bytes.
//! - `qos_io_bio` (tp_btf `block_bio_queue`): a bio entered the block layer.
//!   Counts what the kernel charged (the bio's blkcg) and, for file pages,
//!   charges the bytes to the range's dirtier too; when the two differ the
//!   bytes leaked (typically: the kernel flusher wrote them, charged to root).
//!
//! Field offsets come from user space (`IO_OFFSETS`, from the running
//! kernel's BTF), so one object works on every kernel with the same fields.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_current_task, bpf_probe_read_kernel},
    macros::{btf_tracepoint, map},
    maps::{Array, HashMap, LruHashMap},
    programs::BtfTracePointContext,
};
use qos_common::io::{
    DEVICE_ENTRIES, DeviceCounters, INODE_ENTRIES, InodeInfo, InodeKey, IoCounters, IoOffsets,
    NR_PAGES_IS_ORDER, OFFSETS_READY, RANGE_ENTRIES, RANGE_SHIFT, RangeInfo, RangeKey,
    STATS_ENTRIES, StatsKey,
};
use qos_ebpf::atomic::{add, sub_saturating};

#[map]
static IO_OFFSETS: Array<IoOffsets> = Array::with_max_entries(1, 0);
#[map]
static IO_STATS: LruHashMap<StatsKey, IoCounters> = LruHashMap::with_max_entries(STATS_ENTRIES, 0);
#[map]
static IO_DEVICES: HashMap<u32, DeviceCounters> = HashMap::with_max_entries(DEVICE_ENTRIES, 0);
#[map]
static IO_INODES: LruHashMap<InodeKey, InodeInfo> = LruHashMap::with_max_entries(INODE_ENTRIES, 0);
#[map]
static IO_RANGES: LruHashMap<RangeKey, RangeInfo> = LruHashMap::with_max_entries(RANGE_ENTRIES, 0);

const REQ_OP_MASK: u32 = 0xff;
const REQ_OP_READ: u32 = 0;
const REQ_OP_WRITE: u32 = 1;
/// Low bits of `page->mapping` that mark anonymous / movable pages.
const PAGE_MAPPING_FLAGS: u64 = 3;

#[inline(always)]
fn read_u64(base: u64, off: u32) -> Option<u64> {
    if base == 0 {
        return None;
    }
    // SAFETY: bpf_probe_read_kernel checks the address; a bad one is an error.
    unsafe { bpf_probe_read_kernel((base + off as u64) as *const u64) }.ok()
}

#[inline(always)]
fn read_u32(base: u64, off: u32) -> Option<u32> {
    if base == 0 {
        return None;
    }
    // SAFETY: as above.
    unsafe { bpf_probe_read_kernel((base + off as u64) as *const u32) }.ok()
}

#[inline(always)]
fn read_u8(base: u64, off: u32) -> Option<u8> {
    if base == 0 {
        return None;
    }
    // SAFETY: as above.
    unsafe { bpf_probe_read_kernel((base + off as u64) as *const u8) }.ok()
}

/// Argument `n` of a tp_btf program as a plain number: the verifier types
/// `ctx.arg()` as a BTF pointer and forbids the offset arithmetic the
/// run-time offsets need, so the slot is copied with a probe read.
#[inline(always)]
fn raw_arg(ctx: &BtfTracePointContext, n: usize) -> Option<u64> {
    let slot = (ctx.as_ptr() as *const u64).wrapping_add(n);
    // SAFETY: the context is an array of u64 arguments; the helper checks.
    unsafe { bpf_probe_read_kernel(slot) }.ok()
}

#[inline(always)]
fn offsets() -> Option<&'static IoOffsets> {
    let o = IO_OFFSETS.get(0)?;
    if o.flags & OFFSETS_READY == 0 {
        return None;
    }
    Some(o)
}

/// cgroup id of a css: css->cgroup->kn->id.
#[inline(always)]
fn css_cgroup_id(o: &IoOffsets, css: u64) -> Option<u64> {
    let cgroup = read_u64(css, o.css_cgroup)?;
    let kn = read_u64(cgroup, o.cgroup_kn)?;
    read_u64(kn, o.kn_id)
}

/// The current task's io cgroup: current->cgroups->subsys[io]->cgroup->kn->id.
#[inline(always)]
fn current_io_cgroup(o: &IoOffsets) -> Option<u64> {
    // SAFETY: the helper returns the current task pointer, or 0.
    let task = unsafe { bpf_get_current_task() };
    let cset = read_u64(task, o.task_cgroups)?;
    let css = read_u64(cset, o.css_set_subsys + o.io_subsys_index * 8)?;
    css_cgroup_id(o, css)
}

/// The cgroup the kernel charges a bio to: bio->bi_blkg->blkcg->css.
#[inline(always)]
fn bio_cgroup(o: &IoOffsets, bio: u64) -> u64 {
    let Some(blkg) = read_u64(bio, o.bio_blkg) else {
        return 0;
    };
    let Some(blkcg) = read_u64(blkg, o.blkg_blkcg) else {
        return 0;
    };
    css_cgroup_id(o, blkcg + o.blkcg_css as u64).unwrap_or(0)
}

#[inline(always)]
fn stats(cgroup: u64, dev: u32) -> Option<*mut IoCounters> {
    let key = StatsKey {
        cgroup,
        dev,
        _pad: 0,
    };
    if let Some(p) = IO_STATS.get_ptr_mut(key) {
        return Some(p);
    }
    // Failure (map full) only loses counts; user space reports the fill.
    let _ = IO_STATS.insert(key, IoCounters::default(), 0);
    IO_STATS.get_ptr_mut(key)
}

#[inline(always)]
fn device(dev: u32) -> Option<*mut DeviceCounters> {
    if let Some(p) = IO_DEVICES.get_ptr_mut(dev) {
        return Some(p);
    }
    let _ = IO_DEVICES.insert(dev, DeviceCounters::default(), 0);
    IO_DEVICES.get_ptr_mut(dev)
}

/// File identity of a page: (s_dev, ino, inode) of its mapping's host.
#[inline(always)]
fn page_file(o: &IoOffsets, mapping: u64) -> Option<(u32, u64, u64)> {
    if mapping == 0 || mapping & PAGE_MAPPING_FLAGS != 0 {
        return None;
    }
    let host = read_u64(mapping, o.mapping_host)?;
    let ino = read_u64(host, o.inode_ino)?;
    let sb = read_u64(host, o.inode_sb)?;
    let dev = read_u32(sb, o.sb_dev)?;
    Some((dev, ino, host))
}

#[btf_tracepoint(function = "writeback_dirty_folio")]
pub fn qos_io_dirty(ctx: BtfTracePointContext) -> i32 {
    let _ = on_dirty(&ctx);
    0
}

#[inline(always)]
fn on_dirty(ctx: &BtfTracePointContext) -> Option<()> {
    let o = offsets()?;
    let folio = raw_arg(ctx, 0)?;
    let mapping = raw_arg(ctx, 1)?;
    let (dev, ino, host) = page_file(o, mapping)?;
    let generation = read_u32(host, o.inode_generation).unwrap_or(0);
    let flags = read_u64(folio, o.folio_flags)?;
    let pages = if flags & (1u64 << (o.pg_head_bit & 63)) == 0 {
        1
    } else if o.flags & NR_PAGES_IS_ORDER != 0 {
        1u64 << (read_u8(folio, o.folio_nr_pages)? & 31)
    } else {
        read_u32(folio, o.folio_nr_pages)? as u64
    };
    let bytes = pages * o.page_size as u64;
    let index = read_u64(folio, o.page_index)?;
    let cgroup = current_io_cgroup(o)?;

    let counters = stats(cgroup, dev)?;
    // SAFETY: pointer into a map value, aligned field.
    unsafe { add(&raw mut (*counters).dirtied, bytes) };

    let ikey = InodeKey { dev, _pad: 0, ino };
    let fresh = InodeInfo {
        owner: cgroup,
        other: 0,
        pending: bytes,
        dirtied: bytes,
        max_range: index >> RANGE_SHIFT,
        generation,
        _pad: 0,
    };
    // SAFETY: pointer into a map value, read once.
    match IO_INODES
        .get_ptr_mut(ikey)
        .filter(|&info| unsafe { (*info).generation } == generation)
    {
        Some(info) => {
            // SAFETY: pointer into a map value; races only blur counts.
            unsafe {
                let owner = (*info).owner;
                if owner != cgroup {
                    if (*info).other == 0 {
                        add(&raw mut (*counters).shared_inodes, 1);
                    }
                    (*info).other = owner;
                    (*info).owner = cgroup;
                }
                if index >> RANGE_SHIFT > (*info).max_range {
                    (*info).max_range = index >> RANGE_SHIFT;
                }
                add(&raw mut (*info).pending, bytes);
                add(&raw mut (*info).dirtied, bytes);
            }
        }
        // New, or an inode number reused by a new file (another
        // generation): nothing of the old file's state carries over.
        None => {
            let _ = IO_INODES.insert(ikey, fresh, 0);
        }
    }

    let rkey = RangeKey {
        dev,
        _pad: 0,
        ino,
        range: index >> RANGE_SHIFT,
    };
    match IO_RANGES.get_ptr_mut(rkey) {
        Some(range) => {
            // SAFETY: as above.
            unsafe {
                (*range).owner = cgroup;
                add(&raw mut (*range).pending, bytes);
            }
        }
        None => {
            let range = RangeInfo {
                owner: cgroup,
                pending: bytes,
            };
            let _ = IO_RANGES.insert(rkey, range, 0);
        }
    }
    Some(())
}

#[btf_tracepoint(function = "block_bio_queue")]
pub fn qos_io_bio(ctx: BtfTracePointContext) -> i32 {
    let _ = on_bio(&ctx);
    0
}

#[inline(always)]
fn on_bio(ctx: &BtfTracePointContext) -> Option<()> {
    let o = offsets()?;
    let bio = raw_arg(ctx, 0)?;
    let op = read_u32(bio, o.bio_opf)? & REQ_OP_MASK;
    if op != REQ_OP_READ && op != REQ_OP_WRITE {
        return None;
    }
    let bdev = read_u64(bio, o.bio_bdev)?;
    let dev = read_u32(bdev, o.bdev_dev)?;
    let size = read_u32(bio, o.bio_size)? as u64;
    let charged = bio_cgroup(o, bio);
    let charged_counters = stats(charged, dev)?;
    if op == REQ_OP_READ {
        // SAFETY: pointer into a map value.
        unsafe { add(&raw mut (*charged_counters).charged_read, size) };
        return Some(());
    }
    // SAFETY: as above.
    unsafe {
        add(&raw mut (*charged_counters).charged_write, size);
    }
    let totals = device(dev)?;

    let vec = read_u64(bio, o.bio_io_vec)?;
    let page = read_u64(vec, o.bvec_page)?;
    // A tail page of a large folio or THP (user buffers of direct IO, large
    // page-cache folios) has no mapping or index of its own: read the head's.
    let compound = read_u64(page, o.page_compound_head)?;
    let (head, sub) = if compound & 1 != 0 && o.page_struct_size != 0 {
        let head = compound - 1;
        (head, page.wrapping_sub(head) / o.page_struct_size as u64)
    } else {
        (page, 0)
    };
    let mapping = read_u64(head, o.page_mapping)?;
    let file = page_file(o, mapping).filter(|(fs_dev, _, _)| *fs_dev == dev);
    let Some((_, ino, _)) = file else {
        // SAFETY: as above.
        unsafe {
            add(&raw mut (*totals).other_write, size);
            if mapping & PAGE_MAPPING_FLAGS != 0 {
                add(&raw mut (*charged_counters).direct, size);
            }
        }
        return Some(());
    };
    // SAFETY: as above.
    unsafe { add(&raw mut (*totals).file_write, size) };
    let index = read_u64(head, o.page_index)? + sub;

    let rkey = RangeKey {
        dev,
        _pad: 0,
        ino,
        range: index >> RANGE_SHIFT,
    };
    let ikey = InodeKey { dev, _pad: 0, ino };
    let inode = IO_INODES.get_ptr_mut(ikey);
    let owner = match IO_RANGES.get_ptr_mut(rkey) {
        // SAFETY: pointers into map values; races only blur counts.
        Some(range) => unsafe {
            sub_saturating(&raw mut (*range).pending, size);
            (*range).owner
        },
        None => match inode {
            // SAFETY: as above.
            Some(info) => unsafe { (*info).owner },
            None => return Some(()),
        },
    };
    if let Some(info) = inode {
        // SAFETY: as above.
        unsafe { sub_saturating(&raw mut (*info).pending, size) };
    }
    let owner_counters = stats(owner, dev)?;
    // SAFETY: as above.
    unsafe {
        add(&raw mut (*totals).attributed, size);
        add(&raw mut (*owner_counters).written_back, size);
        if owner != charged {
            add(&raw mut (*owner_counters).leaked, size);
        }
    }
    Some(())
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
