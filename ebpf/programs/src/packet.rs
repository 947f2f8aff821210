//! Bounded packet parsing for tc and cgroup_skb programs (Ethernet, optional
//! VLAN, IPv4/IPv6 with up to two extension headers, TCP/UDP).

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup},
    helpers::generated::bpf_fib_lookup as fib_lookup_helper,
    programs::{TcContext, sk_buff::SkBuff},
};

pub const ETH_HLEN: usize = 14;
/// Most link-layer bytes [`headers`] parses before the network header
/// (Ethernet and one VLAN tag).
pub const MAX_L2_LEN: u32 = ETH_HLEN as u32 + 4;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Header length assumed when a GSO packet cannot be parsed (Ethernet + IPv4
/// + TCP with timestamps).
pub const FALLBACK_HEADER_LEN: u32 = 66;

/// Layer 3/4 facts of a packet.
#[derive(Clone, Copy, Default)]
pub struct Headers {
    /// Bytes before the payload (L2 + L3 + L4 headers).
    pub len: u32,
    pub family: u8,
    pub protocol: u8,
    pub l3_offset: u32,
    pub l4_offset: u32,
}

#[inline(always)]
fn load_u8(skb: &SkBuff, off: usize) -> Option<u8> {
    skb.load::<u8>(off).ok()
}

#[inline(always)]
fn load_be16(skb: &SkBuff, off: usize) -> Option<u16> {
    skb.load::<u16>(off).ok().map(u16::from_be)
}

/// Parses the headers of an Ethernet frame as seen by a tc program.
#[inline(always)]
pub fn headers(ctx: &TcContext) -> Option<Headers> {
    let mut l3 = ETH_HLEN;
    let mut proto = load_be16(&ctx.skb, 12)?;
    if proto == ETH_P_8021Q {
        proto = load_be16(&ctx.skb, 16)?;
        l3 += 4;
    }
    headers_from(&ctx.skb, l3, proto)
}

/// Parses the L3/L4 headers starting at `l3` (`ethertype` host order).
#[inline(always)]
fn headers_from(skb: &SkBuff, l3: usize, ethertype: u16) -> Option<Headers> {
    let (family, protocol, l3_len) = if ethertype == ETH_P_IP {
        let ihl = (load_u8(skb, l3)? & 0x0f) as usize * 4;
        (AF_INET, load_u8(skb, l3 + 9)?, ihl)
    } else if ethertype == ETH_P_IPV6 {
        let (next, len) = qos_common::net::ipv6_upper_layer(|off| load_u8(skb, l3 + off))?;
        (AF_INET6, next, len)
    } else {
        return None;
    };
    let l4 = l3 + l3_len;
    let l4_len = if protocol == IPPROTO_TCP {
        ((load_u8(skb, l4 + 12)? >> 4) as usize) * 4
    } else if protocol == IPPROTO_UDP {
        8
    } else {
        0
    };
    Some(Headers {
        len: (l4 + l4_len) as u32,
        family,
        protocol,
        l3_offset: l3 as u32,
        l4_offset: l4 as u32,
    })
}

/// Whether a packet whose data starts at the network header is ECN-capable
/// (ECT(0), ECT(1) or already CE). `ethertype_be` as in
/// [`l3_headers`].
#[inline(always)]
pub fn l3_ecn_capable(skb: &SkBuff, ethertype_be: u32) -> bool {
    let ethertype = u16::from_be(ethertype_be as u16);
    let ecn = if ethertype == ETH_P_IP {
        load_u8(skb, 1).unwrap_or(0) & 3
    } else if ethertype == ETH_P_IPV6 {
        (load_u8(skb, 1).unwrap_or(0) >> 4) & 3
    } else {
        0
    };
    ecn != 0
}

impl Headers {
    /// TCP payload bytes of a packet of `skb_len` bytes with these headers;
    /// None when it is not TCP.
    #[inline(always)]
    pub fn tcp_payload(&self, skb_len: u32) -> Option<u32> {
        (self.protocol == IPPROTO_TCP).then(|| skb_len.saturating_sub(self.len))
    }
}

/// A connection request as both its SYN and its request socket show it:
/// the remote address (IPv4 in the first word, as on the wire) and both
/// ports (host order).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SynKey {
    pub remote_addr: [u32; 4],
    pub remote_port: u16,
    pub local_port: u16,
}

const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;

/// The key of a received SYN (not a SYN-ACK), parsed with `h` from a packet
/// whose data starts at the network header.
#[inline(always)]
pub fn syn_key(skb: &SkBuff, h: &Headers) -> Option<SynKey> {
    if h.protocol != IPPROTO_TCP {
        return None;
    }
    let l4 = h.l4_offset as usize;
    if load_u8(skb, l4 + 13)? & (TCP_FLAG_SYN | TCP_FLAG_ACK) != TCP_FLAG_SYN {
        return None;
    }
    let l3 = h.l3_offset as usize;
    let word = |off: usize| skb.load::<u32>(off).ok();
    let remote_addr = if h.family == AF_INET {
        [word(l3 + 12)?, 0, 0, 0]
    } else {
        [
            word(l3 + 8)?,
            word(l3 + 12)?,
            word(l3 + 16)?,
            word(l3 + 20)?,
        ]
    };
    Some(SynKey {
        remote_addr,
        remote_port: load_be16(skb, l4)?,
        local_port: load_be16(skb, l4 + 2)?,
    })
}

/// First option word of a TCP segment whose options begin with the
/// timestamp option the way Linux writes it (NOP, NOP, kind 8, length 10).
const TCP_TS_ALIGNED: u32 = 0x0101_080a;

/// TSval and TSecr (as sent, host order) of a TCP segment parsed with `h`,
/// when its options begin with an aligned timestamp option (Linux puts it
/// first); None otherwise (other stacks' layouts are not searched).
#[inline(always)]
pub fn tcp_timestamps(skb: &SkBuff, h: &Headers) -> Option<(u32, u32)> {
    if h.protocol != IPPROTO_TCP || h.len < h.l4_offset + 32 {
        return None;
    }
    let l4 = h.l4_offset as usize;
    let words = skb.load::<[u32; 3]>(l4 + 20).ok()?;
    if u32::from_be(words[0]) != TCP_TS_ALIGNED {
        return None;
    }
    Some((u32::from_be(words[1]), u32::from_be(words[2])))
}

/// Parses the L3/L4 headers of a packet whose data starts at the network
/// header, as cgroup_skb programs see it. `ethertype` is `__sk_buff::protocol` (network order).
#[inline(always)]
pub fn l3_headers(skb: &SkBuff, ethertype_be: u32) -> Option<Headers> {
    headers_from(skb, 0, u16::from_be(ethertype_be as u16))
}

/// Per-frame header bytes on the wire (Ethernet included) of a packet whose
/// data starts at the network header, from its [`l3_headers`].
#[inline(always)]
pub fn l3_frame_header_len(h: Option<Headers>) -> u32 {
    match h {
        Some(h) if h.len > 0 => h.len + ETH_HLEN as u32,
        _ => FALLBACK_HEADER_LEN,
    }
}

/// Header length of a GSO packet, for wire accounting.
#[inline(always)]
pub fn gso_header_len(ctx: &TcContext) -> u32 {
    match headers(ctx) {
        Some(h) if h.len > 0 => h.len,
        _ => FALLBACK_HEADER_LEN,
    }
}

/// ifindex the kernel would forward this packet to, or 0 when unknown.
/// `in_ifindex` is the device the packet arrived on.
#[inline(always)]
pub fn forward_ifindex(ctx: &TcContext, in_ifindex: u32) -> u32 {
    let Some(h) = headers(ctx) else { return 0 };
    // SAFETY: bpf_fib_lookup is plain data; all-zero is a valid value.
    let mut p: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    p.family = h.family;
    p.l4_protocol = h.protocol;
    p.ifindex = in_ifindex;
    let l3 = h.l3_offset as usize;
    let l4 = h.l4_offset as usize;
    if h.protocol == IPPROTO_TCP || h.protocol == IPPROTO_UDP {
        // Ports stay in network byte order, as the helper expects.
        p.sport = ctx.load::<u16>(l4).unwrap_or(0);
        p.dport = ctx.load::<u16>(l4 + 2).unwrap_or(0);
    }
    if h.family == AF_INET {
        p.__bindgen_anon_2.tos = load_u8(&ctx.skb, l3 + 1).unwrap_or(0);
        p.__bindgen_anon_3.ipv4_src = ctx.load::<u32>(l3 + 12).unwrap_or(0);
        p.__bindgen_anon_4.ipv4_dst = ctx.load::<u32>(l3 + 16).unwrap_or(0);
    } else {
        let Ok(src) = ctx.load::<[u32; 4]>(l3 + 8) else {
            return 0;
        };
        let Ok(dst) = ctx.load::<[u32; 4]>(l3 + 24) else {
            return 0;
        };
        p.__bindgen_anon_3.ipv6_src = src;
        p.__bindgen_anon_4.ipv6_dst = dst;
    }
    p.__bindgen_anon_1.tot_len = 0;
    // SAFETY: `p` lives on the stack for the duration of the call; the size
    // matches the struct.
    let ret = unsafe {
        fib_lookup_helper(
            ctx.skb.skb.cast(),
            &mut p,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    if ret == BPF_FIB_LKUP_RET_SUCCESS as i64 || ret == BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        p.ifindex
    } else {
        0
    }
}
