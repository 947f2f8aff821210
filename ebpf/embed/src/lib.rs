//! The toolkit's eBPF objects, built by this crate's build script from
//! `ebpf/programs` and embedded so that every binary carries the programs it
//! loads.

/// Network datapath: `qos_egress`, `qos_tag`, `qos_pacer` and their maps.
pub static NET: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/qos-net"));

/// Writeback attribution tracker: `qos_io_dirty`, `qos_io_bio` and their maps.
pub static IO: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/qos-io"));
