//! Map layouts of the network datapath.
//!
//! Ownership rule: user space writes `NetGlobal`, `ClassConfig` and
//! `CGROUP_CLASS`; the datapath writes `ClassState`, `PoolState` and
//! `SOCK_CLASS`. User space never rewrites a state value in place (it would
//! race with the packet path); it only zeroes a slot it is about to (re)use.

/// Number of class slots. Slot 0 is the default class.
pub const MAX_CLASSES: u32 = 4096;
/// Slot of the class that carries traffic of cgroups without a quota.
pub const DEFAULT_SLOT: u32 = 0;
/// Priorities are 0 (highest) ..= `LOWEST_PRIORITY`.
pub const LOWEST_PRIORITY: u32 = 7;
/// Depth of the cgroup ancestor walk when a socket's class is resolved.
pub const MAX_CGROUP_DEPTH: u32 = 32;
/// Entries of the socket → class cache (LRU).
pub const SOCK_CACHE_ENTRIES: u32 = 262_144;
/// Entries of the cgroup id → slot map (configured cgroups).
pub const CGROUP_MAP_ENTRIES: u32 = 16_384;

/// `tc_index` values `1..=MAX_CLASSES` carry a class slot (+1) from the
/// container-side tagger to the shaped interface.
pub const TAG_OFFSET: u32 = 1;
/// `tc_index` bit set by the tagger when the packet's socket is paced.
pub const TAG_PACED: u32 = 0x8000;
/// `tc_index` bit set on packets received through a shaped interface (tc
/// ingress there), with that interface in the bits below
/// ([`ingress_tag`]); the ingress program only charges packets carrying
/// its own interface's tag, also after they were forwarded into a
/// container's network namespace. (It is a cgroup program: it sees what
/// every interface of the host delivers, also another shaper's.)
pub const TAG_INGRESS: u32 = 0x4000;
/// Bits of an ingress tag that carry the receiving interface's ifindex,
/// modulo their range: two shaped interfaces whose ifindexes are equal
/// modulo 16384 cannot be told apart.
pub const TAG_INGRESS_IFINDEX: u32 = 0x3FFF;

/// The `tc_index` of a packet received through interface `ifindex`. Never
/// a class tag (`TAG_OFFSET..=MAX_CLASSES`): its `TAG_INGRESS` bit is above
/// their range.
pub const fn ingress_tag(ifindex: u32) -> u32 {
    TAG_INGRESS | (ifindex & TAG_INGRESS_IFINDEX)
}
/// `tc_index` bit set by the tagger on a small packet whose socket is a TCP
/// socket: only then may a segment without payload pass as an ACK (a raw
/// socket can forge such segments at any rate).
pub const TAG_TCP_SOCK: u32 = 0x2000;

/// Names of one direction's maps: the egress and the ingress datapath have
/// the same maps, under different names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirMaps {
    pub global: &'static str,
    pub pool: &'static str,
    pub class_config: &'static str,
    pub class_state: &'static str,
    pub class_counters: &'static str,
    pub cgroup_class: &'static str,
    pub sock_class: &'static str,
}

impl DirMaps {
    /// Every map name of the direction.
    pub const fn all(&self) -> [&'static str; 7] {
        [
            self.global,
            self.pool,
            self.class_config,
            self.class_state,
            self.class_counters,
            self.cgroup_class,
            self.sock_class,
        ]
    }
}

pub mod maps {
    use super::DirMaps;
    pub const EGRESS: DirMaps = DirMaps {
        global: "NET_GLOBAL",
        pool: "NET_POOL",
        class_config: "NET_CLASS_CFG",
        class_state: "NET_CLASS_STATE",
        class_counters: "NET_CLASS_COUNTERS",
        cgroup_class: "NET_CGROUP_CLASS",
        sock_class: "NET_SOCK_CLASS",
    };
    pub const INGRESS: DirMaps = DirMaps {
        global: "ING_GLOBAL",
        pool: "ING_POOL",
        class_config: "ING_CLASS_CFG",
        class_state: "ING_CLASS_STATE",
        class_counters: "ING_CLASS_COUNTERS",
        cgroup_class: "ING_CGROUP_CLASS",
        sock_class: "ING_SOCK_CLASS",
    };
    /// Ingress: the class of each SYN's listener until its request socket
    /// asks for an initial window (pinned with the direction's maps: the
    /// cgroup_skb program writes it, the sockops program reads it).
    pub const SYN_CLASS: &str = "ING_SYN_CLASS";
}

pub mod programs {
    /// tc egress on the shaped interface: classify, account, decide.
    pub const EGRESS: &str = "qos_egress";
    /// tc ingress on container-facing veths: tag forwarded packets with their class.
    pub const TAGGER: &str = "qos_tag";
    /// sockops on the cgroup2 root: per-flow pacing of TCP sockets (egress)
    /// and the receive-window clamp of non-ECN flows (ingress).
    pub const PACER: &str = "qos_pacer";
    /// tc ingress on the shaped interface: marks what arrived through it.
    pub const INGRESS_TAGGER: &str = "qos_ingress_tag";
    /// cgroup_skb ingress on the cgroup2 root: classify by the receiving
    /// socket's cgroup, account, mark, drop.
    pub const INGRESS: &str = "qos_ingress";
}

/// `NetGlobal::flags` bit: shaping enabled.
pub const GLOBAL_ENABLED: u32 = 1;
/// `NetGlobal::flags` bit: shutting down; the pacer lifts the pacing of
/// every flow it sees instead of setting it.
pub const GLOBAL_RELEASE: u32 = 2;
/// `NetGlobal::flags` bit: switch shaped flows that use BBR to CUBIC when
/// they are established. BBR learns the rate it delivered and paces itself
/// at (a probing multiple of) it, so a pacing cap that later rises is never
/// followed: the flow stays at the first rate it was held to.
pub const GLOBAL_REPLACE_BBR: u32 = 4;
/// `NetGlobal::flags` bit (ingress): clamp the receive window of flows that
/// negotiated ECN as well (qosd's default). On microsecond round trips CE
/// marks alone cannot hold a flow below what two segments per round trip
/// make; windows that share the link's queue upstream can
/// (`policy::unpaced_window_clamp`). Flows whose ACKs are paced are
/// clamped whatever this says.
pub const GLOBAL_CLAMP_ECN: u32 = 8;
/// `NetGlobal::flags` bit (ingress): pace received TCP flows by their ACKs
/// (fq is at the shaped interface's root, which honours the ACKs'
/// departure times; see `policy::ack_release`).
pub const GLOBAL_ACK_PACING: u32 = 16;
/// `NetGlobal::flags` bit: the direction is ingress (received traffic).
/// Without `GLOBAL_ACK_PACING` its flows are held by their receive windows,
/// sized by user space (`ClassConfig::window_mult`).
pub const GLOBAL_RECEIVED: u32 = 32;

/// Host-wide settings of the egress shaper (array map, one entry).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetGlobal {
    /// Egress capacity of the shaped interface, wire bytes per second.
    pub capacity: u64,
    /// Depth of the shared pool, bytes.
    pub pool_depth: u64,
    /// Pool level needed per priority step before a class may borrow.
    pub prio_step: u64,
    /// Pool level above which a class may borrow beyond its allowance
    /// (capacity that nobody's allowance claims).
    pub extra_watermark: u64,
    /// Bumped whenever the cgroup → class mapping changes; cached socket
    /// classifications of an older generation are resolved again.
    pub generation: u64,
    /// Activity epoch, advanced by user space; flows count once per epoch.
    pub epoch: u64,
    /// Time (µs) the receive windows of flows held by their windows (no
    /// ACK pacing) add up to beyond their round trips: half the upstream
    /// buffer at the capacity (`policy::shared_queue_us`), always set by
    /// user space (0 would count as the 100 µs floor).
    pub shared_queue_us: u64,
    /// ifindex of the shaped interface.
    pub shaped_ifindex: u32,
    /// `GLOBAL_*` bits.
    pub flags: u32,
}

/// Per-class settings written by user space (array map indexed by slot).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClassConfig {
    /// Guaranteed rate, wire bytes per second.
    pub guarantee: u64,
    /// Ceiling, bytes per second. Always ≥ guarantee and ≤ capacity.
    pub ceil: u64,
    /// Fair share of the spare capacity this class may borrow, bytes per
    /// second (computed by the user-space allocator).
    pub borrow_rate: u64,
    /// Feed-forward pacing rate of one flow, bytes per second.
    pub flow_base: u64,
    /// The class's use per flow in its last activity epochs, weighted by
    /// use (Σ use² / Σ use), bytes per second: the most a flow's use is
    /// weighed against (`policy::weight_reference`). 0 = the flow's own
    /// rate.
    pub flow_even: u64,
    /// Proportional gain of the class's pacing correction, 1/1024 units,
    /// and integral gain of its pacing multiplier, 1/1024 per second: the
    /// configured ones sized by user space for the class's round trip, its
    /// flows' waiting ACKs and its bucket's depth (`policy::class_gains`).
    pub pacing_kp: u64,
    pub pacing_ki: u64,
    /// Total rate the allocator gives this class (guarantee + borrow).
    pub alloc: u64,
    /// Own bucket depth, bytes.
    pub depth: u64,
    /// Borrow-allowance bucket depth, bytes.
    pub borrow_depth: u64,
    /// Ceiling bucket depth, bytes.
    pub ceil_depth: u64,
    /// Debt (bytes below zero in the own bucket) beyond which ECN-capable
    /// packets are marked CE.
    pub mark_debt: u64,
    /// Debt beyond which packets are dropped: the last resort.
    pub drop_debt: u64,
    /// Multiplier (1/1024) the receive windows of its flows are sized at
    /// without ACK pacing (0: 1). User space sets it from how the classes'
    /// rates compare (netqos `window_mults`), or, while the class is held
    /// at its allocation beside UDP (netqos `datapath_ceil`), so that its
    /// rate comes to that allocation (netqos `held_window_mult`).
    pub window_mult: u64,
    /// 0 (highest) ..= `LOWEST_PRIORITY`.
    pub priority: u32,
    /// 1 when the slot is in use.
    pub active: u32,
}

/// Per-class datapath state (array map indexed by slot). Buckets are signed:
/// a negative own bucket is debt.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClassState {
    pub own: i64,
    pub borrow: i64,
    pub ceil: i64,
    /// Last refill of the three buckets (CAS-guarded).
    pub last_ns: u64,
    /// Last update of the pacing multiplier (CAS-guarded).
    pub ctl_ns: u64,
    /// Pacing multiplier, 1/1024 units (integral of the bucket level).
    pub mult: u64,
    /// Flows registered minus flows closed.
    pub flows_open: u64,
    /// Last time (ns) the class's flows were seen held by their ACK clocks
    /// (ingress with ACK pacing; see `policy::next_multiplier`).
    pub held_ns: u64,
    /// Bytes of the last packet charged to the own bucket: the pacing loop
    /// reads it halfway through that charge (`policy::mid_charge_level`).
    pub own_charge: u64,
    /// Ingress: the longest smoothed round trip (µs) the class's flows had
    /// at their window-clamp steps, decaying (`policy::class_rtt`); the
    /// pacing loop's gains shrink with it (`policy::rtt_gain`). 0 = none.
    pub rtt_us: u64,
    /// Ingress: the class's first-flight clock (ns), ahead of now by the
    /// initial windows granted and not yet drained at its rate
    /// (`policy::first_flight`).
    pub first_flight_ns: u64,
    /// Ingress: the longest round trip (µs) its flows' receive windows
    /// covered at their window-clamp steps (`policy::window_rtt_us`: the
    /// path's where a queue upstream lengthened it), decaying as `rtt_us`.
    pub window_rtt_us: u64,
}

/// Per-class counters (per-CPU array indexed by slot; user space sums the
/// CPUs). Only grow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClassCounters {
    pub packets: u64,
    pub bytes: u64,
    pub own_bytes: u64,
    pub borrowed_bytes: u64,
    pub over_bytes: u64,
    pub ce_marks: u64,
    pub drops: u64,
    pub drop_bytes: u64,
    pub pacing_updates: u64,
    /// Per flow per activity epoch in which it was acknowledged (egress) or
    /// acknowledged received data (ingress): its weight, in 1/1024 (one for
    /// a flow using its rate, see `policy::activity_weight`).
    pub flow_activations: u64,
    /// Receive-window clamps written (ingress, flows without ECN).
    pub window_clamps: u64,
    /// Per flow per activity epoch in which it was counted after its
    /// first: its use since, in 128 bytes/s (`policy::use_units`); what
    /// `ClassConfig::flow_even` is computed from.
    pub use_sum: u64,
    /// The squares of the uses added to `use_sum`.
    pub use_squares: u64,
    /// Flows accepted with an initial receive window below the kernel's
    /// (ingress; `policy::first_flight`).
    pub initial_windows: u64,
    /// Received bytes that neither a receive window nor CE marks hold while
    /// windows hold the received TCP flows (ingress without ACK pacing):
    /// UDP and other traffic without ECN, a TCP flow without ECN before its
    /// first window step. 0 otherwise.
    pub unheld_bytes: u64,
}

impl ClassCounters {
    /// Sum of per-CPU values.
    pub fn add(&mut self, o: &Self) {
        self.packets = self.packets.wrapping_add(o.packets);
        self.bytes = self.bytes.wrapping_add(o.bytes);
        self.own_bytes = self.own_bytes.wrapping_add(o.own_bytes);
        self.borrowed_bytes = self.borrowed_bytes.wrapping_add(o.borrowed_bytes);
        self.over_bytes = self.over_bytes.wrapping_add(o.over_bytes);
        self.ce_marks = self.ce_marks.wrapping_add(o.ce_marks);
        self.drops = self.drops.wrapping_add(o.drops);
        self.drop_bytes = self.drop_bytes.wrapping_add(o.drop_bytes);
        self.pacing_updates = self.pacing_updates.wrapping_add(o.pacing_updates);
        self.flow_activations = self.flow_activations.wrapping_add(o.flow_activations);
        self.window_clamps = self.window_clamps.wrapping_add(o.window_clamps);
        self.use_sum = self.use_sum.wrapping_add(o.use_sum);
        self.use_squares = self.use_squares.wrapping_add(o.use_squares);
        self.initial_windows = self.initial_windows.wrapping_add(o.initial_windows);
        self.unheld_bytes = self.unheld_bytes.wrapping_add(o.unheld_bytes);
    }
}

/// The shared token pool (array map, one entry).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolState {
    pub tokens: i64,
    pub last_ns: u64,
}

/// `SockClass::flags` bit: the flow leaves through the shaped interface, so
/// it is paced.
pub const SOCK_SHAPED: u32 = 1;
/// `SockClass::flags` bit: the flow was routed elsewhere; not paced.
pub const SOCK_ROUTED_ELSEWHERE: u32 = 2;
/// `SockClass::flags` bit (ingress): the socket's ACKs have been held by
/// ACK pacing (its ACKs pass an fq that honours their departure time).
pub const SOCK_ACKS_HELD: u32 = 4;
/// `SockClass::flags` bit: the flow woke from idle in its last counted
/// activity epoch and has not been counted in full yet
/// (`policy::woke_from_idle`).
pub const SOCK_WOKEN: u32 = 8;
/// `SockClass::flags` bit: with `SOCK_WOKEN`, the epoch after the wake.
pub const SOCK_WOKEN_LATE: u32 = 16;
/// `SockClass::flags` bit (ingress): the socket's window clamp is the one
/// of a flow that has not started (`policy::unstarted_window_clamp`);
/// sized again at the first segment it sends after it has.
pub const SOCK_UNSTARTED: u32 = 32;

/// Cached classification of one socket (LRU hash keyed by socket cookie).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockClass {
    pub slot: u32,
    pub flags: u32,
    /// Slot + 1 whose `flows_open` counts this flow; 0 = not counted.
    pub counted: u32,
    /// Ingress: the receive-window clamp applied the step before `pacing`
    /// (bytes; 0 = none), the one a round trip's received rate reflects.
    pub prev_clamp: u32,
    /// `NetGlobal::generation` the classification was made under.
    pub generation: u64,
    /// Last activity epoch the flow was counted in.
    pub epoch: u64,
    /// Pacing rate last applied to the socket, bytes per second (wire);
    /// ingress: the receive-window clamp last applied, bytes.
    pub pacing: u64,
    /// When the flow was first paced (young flows are capped at an even
    /// share until the epochs have counted them).
    pub born_ns: u64,
    /// Ingress: bytes received and time at the last window-clamp step.
    pub step_bytes: u64,
    pub step_ns: u64,
    /// Ingress ACK pacing: when the flow's next received packet may be
    /// acknowledged at the earliest (its virtual clock at the flow's rate).
    pub ack_next_ns: u64,
    /// Ingress ACK pacing: earliest departure of the ACKs the socket sends
    /// for what it has received so far.
    pub ack_at_ns: u64,
    /// Ingress ACK pacing: wire bytes of TCP data received.
    pub rcv_bytes: u64,
    /// The flow's byte count (see `policy::activity_weight`) and the time
    /// when it was last counted in an activity epoch; 0 ns = never.
    pub epoch_bytes: u64,
    pub epoch_ns: u64,
    /// Ingress ACK pacing: when a received packet last found the flow's ACK
    /// clock behind real time (`policy::clock_fell_behind`).
    pub clock_behind_ns: u64,
    /// Ingress: the flow's smoothed round trip (µs) at its last window-clamp
    /// step; 0 = none yet (the ACK clock then takes its class's).
    pub rtt_us: u64,
    /// Ingress ACK pacing: TCP timestamp (TSval) of the last ACK the socket
    /// sent through the shaped interface.
    pub ack_tsval: u32,
    /// Ingress ACK pacing: TSval of the path probe, the first ACK that
    /// carried it; its echo in received data ends the probe.
    pub probe_tsval: u32,
    /// Ingress: the flow's path round trip (µs; 0 = not measured), see
    /// `policy::PathRtt`.
    pub path_rtt_us: u32,
    pub path_min_us: u32,
    pub path_window_ns: u64,
    /// Ingress ACK pacing: when the path probe left (0 = none out; written
    /// last when one starts, taken back with a compare-and-swap).
    pub probe_ns: u64,
    /// Ingress ACK pacing: `rcv_bytes` when the path probe started.
    pub probe_bytes: u64,
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: plain `#[repr(C)]` integers without padding holes that matter;
    // any bit pattern is a valid value.
    unsafe impl aya::Pod for NetGlobal {}
    unsafe impl aya::Pod for ClassConfig {}
    unsafe impl aya::Pod for ClassState {}
    unsafe impl aya::Pod for ClassCounters {}
    unsafe impl aya::Pod for PoolState {}
    unsafe impl aya::Pod for SockClass {}
}

/// IPv6 extension headers [`ipv6_upper_layer`] follows, at most (a
/// hop-by-hop or destination options header and a fragment header, say).
/// Each one more multiplies the paths the verifier walks through the
/// programs after the parse: with 4, `qos_ingress` went past the 1 000 000
/// instructions it verifies (kernel 6.18); 3 loaded.
pub const IPV6_EXT_MAX: usize = 2;
/// Next-header values of the IPv6 extension headers [`ipv6_upper_layer`]
/// follows.
pub const IPV6_HOP_BY_HOP: u8 = 0;
pub const IPV6_ROUTING: u8 = 43;
pub const IPV6_FRAGMENT: u8 = 44;
pub const IPV6_AUTH: u8 = 51;
pub const IPV6_DEST_OPTS: u8 = 60;
/// Protocol [`ipv6_upper_layer`] reports for a fragment other than the
/// first: it carries no upper-layer header (IANA's "no next header").
pub const IPV6_NO_UPPER_HEADER: u8 = 59;

/// Upper-layer protocol of an IPv6 packet and the length of its network
/// headers (40 plus the extension headers before it). `byte(off)` reads the
/// packet's byte `off` from the start of its IPv6 header. Past
/// [`IPV6_EXT_MAX`] extension headers, the next one's type is reported (not
/// TCP nor UDP, so nothing reads a port or payload from it); a fragment
/// other than the first reports [`IPV6_NO_UPPER_HEADER`].
#[inline(always)]
pub fn ipv6_upper_layer(byte: impl Fn(usize) -> Option<u8>) -> Option<(u8, usize)> {
    let mut next = byte(6)?;
    let mut len = 40usize;
    let mut i = 0;
    while i < IPV6_EXT_MAX {
        let ext_len = match next {
            IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTS => (byte(len + 1)? as usize + 1) * 8,
            IPV6_AUTH => (byte(len + 1)? as usize + 2) * 4,
            IPV6_FRAGMENT => {
                // Fragment offset (13 bits, in 8-byte units) of bytes 2-3.
                let offset = ((byte(len + 2)? as usize) << 5) | (byte(len + 3)? as usize >> 3);
                if offset != 0 {
                    return Some((IPV6_NO_UPPER_HEADER, len + 8));
                }
                8
            }
            _ => break,
        };
        next = byte(len)?;
        len += ext_len;
        i += 1;
    }
    Some((next, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ingress_tags_name_the_interface_and_are_never_class_tags() {
        let class_tags = TAG_OFFSET..=MAX_CLASSES - 1 + TAG_OFFSET;
        for ifindex in [0, 1, 2, 4097, 0x3FFF, 0x4000, 0x4001, 70_000, u32::MAX] {
            let tag = ingress_tag(ifindex);
            assert!(!class_tags.contains(&(tag & !(TAG_PACED | TAG_TCP_SOCK))));
            assert_eq!(tag & TAG_INGRESS, TAG_INGRESS);
            assert!(tag <= u16::MAX as u32, "tc_index is 16 bits");
        }
        assert_ne!(ingress_tag(5), ingress_tag(6));
        // Modulo the tag's range: the documented limit.
        assert_eq!(ingress_tag(5), ingress_tag(5 + 0x4000));
    }

    /// An IPv6 header (40 bytes) whose next header is `next`, followed by
    /// `rest`.
    fn ipv6(next: u8, rest: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x60;
        p[6] = next;
        p.extend_from_slice(rest);
        p
    }

    fn parse(p: &[u8]) -> Option<(u8, usize)> {
        ipv6_upper_layer(|off| p.get(off).copied())
    }

    const TCP: u8 = 6;
    const UDP: u8 = 17;

    #[test]
    fn ipv6_without_extension_headers_is_its_next_header() {
        assert_eq!(parse(&ipv6(TCP, &[0; 20])), Some((TCP, 40)));
        assert_eq!(parse(&ipv6(UDP, &[0; 8])), Some((UDP, 40)));
        // Truncated before the next-header byte.
        assert_eq!(parse(&[0x60, 0, 0, 0, 0, 0]), None);
    }

    #[test]
    fn ipv6_extension_headers_are_followed_to_tcp_or_udp() {
        // Destination options, 8 bytes (length 0: one unit of 8).
        let dst = [TCP, 0, 1, 4, 0, 0, 0, 0];
        assert_eq!(parse(&ipv6(IPV6_DEST_OPTS, &dst)), Some((TCP, 48)));
        // Hop-by-hop of 16 bytes, then routing of 24, then UDP.
        let mut rest = vec![IPV6_ROUTING, 1];
        rest.extend_from_slice(&[0; 14]);
        rest.extend_from_slice(&[UDP, 2]);
        rest.extend_from_slice(&[0; 22]);
        assert_eq!(parse(&ipv6(IPV6_HOP_BY_HOP, &rest)), Some((UDP, 80)));
        // Authentication header: length in 4-byte units, minus 2 (24 bytes).
        let mut ah = vec![TCP, 4];
        ah.extend_from_slice(&[0; 22]);
        assert_eq!(parse(&ipv6(IPV6_AUTH, &ah)), Some((TCP, 64)));
        // A first fragment (offset 0, more fragments) carries the TCP header.
        let first = [TCP, 0, 0, 1, 0, 0, 0, 7];
        assert_eq!(parse(&ipv6(IPV6_FRAGMENT, &first)), Some((TCP, 48)));
    }

    #[test]
    fn ipv6_later_fragments_and_deep_chains_name_no_transport() {
        // Offset 185 (× 8 bytes): no TCP header follows.
        let later = [
            TCP,
            0,
            (185u16 << 3 >> 8) as u8,
            (185u16 << 3) as u8,
            0,
            0,
            0,
            7,
        ];
        assert_eq!(
            parse(&ipv6(IPV6_FRAGMENT, &later)),
            Some((IPV6_NO_UPPER_HEADER, 48))
        );
        // More extension headers than followed: the next one's type, never
        // TCP.
        let mut chain = Vec::new();
        for _ in 0..IPV6_EXT_MAX {
            chain.extend_from_slice(&[IPV6_DEST_OPTS, 0, 1, 4, 0, 0, 0, 0]);
        }
        chain.extend_from_slice(&[TCP, 0, 1, 4, 0, 0, 0, 0]);
        assert_eq!(
            parse(&ipv6(IPV6_DEST_OPTS, &chain)),
            Some((IPV6_DEST_OPTS, 40 + 8 * IPV6_EXT_MAX))
        );
        // Cut inside an extension header.
        assert_eq!(parse(&ipv6(IPV6_DEST_OPTS, &[TCP])), None);
    }
}
