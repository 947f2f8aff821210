//! The frame every subsystem of the toolkit uses: rates and sizes as
//! operators write them, and the cgroup layer (host shape, naming a cgroup,
//! the id eBPF programs see).

pub mod cgroup;
pub mod pin;
pub mod probe;
pub mod units;

pub use cgroup::{CgroupError, CgroupMode, CgroupRef, Hierarchy};
pub use units::{Rate, Size, UnitError};
