//! Disk IO status as the socket API carries it (`qosctl io show`).
//!
//! [`blkio::IoStatus`] and its parts only serialise; these are the same
//! fields (the same JSON) with `Deserialize` too, so that clients can read
//! them back.

use blkio::{Device, IoLimits, IoMode, policy::Enforce};
use serde::{Deserialize, Serialize};

/// `qosctl io show`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IoStatus {
    /// `v1-assisted` or `v2-kernel`.
    pub mode: String,
    pub mode_description: String,
    /// The writeback tracker; absent where it could not be loaded (v2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracker: Option<TrackerStatus>,
    pub groups: Vec<GroupStatus>,
    /// Recent changes (limits set and removed), oldest first.
    pub events: Vec<String>,
}

/// One cgroup's IO on one device.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupStatus {
    pub cgroup: String,
    pub device: Device,
    pub limits: IoLimits,
    /// Write rate in force (the limit, or the weight's share of the device).
    pub effective_write_bps: Option<u64>,
    /// `running`, `paused` or `repaying`.
    pub state: String,
    /// Bytes dirtied and not yet written back.
    pub pending_bytes: u64,
    /// Bytes the kernel flusher wrote for it unthrottled, not yet repaid.
    pub debt_bytes: u64,
    pub dirtied_bytes: u64,
    pub written_back_bytes: u64,
    pub leaked_bytes: u64,
    pub charged_write_bytes: u64,
    pub charged_read_bytes: u64,
    pub direct_bytes: u64,
    pub shared_inodes: u64,
    /// Recent write rate at the block layer (written back + direct).
    pub write_bps: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub degraded: Option<String>,
}

/// Attribution of file writes on one device.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceAttribution {
    pub device: Device,
    pub file_write_bytes: u64,
    pub attributed_bytes: u64,
    /// attributed / file writes, percent.
    pub attributed_pct: f64,
    pub other_write_bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity_estimate_bps: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrackerStatus {
    pub kernel: String,
    /// Upper bound of the maps' memory (keys + values).
    pub map_memory_bytes: u64,
    /// (map, entries in use, capacity).
    pub entries: Vec<(String, usize, u32)>,
    pub devices: Vec<DeviceAttribution>,
    pub programs: Vec<ProgramCost>,
}

/// Run count and time of one tracker program.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProgramCost {
    pub name: String,
    pub run_count: u64,
    pub run_time_ns: u64,
}

/// The mode as `blkio` serialises it.
pub fn mode_name(mode: IoMode) -> &'static str {
    match mode {
        IoMode::V1Assisted => "v1-assisted",
        IoMode::V2Kernel => "v2-kernel",
    }
}

fn state_name(state: Enforce) -> &'static str {
    match state {
        Enforce::Running => "running",
        Enforce::Paused => "paused",
        Enforce::Repaying => "repaying",
    }
}

impl From<blkio::IoStatus> for IoStatus {
    fn from(s: blkio::IoStatus) -> Self {
        Self {
            mode: mode_name(s.mode).into(),
            mode_description: s.mode_description,
            tracker: s.tracker.map(|t| TrackerStatus {
                kernel: t.kernel,
                map_memory_bytes: t.map_memory_bytes,
                entries: t.entries,
                devices: t
                    .devices
                    .into_iter()
                    .map(|d| DeviceAttribution {
                        device: d.device,
                        file_write_bytes: d.file_write_bytes,
                        attributed_bytes: d.attributed_bytes,
                        attributed_pct: d.attributed_pct,
                        other_write_bytes: d.other_write_bytes,
                        capacity_estimate_bps: d.capacity_estimate_bps,
                        scheduler: d.scheduler,
                    })
                    .collect(),
                programs: t
                    .programs
                    .into_iter()
                    .map(|p| ProgramCost {
                        name: p.name,
                        run_count: p.run_count,
                        run_time_ns: p.run_time_ns,
                    })
                    .collect(),
            }),
            groups: s
                .groups
                .into_iter()
                .map(|g| GroupStatus {
                    cgroup: g.cgroup,
                    device: g.device,
                    limits: g.limits,
                    effective_write_bps: g.effective_write_bps,
                    state: state_name(g.state).into(),
                    pending_bytes: g.pending_bytes,
                    debt_bytes: g.debt_bytes,
                    dirtied_bytes: g.dirtied_bytes,
                    written_back_bytes: g.written_back_bytes,
                    leaked_bytes: g.leaked_bytes,
                    charged_write_bytes: g.charged_write_bytes,
                    charged_read_bytes: g.charged_read_bytes,
                    direct_bytes: g.direct_bytes,
                    shared_inodes: g.shared_inodes,
                    write_bps: g.write_bps,
                    degraded: g.degraded,
                })
                .collect(),
            events: s.events,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The wire form is blkio's own serialisation, and reads back.
    #[test]
    fn same_json_as_blkio_and_round_trips() {
        let limits = IoLimits {
            write_bps: Some("10MiB".parse().expect("rate")),
            weight: Some(100),
            ..IoLimits::default()
        };
        let device = Device { major: 7, minor: 3 };
        let theirs = blkio::IoStatus {
            mode: IoMode::V1Assisted,
            mode_description: IoMode::V1Assisted.to_string(),
            tracker: Some(blkio::TrackerStatus {
                kernel: "6.1.0".into(),
                map_memory_bytes: 1 << 20,
                entries: vec![("inodes".into(), 3, 65536)],
                devices: vec![blkio::controller::DeviceAttribution {
                    device,
                    file_write_bytes: 100,
                    attributed_bytes: 99,
                    attributed_pct: 99.0,
                    other_write_bytes: 0,
                    capacity_estimate_bps: Some(64 << 20),
                    scheduler: Some("none".into()),
                }],
                programs: vec![blkio::tracker::ProgramCost {
                    name: "qos_io_bio".into(),
                    run_count: 5,
                    run_time_ns: 500,
                }],
            }),
            groups: vec![blkio::GroupStatus {
                cgroup: "tenants/a".into(),
                device,
                limits,
                effective_write_bps: Some(10 << 20),
                state: Enforce::Repaying,
                pending_bytes: 1,
                debt_bytes: 2,
                dirtied_bytes: 3,
                written_back_bytes: 4,
                leaked_bytes: 5,
                charged_write_bytes: 6,
                charged_read_bytes: 7,
                direct_bytes: 8,
                shared_inodes: 9,
                write_bps: 1.5,
                degraded: Some("no flush helper".into()),
            }],
            events: vec!["tenants/a on 7:3: limits set".into()],
        };
        let want = serde_json::to_value(&theirs).expect("blkio json");
        let ours = IoStatus::from(theirs);
        assert_eq!(serde_json::to_value(&ours).expect("our json"), want);
        let text = serde_json::to_string(&ours).expect("ser");
        assert_eq!(serde_json::from_str::<IoStatus>(&text).expect("de"), ours);
        assert_eq!(ours.groups[0].state, "repaying");
        assert_eq!(ours.mode, "v1-assisted");
    }
}
