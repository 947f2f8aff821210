//! Helpers shared by the toolkit's eBPF programs.
#![no_std]
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

pub mod atomic;
pub mod packet;
