//! The flush helper: a thread of the daemon that writes one cgroup's dirty
//! pages from inside that cgroup's blkio group, so that the kernel throttles
//! the writeback and charges it to the group (v1 cannot do this by itself).
//!
//! Files are opened by handle (inode number + generation from the tracker),
//! so the helper needs neither a path nor the writer's file descriptor, and
//! an mmap writer or a writer that closed its file is flushed all the same.

use std::{
    collections::HashMap,
    fs::File,
    os::fd::{AsRawFd, FromRawFd},
    path::PathBuf,
    sync::{Arc, Condvar, Mutex, PoisonError},
    thread::JoinHandle,
    time::Duration,
};

use qos_common::io::{InodeKey, RANGE_SHIFT};
use tracing::{debug, warn};

/// One file to flush: whole (`ranges` empty) or only some ranges (a file
/// other cgroups dirtied too).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlushItem {
    pub key: InodeKey,
    pub generation: u32,
    /// The file's ever-dirtied bytes when the work was handed out.
    pub dirtied: u64,
    pub ranges: Vec<u64>,
    /// Bytes written per call (see `policy::flush_chunk`).
    pub chunk: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FlushOutcome {
    /// Written back (the listed ranges, or the whole file).
    Flushed(FlushItem),
    /// The file no longer exists.
    Gone(InodeKey),
    /// Could not be opened or written (logged).
    Failed(InodeKey),
}

#[derive(Debug, Default)]
struct Shared {
    work: Option<Vec<FlushItem>>,
    outcomes: Vec<FlushOutcome>,
    stop: bool,
    busy: bool,
    /// The helper's thread id while it sits in the group.
    inside: Option<i32>,
}

type Slot = Arc<(Mutex<Shared>, Condvar)>;

#[derive(Debug)]
pub struct FlushWorker {
    slot: Slot,
    thread: Option<JoinHandle<()>>,
    root_tasks: PathBuf,
}

/// `tasks` files: the group's (enter to flush) and the root's (leave after,
/// so that the thread never keeps the group from being removed).
#[derive(Clone, Debug)]
pub struct Placement {
    pub group_tasks: PathBuf,
    pub root_tasks: PathBuf,
}

fn lock(slot: &Slot) -> std::sync::MutexGuard<'_, Shared> {
    slot.0.lock().unwrap_or_else(PoisonError::into_inner)
}

impl FlushWorker {
    pub fn spawn(name: &str, placement: Placement) -> std::io::Result<Self> {
        let slot: Slot = Arc::default();
        let s = slot.clone();
        let root_tasks = placement.root_tasks.clone();
        let thread = std::thread::Builder::new()
            .name(format!("flush {name}"))
            .spawn(move || run(&s, &placement))?;
        Ok(Self {
            slot,
            thread: Some(thread),
            root_tasks,
        })
    }

    /// Replaces the work not yet started with `items`.
    pub fn submit(&self, items: Vec<FlushItem>) {
        let mut g = lock(&self.slot);
        g.work = Some(items);
        self.slot.1.notify_all();
    }

    pub fn busy(&self) -> bool {
        let g = lock(&self.slot);
        g.busy || g.work.is_some()
    }

    pub fn take_outcomes(&self) -> Vec<FlushOutcome> {
        std::mem::take(&mut lock(&self.slot).outcomes)
    }
}

impl Drop for FlushWorker {
    fn drop(&mut self) {
        let inside = {
            let mut g = lock(&self.slot);
            g.stop = true;
            g.inside.take()
        };
        self.slot.1.notify_all();
        // Out of the group now, so that it can be removed at once (the rest
        // of a flush in progress is charged to the root).
        if let Some(tid) = inside {
            let _ = std::fs::write(&self.root_tasks, tid.to_string());
        }
        // Not joined: a flush throttled at a low rate may take seconds; the
        // thread leaves the group after it and exits.
        drop(self.thread.take());
    }
}

fn run(slot: &Slot, placement: &Placement) {
    let mut mounts = Mounts::default();
    let mut files: HashMap<InodeKey, File> = HashMap::new();
    loop {
        let work = {
            let mut g = lock(slot);
            loop {
                if g.stop {
                    return;
                }
                if let Some(w) = g.work.take() {
                    g.busy = true;
                    break Some(w);
                }
                let (next, wait) = slot
                    .1
                    .wait_timeout(g, IDLE_RELEASE)
                    .unwrap_or_else(PoisonError::into_inner);
                g = next;
                if wait.timed_out() && g.work.is_none() && !g.stop {
                    break None;
                }
            }
        };
        let Some(work) = work else {
            // Idle: let go of the files and mount points it held open, so
            // that the filesystem can be unmounted.
            files.clear();
            mounts.by_dev.clear();
            continue;
        };
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        lock(slot).inside = Some(tid);
        if let Err(e) = std::fs::write(&placement.group_tasks, tid.to_string()) {
            warn!(file = %placement.group_tasks.display(), error = %e, "flush helper cannot enter its group");
        }
        let keep: Vec<InodeKey> = work.iter().map(|i| i.key).collect();
        files.retain(|k, _| keep.contains(k));
        let mut outcomes = Vec::with_capacity(work.len());
        for item in work {
            outcomes.push(flush_one(&mut mounts, &mut files, item, &|| {
                lock(slot).stop
            }));
        }
        let mut g = lock(slot);
        if g.inside.take().is_some() {
            let _ = std::fs::write(&placement.root_tasks, tid.to_string());
        }
        g.outcomes.extend(outcomes);
        g.busy = false;
    }
}

fn flush_one(
    mounts: &mut Mounts,
    files: &mut HashMap<InodeKey, File>,
    item: FlushItem,
    stop: &dyn Fn() -> bool,
) -> FlushOutcome {
    let key = item.key;
    let file = match files.get(&key) {
        Some(f) => f,
        None => match mounts.open(key, item.generation) {
            Ok(f) => files.entry(key).or_insert(f),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ESTALE | libc::ENOENT)) => {
                return FlushOutcome::Gone(key);
            }
            Err(e) => {
                debug!(dev = key.dev, ino = key.ino, error = %e, "cannot open dirty file");
                return FlushOutcome::Failed(key);
            }
        },
    };
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
        | libc::SYNC_FILE_RANGE_WRITE
        | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
    let span = page << RANGE_SHIFT;
    let spans: Vec<(u64, u64)> = if item.ranges.is_empty() {
        // The whole file as it is now; pages dirtied past its end later are
        // the next step's work.
        let len = file.metadata().map_or(0, |m| m.len());
        vec![(0, len.max(1))]
    } else {
        item.ranges.iter().map(|&r| (r * span, span)).collect()
    };
    let chunk = item.chunk.max(page);
    for (start, len) in spans {
        let mut off = start;
        while off < start + len {
            if stop() {
                return FlushOutcome::Failed(key);
            }
            let n = chunk.min(start + len - off);
            // SAFETY: valid fd; offsets are plain integers.
            let rc =
                unsafe { libc::sync_file_range(file.as_raw_fd(), off as i64, n as i64, flags) };
            if rc != 0 {
                let e = std::io::Error::last_os_error();
                debug!(dev = key.dev, ino = key.ino, error = %e, "sync_file_range");
                files.remove(&key);
                return FlushOutcome::Failed(key);
            }
            off += n;
        }
    }
    FlushOutcome::Flushed(item)
}

/// A helper with no work for this long closes the files and mount points it
/// kept open between batches.
const IDLE_RELEASE: Duration = Duration::from_secs(1);

/// Mount points by device, opened once, for `open_by_handle_at`.
#[derive(Debug, Default)]
struct Mounts {
    by_dev: HashMap<u32, File>,
}

impl Mounts {
    fn mount_fd(&mut self, dev: u32) -> std::io::Result<&File> {
        use std::collections::hash_map::Entry;
        match self.by_dev.entry(dev) {
            Entry::Occupied(e) => Ok(e.into_mut()),
            Entry::Vacant(e) => {
                let (major, minor) = qos_common::io::split_kernel_dev(dev);
                let text = std::fs::read_to_string("/proc/self/mountinfo")?;
                let want = format!("{major}:{minor}");
                let point = text
                    .lines()
                    .find_map(|l| {
                        let f: Vec<&str> = l.split_whitespace().collect();
                        (f.get(2) == Some(&want.as_str()))
                            .then(|| f.get(4).copied())
                            .flatten()
                    })
                    .ok_or_else(|| std::io::Error::from_raw_os_error(libc::ENOENT))?;
                Ok(e.insert(File::open(point.replace("\\040", " "))?))
            }
        }
    }

    /// Opens a file by inode number and generation (the handle ext4, xfs
    /// and most disk filesystems use for NFS export).
    fn open(&mut self, key: InodeKey, generation: u32) -> std::io::Result<File> {
        #[repr(C)]
        struct Handle {
            bytes: u32,
            kind: i32,
            data: [u8; 16],
        }
        let mut h = Handle {
            bytes: 8,
            kind: 1, // FILEID_INO32_GEN
            data: [0; 16],
        };
        if let Ok(ino) = u32::try_from(key.ino) {
            h.data[..4].copy_from_slice(&ino.to_ne_bytes());
            h.data[4..8].copy_from_slice(&generation.to_ne_bytes());
        } else {
            // XFS 64-bit inode numbers.
            h.bytes = 12;
            h.kind = 0x81;
            h.data[..8].copy_from_slice(&key.ino.to_ne_bytes());
            h.data[8..12].copy_from_slice(&generation.to_ne_bytes());
        }
        let mount = self.mount_fd(key.dev)?.as_raw_fd();
        // SAFETY: `h` is a valid file_handle with `bytes` of payload.
        let fd = unsafe {
            libc::open_by_handle_at(
                mount,
                (&raw mut h).cast(),
                libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NONBLOCK,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh fd we own.
        Ok(unsafe { File::from_raw_fd(fd) })
    }
}
