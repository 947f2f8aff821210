//! Per-cgroup network bandwidth: guarantees, ceilings, priorities, shared
//! spare capacity, on a stock kernel with eBPF.
//!
//! - [`policy`]: the pure half (admission, sharing the spare, demand,
//!   datapath parameters); unit-tested without root.
//! - [`datapath`]: loading and attaching the eBPF programs, map access.
//! - [`Shaper`]: the two together; what the `qos` library drives.

pub mod datapath;
pub mod ifaces;
pub mod policy;
pub mod qdisc;
mod shaper;

use std::path::PathBuf;

pub use datapath::Direction;
pub use ifaces::ContainerInterfaces;
pub use qos_common::policy::DEFAULT_UPSTREAM_BUFFER;
pub use shaper::{
    DirQuota, IngressStatus, InterfaceEvent, MAX_QUOTAS, NetClassStatus, NetQuota, NetStatus,
    ProgramStatsOut, Shaper, ShaperSettings, TICK, UPSTREAM_BUFFER_RANGE,
};

/// Everything that can go wrong in the network subsystem.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("network interface '{0}' does not exist")]
    NoInterface(String),
    #[error("loading the network eBPF object: {source}")]
    Load { source: Box<aya::EbpfError> },
    #[error("eBPF program {program} on kernel {kernel}: {source}")]
    Program {
        program: &'static str,
        kernel: String,
        source: Box<aya::programs::ProgramError>,
    },
    #[error("attaching {program} to {target}: {source}")]
    Attach {
        program: &'static str,
        target: String,
        source: Box<aya::programs::ProgramError>,
    },
    #[error("eBPF map {map}: {source}")]
    Map {
        map: &'static str,
        source: aya::maps::MapError,
    },
    #[error("the eBPF object has no map {0}")]
    MissingMap(&'static str),
    #[error("the eBPF object has no program {0}")]
    MissingProgram(&'static str),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid network quota: {0}")]
    InvalidQuota(String),
    #[error("invalid network setting: {0}")]
    InvalidSetting(String),
    #[error(transparent)]
    Admission(#[from] policy::AdmissionError),
    #[error(
        "ingress shaping is not configured on this host: set [net] ingress_capacity in the qosd config"
    )]
    IngressNotConfigured,
    #[error("cgroup '{0}' has no network quota")]
    NotConfigured(String),
    #[error("all {0} quota slots of this direction are in use ([net] max_quotas)")]
    NoSlots(u32),
    #[error("pinning the network datapath: {0}")]
    Pin(String),
}

impl NetError {
    pub(crate) fn program(program: &'static str, source: aya::programs::ProgramError) -> Self {
        Self::Program {
            program,
            kernel: qos_core::probe::kernel_release(),
            source: Box::new(source),
        }
    }
}
