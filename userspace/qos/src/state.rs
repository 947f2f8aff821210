//! The desired state: what operators asked for, persisted so that a restart
//! re-applies it. The single source of truth; the kernel state is derived.

use std::{
    collections::BTreeMap,
    io::Write,
    path::{Path, PathBuf},
};

use blkio::IoLimits;
use emc::MemQuota;
use netqos::NetQuota;
use serde::{Deserialize, Serialize};

use crate::QosError;

/// Bumped when the file layout changes incompatibly.
pub const STATE_VERSION: u32 = 1;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DesiredState {
    pub version: u32,
    /// cgroup name (relative to the cgroup2 root) → network quota.
    #[serde(default)]
    pub net: BTreeMap<String, NetQuota>,
    /// cgroup name (relative to the memory hierarchy) → memory quota.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub mem: BTreeMap<String, MemQuota>,
    /// cgroup name (relative to the io hierarchy) → device (`major:minor`)
    /// → IO limits.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub io: BTreeMap<String, BTreeMap<String, IoLimits>>,
}

/// Atomic load/save of the desired state under the daemon's state dir.
#[derive(Clone, Debug)]
pub struct StateStore {
    path: PathBuf,
}

impl StateStore {
    pub fn new(dir: &Path) -> Self {
        Self {
            path: dir.join("state.json"),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The persisted state; empty when there is none yet.
    pub fn load(&self) -> Result<DesiredState, QosError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(DesiredState {
                    version: STATE_VERSION,
                    ..Default::default()
                });
            }
            Err(source) => {
                return Err(QosError::Io {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        let st: DesiredState = serde_json::from_str(&text).map_err(|e| QosError::State {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        if st.version != STATE_VERSION {
            return Err(QosError::State {
                path: self.path.clone(),
                reason: format!(
                    "version {} is not the supported {STATE_VERSION}",
                    st.version
                ),
            });
        }
        Ok(st)
    }

    /// Writes to a temporary file, fsyncs it and renames it over the old
    /// one: a crash leaves either the old or the new state, never a mix.
    pub fn save(&self, st: &DesiredState) -> Result<(), QosError> {
        let io = |source| QosError::Io {
            path: self.path.clone(),
            source,
        };
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(io)?;
        let tmp = self.path.with_extension("json.tmp");
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        let text = serde_json::to_vec_pretty(st).map_err(|e| QosError::State {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        f.write_all(&text).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &self.path).map_err(io)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_atomic_replace() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = StateStore::new(&dir.path().join("sub"));
        let empty = store.load().expect("missing file is empty state");
        assert!(empty.net.is_empty());
        let mut st = DesiredState {
            version: STATE_VERSION,
            ..Default::default()
        };
        st.net.insert(
            "tenants/a".into(),
            NetQuota {
                rate: Some("100mbit".parse().expect("rate")),
                priority: 2,
                ingress_rate: Some("300mbit".parse().expect("rate")),
                ..Default::default()
            },
        );
        st.net.insert(
            "tenants/b".into(),
            NetQuota::ingress("5mbit".parse().expect("rate"), None, 0),
        );
        st.mem.insert(
            "tenants/a".into(),
            MemQuota {
                guarantee: "1G".parse().expect("size"),
                limit: Some("2G".parse().expect("size")),
                priority: 3,
            },
        );
        st.io.entry("tenants/a".into()).or_default().insert(
            "7:3".into(),
            IoLimits {
                write_bps: Some("10MiB".parse().expect("rate")),
                read_iops: Some(300),
                weight: Some(50),
                ..Default::default()
            },
        );
        st.io.entry("tenants/a".into()).or_default().insert(
            "259:0".into(),
            IoLimits {
                read_bps: Some("1G".parse().expect("rate")),
                ..Default::default()
            },
        );
        store.save(&st).expect("save");
        assert_eq!(store.load().expect("load"), st);
        let text = std::fs::read_to_string(store.path()).expect("read");
        assert!(text.contains("\"write_bps\": \"10MiB\""), "{text}");
        // A file written before memory quotas existed still loads.
        std::fs::write(store.path(), r#"{"version": 1, "net": {}}"#).expect("write");
        assert!(store.load().expect("old file").mem.is_empty());
        // So does one written before IO limits existed.
        std::fs::write(
            store.path(),
            r#"{"version": 1, "net": {}, "mem": {"a": {"guarantee": "1G", "priority": 0}}}"#,
        )
        .expect("write");
        let old = store.load().expect("file without io");
        assert!(old.io.is_empty() && old.mem.len() == 1, "{old:?}");
        // Without IO limits the file has no "io" key (older qosd can read it).
        store.save(&old).expect("save");
        let text = std::fs::read_to_string(store.path()).expect("read");
        assert!(!text.contains("\"io\""), "{text}");
        assert!(!store.path().with_extension("json.tmp").exists());
    }

    #[test]
    fn corrupt_or_foreign_state_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = StateStore::new(dir.path());
        std::fs::write(store.path(), "{not json").expect("write");
        let e = store.load().expect_err("corrupt").to_string();
        assert!(e.contains("state.json"), "{e}");
        std::fs::write(store.path(), r#"{"version": 99, "net": {}}"#).expect("write");
        let e = store.load().expect_err("version").to_string();
        assert!(e.contains("version 99"), "{e}");
    }
}
