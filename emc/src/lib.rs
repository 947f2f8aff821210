//! Elastic memory control (EMC): a cgroup may use more than its guarantee
//! while the host has memory; when the host runs short, memory is reclaimed
//! from cgroups above their guarantee (lowest priority first, largest excess
//! next) and their regrowth is stopped; a whole cgroup is killed only in an
//! emergency, chosen by the same order, never by the kernel's OOM killer
//! where it can be held back.
//!
//! - [`policy`]: the pure half (quotas, admission, levels with hysteresis,
//!   the plan of each step); unit-tested without root.
//! - [`backend`]: cgroup v1 / v2 memory files behind one type.
//! - [`psi`]: pressure files and PSI triggers.
//! - [`Emc`]: the control loop the `qos` library drives.

pub mod backend;
mod controller;
pub mod policy;
pub mod psi;

use std::path::PathBuf;

pub use backend::{Backend, BackendKind, CgroupMem};
pub use controller::{
    Counters, Emc, EmcSettings, Event, EventKind, MemCgroupStatus, MemStatus, run_loop,
};
pub use policy::{Level, MemQuota, Tuning};
pub use psi::Waker;

/// Everything that can go wrong in the memory subsystem.
#[derive(Debug, thiserror::Error)]
pub enum EmcError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: unexpected content '{content}'")]
    Parse { path: PathBuf, content: String },
    #[error(transparent)]
    Cgroup(#[from] qos_core::CgroupError),
    #[error(
        "no memory controller: no v1 memory hierarchy, and `memory` is not in {0}/cgroup.controllers"
    )]
    NoController(PathBuf),
    #[error("cgroup '{name}' does not exist in the memory hierarchy ({path})")]
    NotFound { name: String, path: PathBuf },
    #[error("invalid memory quota for {cgroup}: {reason}")]
    Invalid { cgroup: String, reason: String },
    #[error("invalid memory tuning: {0}")]
    Tuning(String),
    #[error(transparent)]
    Admission(Box<policy::AdmissionError>),
    #[error("cgroup '{0}' has no memory quota")]
    NotConfigured(String),
    #[error("reclaim from {cgroup} stopped after {freed} bytes: nothing more to reclaim")]
    ReclaimBlocked { cgroup: String, freed: u64 },
}
