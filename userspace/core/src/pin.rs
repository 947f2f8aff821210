//! Where eBPF objects of ours outlive the daemon: a directory on bpffs.
//!
//! Layout under the root (default `/sys/fs/bpf/qos`), one generation
//! directory per subsystem and object build:
//!
//! ```text
//! <root>/<object>-<hash>/maps/<MAP>        pinned maps
//! <root>/<object>-<hash>/links/<what>      pinned bpf links
//! <root>/<object>-<hash>/tc/<what>:<prio>:<handle>
//!                                          netlink tc filters (pre-6.6
//!                                          kernels), which cannot be pinned:
//!                                          an empty directory records them
//! ```
//!
//! The hash is of the eBPF object's bytes, so a daemon of another build
//! never opens maps whose layout it does not know: it attaches its own
//! generation first and then removes the others.

use std::{
    hash::Hasher,
    path::{Path, PathBuf},
};

use thiserror::Error;

/// `BPF_FS_MAGIC` (statfs f_type of bpffs).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, Error)]
pub enum PinError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not on a bpffs (mount -t bpf bpf /sys/fs/bpf)")]
    NotBpffs { path: PathBuf },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PinError + '_ {
    move |source| PinError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The directory of one subsystem's pinned objects for one object build.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Generation {
    dir: PathBuf,
}

impl Generation {
    /// `<root>/<object>-<hash of bytes>`; nothing is created.
    pub fn of(root: &Path, object: &str, bytes: &[u8]) -> Self {
        Self {
            dir: root.join(format!("{object}-{:016x}", object_hash(bytes))),
        }
    }

    /// The generation in an existing directory (cleanup of any build).
    pub fn at(dir: &Path) -> Self {
        Self { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether an earlier daemon left this generation (its maps).
    pub fn exists(&self) -> bool {
        self.maps_dir().is_dir()
    }

    pub fn maps_dir(&self) -> PathBuf {
        self.dir.join("maps")
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }

    pub fn links_dir(&self) -> PathBuf {
        self.dir.join("links")
    }

    pub fn link(&self, what: &str) -> PathBuf {
        self.links_dir().join(what)
    }

    pub fn tc_dir(&self) -> PathBuf {
        self.dir.join("tc")
    }

    /// Creates the generation's directories, checking that the root is on
    /// bpffs (mounting it at `/sys/fs/bpf` when nothing is mounted there).
    pub fn create(&self) -> Result<(), PinError> {
        let root = self.dir.parent().unwrap_or(&self.dir);
        ensure_bpffs(root)?;
        for d in [self.maps_dir(), self.links_dir(), self.tc_dir()] {
            std::fs::create_dir_all(&d).map_err(io(&d))?;
        }
        Ok(())
    }

    /// Names of the pinned links (`links/`).
    pub fn pinned_links(&self) -> Vec<String> {
        names_in(&self.links_dir())
    }

    /// Recorded netlink tc filters.
    pub fn tc_filters(&self) -> Vec<TcFilterRecord> {
        names_in(&self.tc_dir())
            .iter()
            .filter_map(|n| TcFilterRecord::parse(n))
            .collect()
    }

    /// Records a netlink tc filter.
    pub fn record_tc_filter(&self, f: &TcFilterRecord) -> Result<PathBuf, PinError> {
        let path = self.tc_dir().join(f.file_name());
        std::fs::create_dir_all(&path).map_err(io(&path))?;
        Ok(path)
    }

    /// The other generations of the same object under the root (older or
    /// newer builds).
    pub fn others(&self) -> Vec<Generation> {
        let Some(root) = self.dir.parent() else {
            return Vec::new();
        };
        let Some(mine) = self.dir.file_name().and_then(|n| n.to_str()) else {
            return Vec::new();
        };
        let object = mine.rsplit_once('-').map_or(mine, |(o, _)| o);
        names_in(root)
            .into_iter()
            .filter(|n| n != mine && n.rsplit_once('-').is_some_and(|(o, _)| o == object))
            .map(|n| Generation { dir: root.join(n) })
            .collect()
    }

    /// Removes the directory tree (unpinning whatever is still pinned: a
    /// map or link goes away with its last reference).
    pub fn remove(&self) -> Result<(), PinError> {
        match std::fs::remove_dir_all(&self.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(PinError::Io {
                path: self.dir.clone(),
                source: e,
            }),
        }
    }
}

/// A tc filter attached over netlink: enough to find it again and detach
/// it. Stored as the name `<what>:<ifindex>:<priority>:<handle>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcFilterRecord {
    /// What the filter is for, e.g. `egress` or `tag`.
    pub what: String,
    pub ifindex: u32,
    pub priority: u16,
    pub handle: u32,
}

impl TcFilterRecord {
    pub fn file_name(&self) -> String {
        format!(
            "{}:{}:{}:{}",
            self.what, self.ifindex, self.priority, self.handle
        )
    }

    pub fn parse(name: &str) -> Option<Self> {
        let mut it = name.rsplitn(4, ':');
        let handle = it.next()?.parse().ok()?;
        let priority = it.next()?.parse().ok()?;
        let ifindex = it.next()?.parse().ok()?;
        let what = it.next()?.to_owned();
        (!what.is_empty()).then_some(Self {
            what,
            ifindex,
            priority,
            handle,
        })
    }
}

/// FNV-1a of the object: stable across builds of the daemon (unlike the
/// std hasher), enough to tell two objects apart.
pub fn object_hash(bytes: &[u8]) -> u64 {
    let mut h = fnv::FnvHasher::default();
    h.write(bytes);
    h.finish()
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    out.sort();
    out
}

/// Checks that `dir` (created if missing) is on bpffs; mounts bpffs at
/// `/sys/fs/bpf` first if that is where `dir` lives and nothing is mounted.
pub fn ensure_bpffs(dir: &Path) -> Result<(), PinError> {
    let sys_bpf = Path::new("/sys/fs/bpf");
    if dir.starts_with(sys_bpf) && !is_bpffs(sys_bpf) {
        std::fs::create_dir_all(sys_bpf).map_err(io(sys_bpf))?;
        nix::mount::mount(
            Some("bpf"),
            sys_bpf,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| PinError::Io {
            path: sys_bpf.to_owned(),
            source: e.into(),
        })?;
    }
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    if !is_bpffs(dir) {
        return Err(PinError::NotBpffs { path: dir.into() });
    }
    Ok(())
}

fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tc_records_round_trip_and_reject_garbage() {
        let r = TcFilterRecord {
            what: "tag-veth".into(),
            ifindex: 12,
            priority: 49152,
            handle: 1,
        };
        assert_eq!(r.file_name(), "tag-veth:12:49152:1");
        assert_eq!(TcFilterRecord::parse(&r.file_name()), Some(r));
        for bad in [
            "",
            "egress",
            "egress:1:2",
            ":1:2:3",
            "e:x:2:3",
            "e:1:70000:3",
            "e:1:2:-1",
        ] {
            assert_eq!(TcFilterRecord::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn generations_differ_by_object_and_find_their_siblings() {
        let root = tempfile::tempdir().unwrap();
        let a = Generation::of(root.path(), "net", b"one");
        let b = Generation::of(root.path(), "net", b"two");
        let io = Generation::of(root.path(), "io", b"one");
        assert_ne!(a, b);
        assert_eq!(a, Generation::of(root.path(), "net", b"one"));
        for g in [&a, &b, &io] {
            for d in [g.maps_dir(), g.links_dir(), g.tc_dir()] {
                std::fs::create_dir_all(d).unwrap();
            }
        }
        assert!(a.exists());
        assert_eq!(a.others(), vec![b.clone()]);
        assert!(io.others().is_empty());
        a.record_tc_filter(&TcFilterRecord {
            what: "egress".into(),
            ifindex: 3,
            priority: 1,
            handle: 2,
        })
        .unwrap();
        assert_eq!(a.tc_filters().len(), 1);
        b.remove().unwrap();
        b.remove().unwrap();
        assert!(a.others().is_empty());
    }

    #[test]
    fn hash_is_stable() {
        // FNV-1a 64 of "a" (published test vector).
        assert_eq!(object_hash(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
