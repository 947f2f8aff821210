//! The cgroup layer: which hierarchies a host has, and naming a cgroup.
//!
//! Hosts come in three shapes, detected from `/proc/self/mountinfo`:
//! - v2: one cgroup2 mount, no v1 controller hierarchies;
//! - v1: v1 controller hierarchies only (a cgroup2 tree can still be mounted,
//!   which is what eBPF cgroup programs attach to);
//! - hybrid: v1 controllers plus a cgroup2 mount without controllers
//!   (`/sys/fs/cgroup/unified`, as on this project's build machines).
//!
//! Network classification works on the cgroup2 tree on every shape: the id a
//! BPF program sees (`bpf_skb_cgroup_id`) is the inode number of the cgroup2
//! directory.

use std::{
    collections::BTreeMap,
    fmt,
    os::unix::fs::MetadataExt,
    path::{Component, Path, PathBuf},
};

use serde::Serialize;

/// `statfs` magic of cgroup2.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no cgroup hierarchy is mounted (read {0})")]
    NoCgroups(PathBuf),
    #[error("no cgroup2 hierarchy is mounted; it is needed to classify traffic by cgroup")]
    NoCgroup2,
    #[error("empty cgroup name")]
    Empty,
    #[error("'{name}' names the cgroup2 root; quotas apply to a child cgroup")]
    Root { name: String },
    #[error("'{name}' contains '..'; name cgroups below {root}")]
    ParentComponent { name: String, root: PathBuf },
    #[error(
        "'{name}' is in the cgroup v1 hierarchy {hierarchy}; name a cgroup2 directory under {root}"
    )]
    V1Path {
        name: String,
        hierarchy: PathBuf,
        root: PathBuf,
    },
    #[error(
        "'{name}' is outside the cgroup mounts; name a directory under {root} or a path relative to it"
    )]
    Outside { name: String, root: PathBuf },
    #[error("cgroup '{name}' does not exist ({path})")]
    NotFound { name: String, path: PathBuf },
    #[error("{path} is not a directory, so not a cgroup")]
    NotADirectory { path: PathBuf },
    #[error("{path} is not on a cgroup2 file system")]
    NotCgroup2 { path: PathBuf },
}

/// Shape of the host's cgroup hierarchies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupMode {
    V2,
    V1,
    Hybrid,
}

impl fmt::Display for CgroupMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::V2 => "v2",
            Self::V1 => "v1",
            Self::Hybrid => "hybrid",
        })
    }
}

/// The cgroup mounts of a host.
#[derive(Clone, Debug)]
pub struct Hierarchy {
    mode: CgroupMode,
    unified: Option<PathBuf>,
    /// v1 controller (or `name=` hierarchy) → mount point.
    v1: BTreeMap<String, PathBuf>,
    /// Check that resolved directories really are cgroup2 (off for fixtures).
    verify_fs: bool,
}

/// A cgroup2 directory, resolved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CgroupRef {
    /// Path relative to the cgroup2 mount, without a leading slash: the
    /// canonical name the toolkit stores and reports.
    pub name: String,
    /// Absolute path of the directory.
    pub path: PathBuf,
    /// The id eBPF programs see: the directory's inode number.
    pub id: u64,
}

fn unescape_mount_field(s: &str) -> String {
    // mountinfo escapes space, tab, newline and backslash as \ooo (one
    // byte); other bytes, UTF-8 included, are as they are.
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = (b[i] == b'\\' && i + 4 <= b.len())
            .then(|| &b[i + 1..i + 4])
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)))
            .map(|d| d.iter().fold(0u16, |v, c| v * 8 + u16::from(c - b'0')))
            .and_then(|v| u8::try_from(v).ok());
        match octal {
            Some(v) => {
                out.push(v);
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Hierarchy {
    /// Reads the mounts of the running host.
    pub fn detect() -> Result<Self, CgroupError> {
        let path = PathBuf::from("/proc/self/mountinfo");
        let text = std::fs::read_to_string(&path).map_err(|source| CgroupError::Io {
            path: path.clone(),
            source,
        })?;
        let mut h = Self::from_mountinfo(&text).ok_or(CgroupError::NoCgroups(path))?;
        h.verify_fs = true;
        Ok(h)
    }

    /// Parses mountinfo text. None when it lists no cgroup mount at all.
    /// Directories resolved through the result are not checked to be cgroup2
    /// (fixtures are plain temp dirs); [`Hierarchy::detect`] turns the check on.
    pub fn from_mountinfo(text: &str) -> Option<Self> {
        let mut unified = None;
        let mut v1 = BTreeMap::new();
        for line in text.lines() {
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let left: Vec<&str> = left.split(' ').collect();
            let right: Vec<&str> = right.split(' ').collect();
            let (Some(mount_point), Some(fstype)) = (left.get(4), right.first()) else {
                continue;
            };
            let mount_point = PathBuf::from(unescape_mount_field(mount_point));
            match *fstype {
                "cgroup2" => {
                    // The first cgroup2 mount wins (later ones are usually
                    // bind mounts inside containers).
                    unified.get_or_insert(mount_point);
                }
                "cgroup" => {
                    let opts = right.get(2).copied().unwrap_or("");
                    for opt in opts.split(',') {
                        if matches!(opt, "rw" | "ro")
                            || opt.starts_with("relatime")
                            || opt.starts_with("noexec")
                        {
                            continue;
                        }
                        v1.entry(opt.to_owned())
                            .or_insert_with(|| mount_point.clone());
                    }
                }
                _ => {}
            }
        }
        let has_v1_controllers = v1.keys().any(|k| !k.starts_with("name="));
        let mode = match (unified.is_some(), has_v1_controllers) {
            (true, false) => CgroupMode::V2,
            (true, true) => CgroupMode::Hybrid,
            (false, true) => CgroupMode::V1,
            (false, false) if !v1.is_empty() => CgroupMode::V1,
            (false, false) => return None,
        };
        Some(Self {
            mode,
            unified,
            v1,
            verify_fs: false,
        })
    }

    pub fn mode(&self) -> CgroupMode {
        self.mode
    }

    /// Mount point of the cgroup2 tree.
    pub fn unified_root(&self) -> Result<&Path, CgroupError> {
        self.unified.as_deref().ok_or(CgroupError::NoCgroup2)
    }

    /// Mount point of a v1 controller hierarchy.
    pub fn v1_mount(&self, controller: &str) -> Option<&Path> {
        self.v1.get(controller).map(PathBuf::as_path)
    }

    pub fn v1_controllers(&self) -> impl Iterator<Item = &str> {
        self.v1.keys().map(String::as_str)
    }

    /// Mounts a cgroup2 tree at `target` when the host has none (pure v1
    /// hosts). Needs root.
    pub fn ensure_cgroup2(&mut self, target: &Path) -> Result<&Path, CgroupError> {
        if self.unified.is_none() {
            std::fs::create_dir_all(target).map_err(|source| CgroupError::Io {
                path: target.into(),
                source,
            })?;
            nix::mount::mount(
                Some("cgroup2"),
                target,
                Some("cgroup2"),
                nix::mount::MsFlags::empty(),
                None::<&str>,
            )
            .map_err(|e| CgroupError::Io {
                path: target.into(),
                source: e.into(),
            })?;
            self.unified = Some(target.to_owned());
        }
        self.unified_root()
    }

    /// The canonical name (relative to the cgroup2 mount) a cgroup2 path
    /// stands for, whether or not the directory exists: the name a quota is
    /// stored under. Refuses paths outside the tree.
    pub fn canonical_name(&self, name: &str) -> Result<String, CgroupError> {
        self.clean_name(name)
            .map(|(clean, _)| clean.display().to_string())
    }

    /// (path relative to the mount, trimmed input) of a cgroup2 name.
    fn clean_name<'a>(&self, name: &'a str) -> Result<(PathBuf, &'a str), CgroupError> {
        let root = self.unified_root()?;
        let trimmed = name.trim();
        if trimmed.is_empty() {
            return Err(CgroupError::Empty);
        }
        let candidate = Path::new(trimmed);
        let relative: PathBuf = if candidate.is_absolute() {
            match candidate.strip_prefix(root) {
                Ok(rel) => rel.to_owned(),
                Err(_) => {
                    if let Some(h) = self.v1.values().find(|m| candidate.starts_with(m)) {
                        return Err(CgroupError::V1Path {
                            name: trimmed.into(),
                            hierarchy: h.clone(),
                            root: root.into(),
                        });
                    }
                    return Err(CgroupError::Outside {
                        name: trimmed.into(),
                        root: root.into(),
                    });
                }
            }
        } else {
            candidate.to_owned()
        };
        Ok((clean_components(&relative, trimmed, root)?, trimmed))
    }

    /// Root of the hierarchy that holds `controller`: its v1 mount on v1 and
    /// hybrid hosts, the cgroup2 tree otherwise.
    pub fn controller_root(&self, controller: &str) -> Result<&Path, CgroupError> {
        match self.v1.get(controller) {
            Some(m) => Ok(m),
            None => self.unified_root(),
        }
    }

    /// Canonical name and directory of a cgroup in the hierarchy of
    /// `controller`. Names are the relative paths every hierarchy shares
    /// (`tenants/a`); absolute paths under that hierarchy or under the
    /// cgroup2 mount are accepted too. The directory need not exist.
    pub fn controller_path(
        &self,
        controller: &str,
        name: &str,
    ) -> Result<(String, PathBuf), CgroupError> {
        let root = self.controller_root(controller)?;
        let trimmed = name.trim();
        if trimmed.is_empty() {
            return Err(CgroupError::Empty);
        }
        let candidate = Path::new(trimmed);
        let relative = if candidate.is_absolute() {
            let unified = self.unified.as_deref();
            match candidate
                .strip_prefix(root)
                .ok()
                .or_else(|| unified.and_then(|u| candidate.strip_prefix(u).ok()))
            {
                Some(rel) => rel.to_owned(),
                None => {
                    return Err(CgroupError::Outside {
                        name: trimmed.into(),
                        root: root.into(),
                    });
                }
            }
        } else {
            candidate.to_owned()
        };
        let clean = clean_components(&relative, trimmed, root)?;
        Ok((clean.display().to_string(), root.join(&clean)))
    }

    /// Resolves a cgroup2 name: an absolute path under the cgroup2 mount, or
    /// a path relative to it ("tenants/a", "/sys/fs/cgroup/unified/tenants/a").
    pub fn resolve(&self, name: &str) -> Result<CgroupRef, CgroupError> {
        let root = self.unified_root()?;
        let (clean, trimmed) = self.clean_name(name)?;
        let path = root.join(&clean);
        let meta = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(CgroupError::NotFound {
                    name: clean.display().to_string(),
                    path,
                });
            }
            Err(source) => return Err(CgroupError::Io { path, source }),
        };
        if !meta.is_dir() {
            return Err(CgroupError::NotADirectory { path });
        }
        // A symlink must not lead out of the tree.
        let real = std::fs::canonicalize(&path).map_err(|source| CgroupError::Io {
            path: path.clone(),
            source,
        })?;
        let real_root = std::fs::canonicalize(root).map_err(|source| CgroupError::Io {
            path: root.into(),
            source,
        })?;
        if !real.starts_with(&real_root) {
            return Err(CgroupError::Outside {
                name: trimmed.into(),
                root: root.into(),
            });
        }
        if self.verify_fs {
            let st = nix::sys::statfs::statfs(&path).map_err(|e| CgroupError::Io {
                path: path.clone(),
                source: e.into(),
            })?;
            if st.filesystem_type().0 as i64 != CGROUP2_SUPER_MAGIC {
                return Err(CgroupError::NotCgroup2 { path });
            }
        }
        Ok(CgroupRef {
            name: clean.display().to_string(),
            path,
            id: meta.ino(),
        })
    }
}

/// The normal components of a relative cgroup path; refuses `..` and the
/// hierarchy's root itself.
fn clean_components(relative: &Path, trimmed: &str, root: &Path) -> Result<PathBuf, CgroupError> {
    let mut clean = PathBuf::new();
    for c in relative.components() {
        match c {
            Component::Normal(p) => clean.push(p),
            Component::CurDir => {}
            Component::ParentDir => {
                return Err(CgroupError::ParentComponent {
                    name: trimmed.into(),
                    root: root.into(),
                });
            }
            Component::RootDir | Component::Prefix(_) => {}
        }
    }
    if clean.as_os_str().is_empty() {
        return Err(CgroupError::Root {
            name: trimmed.into(),
        });
    }
    Ok(clean)
}

impl CgroupRef {
    /// Whether the cgroup still exists as the same directory (same id).
    pub fn exists(&self) -> bool {
        std::fs::metadata(&self.path)
            .map(|m| m.ino() == self.id)
            .unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn mount_fields_are_unescaped_bytewise() {
        assert_eq!(unescape_mount_field("a\\040b"), "a b");
        assert_eq!(unescape_mount_field("end\\134"), "end\\");
        // Not a byte (found by fuzz_mountinfo: it overflowed): kept as is.
        assert_eq!(unescape_mount_field("x\\777y"), "x\\777y");
        assert_eq!(unescape_mount_field("\\04"), "\\04");
        // UTF-8 paths are not turned into Latin-1.
        assert_eq!(
            unescape_mount_field("/sys/fs/cgroup/caf\u{e9}"),
            "/sys/fs/cgroup/caf\u{e9}"
        );
    }
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
38 31 0:35 / /sys/fs/cgroup/blkio rw,relatime - cgroup cgroup rw,blkio
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const V2: &str = "\
25 1 0:22 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";
    const V1: &str = "\
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
";

    #[test]
    fn detects_the_three_shapes() {
        let h = Hierarchy::from_mountinfo(HYBRID).expect("hybrid");
        assert_eq!(h.mode(), CgroupMode::Hybrid);
        assert_eq!(
            h.unified_root().ok(),
            Some(Path::new("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            h.v1_mount("memory"),
            Some(Path::new("/sys/fs/cgroup/memory"))
        );
        assert!(h.v1_controllers().any(|c| c == "name=systemd"));

        let h = Hierarchy::from_mountinfo(V2).expect("v2");
        assert_eq!(h.mode(), CgroupMode::V2);
        assert_eq!(h.unified_root().ok(), Some(Path::new("/sys/fs/cgroup")));

        let h = Hierarchy::from_mountinfo(V1).expect("v1");
        assert_eq!(h.mode(), CgroupMode::V1);
        assert!(matches!(h.unified_root(), Err(CgroupError::NoCgroup2)));
        assert_eq!(
            h.v1_mount("cpuacct"),
            Some(Path::new("/sys/fs/cgroup/cpu,cpuacct"))
        );

        assert!(Hierarchy::from_mountinfo("1 0 0:1 / / rw - ext4 /dev/vda rw\n").is_none());
    }

    #[test]
    fn mount_points_with_spaces_are_unescaped() {
        let h = Hierarchy::from_mountinfo("41 31 0:38 / /mnt/my\\040cg rw - cgroup2 cgroup2 rw\n")
            .expect("v2");
        assert_eq!(h.unified_root().ok(), Some(Path::new("/mnt/my cg")));
    }

    fn fixture() -> (tempfile::TempDir, Hierarchy) {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("unified");
        std::fs::create_dir_all(root.join("tenants/a/sub")).expect("mkdir");
        std::fs::write(root.join("tenants/file"), "x").expect("write");
        std::fs::create_dir_all(dir.path().join("memory/x")).expect("mkdir");
        let mountinfo = format!(
            "35 31 0:32 / {m} rw - cgroup cgroup rw,memory\n41 31 0:38 / {u} rw - cgroup2 cgroup2 rw\n",
            m = dir.path().join("memory").display(),
            u = root.display()
        );
        let h = Hierarchy::from_mountinfo(&mountinfo).expect("fixture");
        (dir, h)
    }

    #[test]
    fn resolves_relative_and_absolute_names_to_the_inode() {
        let (dir, h) = fixture();
        let root = dir.path().join("unified");
        let a = h.resolve("tenants/a").expect("relative");
        assert_eq!(a.name, "tenants/a");
        assert_eq!(a.path, root.join("tenants/a"));
        assert_eq!(
            a.id,
            std::fs::metadata(root.join("tenants/a"))
                .expect("stat")
                .ino()
        );
        let b = h
            .resolve(&root.join("tenants/a").display().to_string())
            .expect("absolute");
        assert_eq!(a, b);
        let c = h.resolve("./tenants//a/").expect("messy relative");
        assert_eq!(a, c);
        assert!(a.exists());
        assert_eq!(
            h.canonical_name("./tenants//a/").ok(),
            Some("tenants/a".into())
        );
        std::fs::remove_dir(root.join("tenants/a/sub")).expect("rmdir");
        std::fs::remove_dir(root.join("tenants/a")).expect("rmdir");
        assert!(!a.exists());
        // A vanished cgroup still has its canonical name.
        let abs = root.join("tenants/a").display().to_string();
        assert_eq!(h.canonical_name(&abs).ok(), Some("tenants/a".into()));
        assert!(h.canonical_name("/etc").is_err());
    }

    #[test]
    fn refuses_names_outside_the_tree_with_a_reason() {
        let (dir, h) = fixture();
        let root = dir.path().join("unified");
        let cases: Vec<(String, &str)> = vec![
            ("".into(), "empty"),
            ("   ".into(), "empty"),
            ("/".into(), "outside the cgroup mounts"),
            (root.display().to_string(), "cgroup2 root"),
            (".".into(), "cgroup2 root"),
            ("../etc".into(), "'..'"),
            ("tenants/../../x".into(), "'..'"),
            ("/etc/passwd".into(), "outside the cgroup mounts"),
            (
                dir.path().join("memory/x").display().to_string(),
                "cgroup v1 hierarchy",
            ),
            ("tenants/missing".into(), "does not exist"),
            ("tenants/file".into(), "not a directory"),
        ];
        for (name, needle) in cases {
            let err = h.resolve(&name).expect_err(&name).to_string();
            assert!(err.contains(needle), "{name:?}: {err}");
        }
    }

    #[test]
    fn controller_paths_use_the_v1_hierarchy_when_there_is_one() {
        let (dir, h) = fixture();
        let mem = dir.path().join("memory");
        let unified = dir.path().join("unified");
        let (name, path) = h.controller_path("memory", "tenants/a").expect("relative");
        assert_eq!(name, "tenants/a");
        assert_eq!(path, mem.join("tenants/a"));
        let abs_v1 = mem.join("x").display().to_string();
        assert_eq!(h.controller_path("memory", &abs_v1).expect("v1 abs").0, "x");
        let abs_v2 = unified.join("tenants/a").display().to_string();
        assert_eq!(
            h.controller_path("memory", &abs_v2).expect("v2 abs").1,
            mem.join("tenants/a")
        );
        // No v1 blkio hierarchy in the fixture: the cgroup2 tree holds it.
        assert_eq!(
            h.controller_path("blkio", "q").expect("v2").1,
            unified.join("q")
        );
        for (bad, needle) in [
            ("", "empty"),
            ("../x", "'..'"),
            ("/etc", "outside"),
            (".", "root"),
        ] {
            let e = h.controller_path("memory", bad).expect_err(bad).to_string();
            assert!(e.contains(needle), "{bad:?}: {e}");
        }
    }

    #[test]
    fn a_symlink_cannot_escape_the_tree() {
        let (dir, h) = fixture();
        let outside = dir.path().join("elsewhere");
        std::fs::create_dir(&outside).expect("mkdir");
        std::os::unix::fs::symlink(&outside, dir.path().join("unified/link")).expect("symlink");
        let err = h.resolve("link").expect_err("escape").to_string();
        assert!(err.contains("outside"), "{err}");
    }

    #[test]
    fn detects_this_host() {
        // Every supported host has some cgroup mount.
        let h = Hierarchy::detect().expect("detect");
        if let Ok(root) = h.unified_root() {
            assert!(root.is_dir());
        }
    }
}
