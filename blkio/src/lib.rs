//! Disk IO control per cgroup, buffered writes included.
//!
//! - [`policy`]: limits, weights turned into rates, the capacity estimate and
//!   the backpressure/debt state machine (pure).
//! - [`tracker`]: the eBPF writeback attribution tracker (who dirtied what,
//!   who the kernel charged when it was written).
//! - [`backend`]: the kernel's knobs: v1 `blkio` throttle/BFQ weights and the
//!   freezer, or v2 `io.max`/`io.weight`.
//! - [`controller`]: [`IoControl`], which ties them together. On v1/hybrid
//!   hosts it flushes each group's dirty pages from a helper thread placed in
//!   that group's blkio cgroup (so the kernel throttles and charges the
//!   writeback to it), pauses writers whose backlog outruns their limit and
//!   holds as debt what the kernel flusher wrote for them. On v2 hosts the
//!   kernel attributes writeback itself and the tracker verifies it.

pub mod backend;
pub mod btf;
pub mod controller;
pub mod device;
pub mod flush;
pub mod policy;
pub mod tracker;

use std::path::PathBuf;

use thiserror::Error;

pub use backend::{Backend, IoMode};
pub use controller::{GroupStatus, IoControl, IoStatus, TrackerStatus};
pub use device::Device;
pub use policy::{ByteRate, IoLimits};
pub use tracker::Tracker;

#[derive(Debug, Error)]
pub enum BlkioError {
    #[error("device '{device}': {reason}")]
    Device { device: String, reason: String },
    #[error(transparent)]
    Policy(#[from] policy::PolicyError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cgroup '{cgroup}' does not exist (looked for {path})")]
    NoCgroup { cgroup: String, path: PathBuf },
    #[error("no IO limits set for cgroup '{cgroup}' on device {device}")]
    NotConfigured { cgroup: String, device: String },
    #[error(transparent)]
    Cgroup(#[from] qos_core::cgroup::CgroupError),
    #[error("writeback tracker on kernel {kernel}: {reason}")]
    Tracker { kernel: String, reason: String },
    #[error(transparent)]
    Btf(#[from] btf::BtfError),
    #[error("{0}")]
    Unsupported(String),
}

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> BlkioError {
    let path = path.into();
    move |source| BlkioError::Io { path, source }
}
