//! The network testbed: a shaped veth from the host to a peer namespace,
//! optional per-container namespaces routed through it, and extra host
//! addresses so every group has its own address. Egress tests send from the
//! host (cgroups, containers) to receivers in the peer; ingress tests send
//! from the peer to receivers in cgroups on the host or in containers.
//!
//! ```text
//!  host netns                                  peer netns
//!  senders in cgroups ── <shaped veth> ═══════ <peer veth>  receivers
//!  ct netns: sender ═ veth ═ host veth ─ routed ─┘
//! ```
//!
//! Where the kernel has IPv6, the host, the peer, the sender groups and the
//! containers have IPv6 addresses as well, in the bed's
//! `fd71:7105:<net>::/48` (`<net>` in hex: 10.100. goes with
//! fd71:7105:64::): the shaped link is its subnet 0, container `i`'s is
//! 10 + i, as in IPv4.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{Context, Result, bail};

use crate::{Netns, Sysctl, Veth, run, unique};

/// One container: its namespace, the host-side veth, its addresses.
#[derive(Debug)]
pub struct Container {
    pub ns: Netns,
    pub veth: Veth,
    pub ip: Ipv4Addr,
    /// None where the kernel has no IPv6.
    pub ip6: Option<Ipv6Addr>,
}

impl Container {
    /// The container's address in IPv4 or (`ipv6`) IPv6.
    pub fn addr(&self, ipv6: bool) -> Result<IpAddr> {
        if !ipv6 {
            return Ok(self.ip.into());
        }
        self.ip6
            .map(IpAddr::from)
            .context("the container has no IPv6: this kernel has none (see require_ipv6)")
    }
}

/// See the module docs.
#[derive(Debug)]
pub struct EgressBed {
    // Field order is drop order: containers and veths before namespaces.
    pub containers: Vec<Container>,
    pub shaped: Veth,
    pub peer: Netns,
    /// 10.<net>.0.0/16 belongs to this bed.
    pub net: u8,
    pub host_ip: Ipv4Addr,
    pub peer_ip: Ipv4Addr,
    /// Extra host addresses on the shaped veth, one per sender group.
    pub sender_ips: Vec<Ipv4Addr>,
    /// The same three in IPv6; None where the kernel has no IPv6.
    pub ipv6: Option<BedIpv6>,
    _forward: Option<Sysctl>,
    _forward6: Option<Sysctl>,
}

/// A bed's IPv6 addresses (see [`EgressBed`]).
#[derive(Debug)]
pub struct BedIpv6 {
    pub host: Ipv6Addr,
    pub peer: Ipv6Addr,
    pub senders: Vec<Ipv6Addr>,
}

/// Whether this kernel has IPv6 (it has not when booted with
/// `ipv6.disable=1`).
pub fn ipv6_available() -> bool {
    std::path::Path::new("/proc/sys/net/ipv6").exists()
}

/// Whether an IPv6 test can run here; like [`crate::require_root`]: under
/// CI a kernel without IPv6 fails the test instead of skipping it.
pub fn require_ipv6(test: &str) -> bool {
    if ipv6_available() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test} needs IPv6 and CI is set: this kernel has none (ipv6.disable=1?)");
    }
    eprintln!("SKIPPED {test}: needs IPv6, which this kernel does not have (ipv6.disable=1?)");
    false
}

/// Held while a bed picks its 10.x network and claims it (adds its host
/// address): without it two beds built at once (parallel tests, two runs)
/// can pick the same network between the check and the claim, and two
/// veths with one subnet route each other's traffic (a CI run of d17e365:
/// a client's connection refused, most likely by the other bed's peer).
/// The lock is released when the file is closed.
fn net_claim_lock() -> Result<std::fs::File> {
    let path = net_claim_lock_path();
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    f.lock()
        .with_context(|| format!("locking {}", path.display()))?;
    Ok(f)
}

fn net_claim_lock_path() -> std::path::PathBuf {
    std::env::temp_dir().join("qos-testbeds-net.lock")
}

fn free_net() -> Result<u8> {
    let addrs = run("ip", &["-o", "addr"])?;
    let routes = run("ip", &["route"])?;
    for _ in 0..64 {
        let n = 100 + (crate::nanos_now() % 150) as u8;
        let tag = format!("10.{n}.");
        if !addrs.contains(&tag) && !routes.contains(&tag) {
            return Ok(n);
        }
    }
    bail!("no free 10.x.0.0/16 network for the testbed")
}

impl EgressBed {
    /// Builds a bed with `senders` host source addresses and `containers`
    /// container namespaces.
    pub fn new(senders: usize, containers: usize) -> Result<Self> {
        let claim = net_claim_lock()?;
        let net = free_net()?;
        let peer = Netns::new("qpeer")?;
        let host_if = unique("qsh");
        let peer_if = unique("qsp");
        let shaped = Veth::new(&host_if, &peer_if, &peer)?;
        let host_ip = Ipv4Addr::new(10, net, 0, 1);
        let peer_ip = Ipv4Addr::new(10, net, 0, 2);
        run(
            "ip",
            &["addr", "add", &format!("{host_ip}/24"), "dev", &host_if],
        )?;
        // Claimed: the address shows in `ip addr` for the next bed.
        drop(claim);
        peer.ip(&["addr", "add", &format!("{peer_ip}/24"), "dev", &peer_if])?;
        peer.ip(&[
            "route",
            "add",
            &format!("10.{net}.0.0/16"),
            "via",
            &host_ip.to_string(),
        ])?;
        let mut sender_ips = Vec::new();
        for i in 0..senders {
            let ip = Ipv4Addr::new(10, net, 0, 10 + i as u8);
            run("ip", &["addr", "add", &format!("{ip}/32"), "dev", &host_if])?;
            sender_ips.push(ip);
        }
        let ipv6 = if ipv6_available() {
            Some(add_ipv6(net, senders, &peer, &host_if, &peer_if)?)
        } else {
            None
        };
        let forward = if containers > 0 {
            Some(Sysctl::set("net.ipv4.ip_forward", "1")?)
        } else {
            None
        };
        // The host routes the containers' IPv6 as a container host with
        // IPv6 does (for as long as the bed lives: it also turns off
        // router advertisements on interfaces with accept_ra=1).
        let forward6 = match &ipv6 {
            Some(v6) if containers > 0 => {
                let guard = Sysctl::set("net.ipv6.conf.all.forwarding", "1")?;
                peer.ip(&[
                    "-6",
                    "route",
                    "add",
                    &format!("{}/48", bed_ip6(net, 0, 0)),
                    "via",
                    &v6.host.to_string(),
                ])?;
                Some(guard)
            }
            _ => None,
        };
        let mut bed = Self {
            containers: Vec::new(),
            shaped,
            peer,
            net,
            host_ip,
            peer_ip,
            sender_ips,
            ipv6,
            _forward: forward,
            _forward6: forward6,
        };
        for i in 0..containers {
            bed.add_container(i)
                .with_context(|| format!("container {i}"))?;
        }
        // Receivers accept ECN (the kernel default for servers is to accept).
        bed.peer.exec("sysctl", &["-qw", "net.ipv4.tcp_ecn=1"])?;
        Ok(bed)
    }

    fn add_container(&mut self, i: usize) -> Result<()> {
        let ns = Netns::new("qct")?;
        let host_if = unique("qch");
        let veth = Veth::new(&host_if, "eth0", &ns)?;
        let sub = 10 + i as u8;
        let gw = Ipv4Addr::new(10, self.net, sub, 1);
        let ip = Ipv4Addr::new(10, self.net, sub, 2);
        run("ip", &["addr", "add", &format!("{gw}/24"), "dev", &host_if])?;
        ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        ns.ip(&["route", "add", "default", "via", &gw.to_string()])?;
        ns.exec("sysctl", &["-qw", "net.ipv4.tcp_ecn=1"])?;
        let ip6 = if self.ipv6.is_some() {
            let (gw, ip) = (bed_ip6(self.net, sub, 1), bed_ip6(self.net, sub, 2));
            run("sysctl", &["-qw", &ipv6_on(&host_if)])?;
            ns.exec("sysctl", &["-qw", &ipv6_on("eth0")])?;
            let (gw_net, ip_net) = (format!("{gw}/64"), format!("{ip}/64"));
            run("ip", &["addr", "add", &gw_net, "dev", &host_if, "nodad"])?;
            ns.ip(&["addr", "add", &ip_net, "dev", "eth0", "nodad"])?;
            ns.ip(&["-6", "route", "add", "default", "via", &gw.to_string()])?;
            Some(ip)
        } else {
            None
        };
        self.containers.push(Container { ns, veth, ip, ip6 });
        Ok(())
    }

    pub fn shaped_if(&self) -> &str {
        self.shaped.host()
    }

    /// Sender group `i`'s host address in IPv4 or (`ipv6`) IPv6.
    pub fn sender_addr(&self, i: usize, ipv6: bool) -> Result<IpAddr> {
        let addr = if ipv6 {
            self.ipv6()?.senders.get(i).copied().map(IpAddr::from)
        } else {
            self.sender_ips.get(i).copied().map(IpAddr::from)
        };
        addr.with_context(|| format!("the bed has no sender group {i}"))
    }

    /// The peer's address in IPv4 or (`ipv6`) IPv6.
    pub fn peer_addr(&self, ipv6: bool) -> Result<IpAddr> {
        Ok(if ipv6 {
            self.ipv6()?.peer.into()
        } else {
            self.peer_ip.into()
        })
    }

    fn ipv6(&self) -> Result<&BedIpv6> {
        self.ipv6
            .as_ref()
            .context("the test bed has no IPv6: this kernel has none (see require_ipv6)")
    }

    /// Makes the peer the sending side of ingress tests: CUBIC (the host
    /// default may be BBR, which ignores CE marks), and ECN per destination:
    /// the peer no longer asks for ECN by itself; a route with the `ecn`
    /// feature asks for it towards one receiver address.
    ///
    /// A network namespace may only pick an algorithm the host allows
    /// (`tcp_allowed_congestion_control`, which lists only what the host
    /// itself has used): CUBIC is allowed for as long as the returned guard
    /// lives.
    pub fn peer_senders(&self) -> Result<Option<crate::Sysctl>> {
        const ALLOWED: &str = "net.ipv4.tcp_allowed_congestion_control";
        let allowed = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_allowed_congestion_control")
            .context("reading tcp_allowed_congestion_control")?;
        let guard = if allowed.split_whitespace().any(|c| c == "cubic") {
            None
        } else {
            Some(crate::Sysctl::set(
                ALLOWED,
                &format!("{} cubic", allowed.trim()),
            )?)
        };
        self.peer.exec(
            "sysctl",
            &[
                "-qw",
                "net.ipv4.tcp_ecn=0",
                "net.ipv4.tcp_congestion_control=cubic",
            ],
        )?;
        Ok(guard)
    }

    /// Gives the peer's side of the shaped veth the rate of a physical link
    /// with a switch-like buffer (tbf): what ingress traffic crosses before
    /// it reaches a real host. Without it a veth delivers at tens of Gbit/s
    /// with microsecond round trips.
    pub fn peer_link(&self, rate: &str, buffer: &str) -> Result<()> {
        self.peer_link_with_delay(rate, buffer, 0)
    }

    /// [`EgressBed::peer_link`] that also delays what it carries by
    /// `delay_ms` (netem above the tbf): the round trip of a sender across
    /// a wide-area network. 0: no delay.
    pub fn peer_link_with_delay(&self, rate: &str, buffer: &str, delay_ms: u32) -> Result<()> {
        let dev = self.shaped.peer();
        let mut tbf = vec!["qdisc", "replace", "dev", dev];
        if delay_ms == 0 {
            tbf.push("root");
        } else {
            // netem holds a round trip's worth of packets of a 10 Gbit/s
            // link at most; its default limit (1000) drops a fast flow's.
            let delay = format!("{delay_ms}ms");
            let limit = (delay_ms * 1000).to_string();
            self.peer
                .exec(
                    "tc",
                    &[
                        "qdisc", "replace", "dev", dev, "root", "handle", "1:", "netem", "delay",
                        &delay, "limit", &limit,
                    ],
                )
                .context("netem (sch_netem) for the link's delay")?;
            tbf.extend(["parent", "1:"]);
        }
        tbf.extend(["tbf", "rate", rate, "burst", "16kb", "limit", buffer]);
        self.peer.exec("tc", &tbf)?;
        Ok(())
    }

    /// Whether the peer's TCP senders towards `dst` negotiate ECN (see
    /// [`EgressBed::peer_senders`]).
    pub fn sender_ecn(&self, dst: impl Into<IpAddr>, ecn: bool) -> Result<()> {
        let (dst, gw) = match dst.into() {
            IpAddr::V4(a) => (format!("{a}/32"), self.host_ip.to_string()),
            IpAddr::V6(a) => (format!("{a}/128"), self.ipv6()?.host.to_string()),
        };
        let mut args = vec!["route", "replace", &dst, "via", &gw];
        if ecn {
            args.extend(["features", "ecn"]);
        }
        self.peer.ip(&args)?;
        Ok(())
    }
}

/// Gives a bed's shaped veth IPv6 in the network the IPv4 claim made the
/// bed's (`net`): the host, the peer and `senders` sender addresses.
/// IPv6 is turned on on both ends first (a host may have it off by
/// default), and duplicate address detection is skipped: it would hold the
/// addresses back for a second or more.
fn add_ipv6(
    net: u8,
    senders: usize,
    peer: &Netns,
    host_if: &str,
    peer_if: &str,
) -> Result<BedIpv6> {
    let ip6 = |host: u16| bed_ip6(net, 0, host);
    run("sysctl", &["-qw", &ipv6_on(host_if)])?;
    peer.exec("sysctl", &["-qw", &ipv6_on(peer_if)])?;
    let (host, peer_ip) = (ip6(1), ip6(2));
    run(
        "ip",
        &[
            "addr",
            "add",
            &format!("{host}/64"),
            "dev",
            host_if,
            "nodad",
        ],
    )?;
    peer.ip(&[
        "addr",
        "add",
        &format!("{peer_ip}/64"),
        "dev",
        peer_if,
        "nodad",
    ])?;
    let mut sender_ips = Vec::new();
    for i in 0..senders {
        let ip = ip6(0x10 + i as u16);
        run(
            "ip",
            &["addr", "add", &format!("{ip}/128"), "dev", host_if, "nodad"],
        )?;
        sender_ips.push(ip);
    }
    Ok(BedIpv6 {
        host,
        peer: peer_ip,
        senders: sender_ips,
    })
}

/// Address `host` of a bed's IPv6 subnet `sub` (0: the shaped link;
/// container `i`'s: 10 + i, as its IPv4 /24): the bed's IPv6 is the /48
/// of `net`.
fn bed_ip6(net: u8, sub: u8, host: u16) -> Ipv6Addr {
    Ipv6Addr::new(
        0xfd71,
        0x7105,
        u16::from(net),
        u16::from(sub),
        0,
        0,
        0,
        host,
    )
}

/// The sysctl that turns IPv6 on for `dev`.
fn ipv6_on(dev: &str) -> String {
    format!("net.ipv6.conf.{dev}.disable_ipv6=0")
}

/// A veth pair left in the host namespace (`<name>`, `<name>p`), up, with
/// its transmit queues; deleted on drop.
#[derive(Debug)]
pub struct HostVeth(String);

impl HostVeth {
    pub fn new(prefix: &str, tx_queues: u32) -> Result<Self> {
        let name = unique(prefix);
        let queues = tx_queues.to_string();
        let peer = format!("{name}p");
        run(
            "ip",
            &[
                "link",
                "add",
                &name,
                "numtxqueues",
                &queues,
                "type",
                "veth",
                "peer",
                "name",
                &peer,
            ],
        )?;
        let veth = Self(name);
        run("ip", &["link", "set", veth.name(), "up"])?;
        Ok(veth)
    }

    pub fn name(&self) -> &str {
        &self.0
    }
}

impl Drop for HostVeth {
    fn drop(&mut self) {
        let _ = run("ip", &["link", "del", &self.0]);
    }
}

/// Whether the kernel has the fq qdisc (what ingress ACK pacing needs):
/// tried on a throwaway veth pair.
pub fn fq_available() -> Result<bool> {
    let veth = HostVeth::new("qfq", 1)?;
    Ok(run("tc", &["qdisc", "add", "dev", veth.name(), "root", "fq"]).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_bed_at_a_time_claims_a_network() {
        let held = net_claim_lock().unwrap();
        // Another claimant (another file description, as another thread or
        // process opens it) must wait.
        let other = std::fs::File::open(net_claim_lock_path()).unwrap();
        assert!(matches!(
            other.try_lock(),
            Err(std::fs::TryLockError::WouldBlock)
        ));
        drop(held);
        other.try_lock().unwrap();
    }
}
