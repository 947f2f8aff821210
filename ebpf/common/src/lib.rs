//! Types shared by the eBPF programs and user space, and the policy maths the
//! datapath runs per packet.
//!
//! Everything here is `no_std`, `#[repr(C)]` and free of panics: the same code
//! is compiled for the BPF target (where a panic path fails verification) and
//! unit-tested on the host.
#![cfg_attr(not(test), no_std)]

pub mod io;
pub mod net;
pub mod policy;
