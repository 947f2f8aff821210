//! The egress datapath for real: programs load into the running kernel,
//! traffic crosses network namespaces, shares are measured at the receiver.
//! Needs root (under CI a missing privilege fails the test).
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "test code: a failure panics"
)]

mod common;

use std::{sync::atomic::Ordering, time::Duration};

use common::control_loop;

use anyhow::Result;
use netqos::{ContainerInterfaces, Direction, NetQuota, Shaper, ShaperSettings, policy::Tuning};
use testbeds::{
    CgroupDir, Placement, Sysctl,
    iperf::{Client, ClientOpts, Server, wire_bytes_of},
    net::EgressBed,
    require_root,
};

/// One sender group of a test.
struct Group {
    quota: &'static str,
    ceil: Option<&'static str>,
    priority: u32,
    udp_bps: Option<u64>,
    /// TOS byte of the UDP sender (2 = ECT(0)).
    tos: Option<u8>,
}

const fn tcp(quota: &'static str) -> Group {
    Group {
        quota,
        ceil: None,
        priority: 0,
        udp_bps: None,
        tos: None,
    }
}

struct Outcome {
    /// Wire Mbit/s per group, after a 1 s warm-up.
    rates: Vec<f64>,
    /// Wire bytes each group's receiver took in over the whole run.
    wire: Vec<u64>,
    status: netqos::NetStatus,
}

fn settings(iface: &str, containers: bool) -> Result<ShaperSettings> {
    Ok(ShaperSettings {
        interface: iface.to_owned(),
        capacity: "1gbit".parse()?,
        default_rate: None,
        ingress_capacity: None,
        ingress_default_rate: None,
        ingress_clamp_ecn: false,
        ingress_ack_pacing: true,
        ingress_upstream_buffer: netqos::DEFAULT_UPSTREAM_BUFFER,
        default_priority: 7,
        container_interfaces: if containers {
            ContainerInterfaces::Patterns(vec!["qch*".into()])
        } else {
            ContainerInterfaces::Mode("none".into())
        },
        replace_bbr: true,
        tuning: Tuning::default(),
        pin_root: None,
        max_quotas: netqos::MAX_QUOTAS,
    })
}

/// Traffic tests share two CPUs; running them one at a time keeps the
/// measured shares about the shaper, not about CPU contention.
static TRAFFIC: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn run(groups: &[Group], containers: bool, secs: f64) -> Result<Outcome> {
    run_family(groups, containers, secs, false)
}

/// [`run`] over IPv4 or (`ipv6`) IPv6.
fn run_family(groups: &[Group], containers: bool, secs: f64, ipv6: bool) -> Result<Outcome> {
    let _one_at_a_time = TRAFFIC.lock().unwrap_or_else(|p| p.into_inner());
    let n = groups.len();
    let bed = EgressBed::new(n, if containers { n } else { 0 })?;
    let _ecn = Sysctl::set("net.ipv4.tcp_ecn", "1")?;
    let tmp = tempfile::tempdir()?;
    let parent = CgroupDir::new("qos-test-")?;
    let h = qos_core::Hierarchy::detect()?;
    let mut s = settings(bed.shaped_if(), containers)?;
    s.capacity = common::scaled("1gbit")?;
    let mut shaper = Shaper::start(s, &testbeds::cgroup2_root()?)?;
    let mut places = Vec::new();
    for (i, g) in groups.iter().enumerate() {
        let name = format!("g{i}");
        let dir = parent.child(&name)?;
        let cg = h.resolve(&parent.child_name(&name))?;
        let quota = NetQuota::egress(
            common::scaled(g.quota)?,
            g.ceil.map(common::scaled).transpose()?,
            g.priority,
        );
        shaper.set(&cg, quota)?;
        let netns = containers.then(|| bed.containers[i].ns.path());
        places.push(Placement {
            cgroup: Some(dir),
            netns,
        });
    }
    if containers {
        shaper.scan_interfaces();
    }
    let (stop, handle) = control_loop(shaper, |_| ());
    let peer = Placement {
        cgroup: None,
        netns: Some(bed.peer.path()),
    };
    let mut pairs = Vec::new();
    for (i, (g, p)) in groups.iter().zip(&places).enumerate() {
        let port = 5301 + i as u16;
        let dst = bed.peer_addr(ipv6)?;
        let server = Server::start(&peer, dst, port, tmp.path(), 0.1)?;
        let src = if containers {
            bed.containers[i].addr(ipv6)?
        } else {
            bed.sender_addr(i, ipv6)?
        };
        let opts = ClientOpts {
            seconds: secs,
            parallel: 1,
            udp_bps: g.udp_bps.map(|b| (b as f64 * common::rate_scale()) as u64),
            bind: Some(src),
            tos: g.tos,
            pacing_bps: None,
            tcp_bps: None,
            socket_buffer: None,
            interval: None,
        };
        pairs.push((server, Client::start(p, dst, port, &opts, tmp.path())?));
    }
    let mut rates = Vec::new();
    let mut wire = Vec::new();
    for ((server, client), g) in pairs.into_iter().zip(groups) {
        client.finish(Duration::from_secs_f64(secs + 20.0))?;
        let r = server.finish(Duration::from_secs(20))?;
        let (bytes, t) = r
            .intervals
            .iter()
            .filter(|i| i.0 >= 1.0 && i.1 - i.0 >= 0.05)
            .fold((0u64, 0.0), |(b, t), i| (b + i.2, t + i.1 - i.0));
        // In nominal (unscaled) Mbit/s, what the assertions are written in.
        rates.push(
            wire_bytes_of(bytes, g.udp_bps.is_some(), ipv6) as f64 * 8.0
                / t
                / 1e6
                / common::rate_scale(),
        );
        wire.push(wire_bytes_of(r.bytes, g.udp_bps.is_some(), ipv6));
    }
    stop.store(true, Ordering::Relaxed);
    let (shaper, _) = handle.join().expect("control thread");
    let status = shaper.status();
    shaper.stop();
    eprintln!("rates (mbit): {rates:?}");
    for c in &status.classes {
        eprintln!(
            "  {} alloc {} rate {} own {} borrow {} mult {:.2} flows {} over {} borrowed {}",
            c.cgroup,
            c.alloc_bps,
            c.rate_bps,
            c.own_tokens,
            c.borrow_tokens,
            c.pacing_multiplier,
            c.active_flows,
            c.over_bytes,
            c.borrowed_bytes
        );
    }
    Ok(Outcome {
        rates,
        wire,
        status,
    })
}

/// [`run`], once more if the shares miss `shares_ok` (both tries are
/// printed; the second must pass). The host's two CPUs run the senders, the
/// receivers and the shaper: two CI runs of 2026-12-03 moved only 948, and
/// then 885 and 836, of the 1000 Mbit/s (the 600 Mbit/s class at 540; the
/// borrowing classes short), while eight runs of the test binary on the same
/// host right after, two of them just after the memory tests as in CI,
/// passed every test (the guarantee test's classes within 0.2 %). The mechanism
/// checks (drops, attribution) are asserted on the returned outcome.
fn run_retrying_if_off(
    groups: &[Group],
    containers: bool,
    secs: f64,
    shares_ok: impl Fn(&[f64]) -> bool,
) -> Result<Outcome> {
    run_family_retrying_if_off(groups, containers, secs, false, shares_ok)
}

/// [`run_retrying_if_off`] over IPv4 or (`ipv6`) IPv6.
fn run_family_retrying_if_off(
    groups: &[Group],
    containers: bool,
    secs: f64,
    ipv6: bool,
    shares_ok: impl Fn(&[f64]) -> bool,
) -> Result<Outcome> {
    common::retry_while_shares_off(
        2,
        || run_family(groups, containers, secs, ipv6),
        |o| &o.rates,
        shares_ok,
    )
}

/// Group `i`'s class was charged what its receiver counted on the wire, by
/// its family's header length: for IPv6 the fallback for a packet it could
/// not parse (IPv4's 66 bytes per segment) would charge 1.3 % less. The
/// class also carries iperf3's control connection and the handshakes (a
/// few KB).
fn assert_charged_as_on_the_wire(o: &Outcome, i: usize) {
    let c = class(&o.status, i);
    let ratio = c.bytes as f64 / o.wire[i] as f64;
    eprintln!(
        "class {i}: charged {} of {} wire bytes ({ratio:.4})",
        c.bytes, o.wire[i]
    );
    assert!(
        (0.997..1.01).contains(&ratio),
        "class {i} charged {} bytes for {} on the wire ({ratio:.4})",
        c.bytes,
        o.wire[i]
    );
}

fn egress_entries(shaper: &mut Shaper) -> usize {
    shaper.datapath().maps(Direction::Egress).cgroup_entries()
}

fn class(s: &netqos::NetStatus, i: usize) -> &netqos::NetClassStatus {
    // Class 0 is the default class; groups follow in order of creation.
    &s.classes[i + 1]
}

#[test]
fn busy_classes_get_their_guarantees() -> Result<()> {
    if !require_root("busy_classes_get_their_guarantees") {
        return Ok(());
    }
    let quotas = [100.0, 300.0, 600.0];
    let within = |rates: &[f64]| {
        rates
            .iter()
            .zip(quotas)
            .all(|(r, q)| *r >= 0.93 * q && *r <= 1.05 * q)
    };
    let o = run_retrying_if_off(
        &[tcp("100mbit"), tcp("300mbit"), tcp("600mbit")],
        false,
        4.0,
        within,
    )?;
    for (r, q) in o.rates.iter().zip(quotas) {
        assert!(
            *r >= 0.93 * q && *r <= 1.05 * q,
            "class with {q} mbit got {r:.1}"
        );
    }
    // Paced flows need neither marks nor drops.
    for i in 0..3 {
        assert_eq!(class(&o.status, i).drops, 0);
    }
    Ok(())
}

/// A light flow beside a bulk one in the same class counts by what it
/// uses: the class's share is split over about one flow, not two (each
/// flow weighed at every activity epoch by the part of its pacing rate it
/// used, `qos_common::policy::activity_weight`).
#[test]
fn a_light_flow_counts_by_what_it_uses() -> Result<()> {
    if !require_root("a_light_flow_counts_by_what_it_uses") {
        return Ok(());
    }
    const SECS: f64 = 4.0;
    let _one_at_a_time = TRAFFIC.lock().unwrap_or_else(|p| p.into_inner());
    let bed = EgressBed::new(1, 0)?;
    let tmp = tempfile::tempdir()?;
    let parent = CgroupDir::new("qos-test-")?;
    let dir = parent.child("g0")?;
    let cg = qos_core::Hierarchy::detect()?.resolve(&parent.child_name("g0"))?;
    let mut s = settings(bed.shaped_if(), false)?;
    s.capacity = common::scaled("1gbit")?;
    let mut shaper = Shaper::start(s, &testbeds::cgroup2_root()?)?;
    shaper.set(&cg, NetQuota::egress(common::scaled("200mbit")?, None, 0))?;
    // The class's open and active flows every control step while traffic
    // runs (the status after it would show the flows idle).
    let t0 = std::time::Instant::now();
    let (stop, sampler) = common::control_loop(shaper, move |shaper| {
        let st = shaper.status();
        let c = class(&st, 0);
        (t0.elapsed().as_secs_f64(), c.flows, c.active_flows)
    });
    let place = Placement {
        cgroup: Some(dir),
        netns: None,
    };
    let peer = Placement {
        cgroup: None,
        netns: Some(bed.peer.path()),
    };
    let traffic = (|| -> Result<()> {
        let mut flows = Vec::new();
        let light = common::scaled("2mbit")?.bits_per_sec();
        for (port, tcp_bps) in [(5321u16, None), (5322, Some(light))] {
            let server = Server::start(&peer, bed.peer_ip, port, tmp.path(), 0.1)?;
            let opts = ClientOpts {
                seconds: SECS,
                parallel: 1,
                udp_bps: None,
                bind: Some(bed.sender_ips[0].into()),
                tos: None,
                pacing_bps: None,
                tcp_bps,
                socket_buffer: None,
                interval: None,
            };
            let client = Client::start(&place, bed.peer_ip, port, &opts, tmp.path())?;
            flows.push((server, client));
        }
        for (server, client) in flows {
            client.finish(Duration::from_secs_f64(SECS + 20.0))?;
            server.finish(Duration::from_secs(20))?;
        }
        Ok(())
    })();
    stop.store(true, Ordering::Relaxed);
    let (shaper, samples) = sampler.join().expect("control thread");
    shaper.stop();
    traffic?;
    // From 1.5 s in (the light flow's first epoch counts it in full, and
    // the most of the last three epochs is what counts) to a second before
    // the end.
    let steady: Vec<(u64, f64)> = samples
        .iter()
        .filter(|(t, ..)| *t >= 1.5 && *t <= SECS - 1.0)
        .map(|&(_, open, active)| (open, active))
        .collect();
    eprintln!("open / active flows: {steady:?}");
    assert!(steady.len() >= 50, "{} samples", steady.len());
    // The flows are in the class (with iperf3's control connections)...
    assert!(steady.iter().any(|&(open, _)| open >= 2), "{steady:?}");
    // ...and the share is split over about one (two by a count of the
    // flows acknowledged in each epoch: the light one writes a segment
    // every 6 ms at full scale).
    let worst = steady.iter().map(|&(_, a)| a).fold(0.0, f64::max);
    assert!(worst < 1.5, "active flows up to {worst:.2}: {steady:?}");
    Ok(())
}

#[test]
fn spare_capacity_is_shared_in_proportion_to_guarantees() -> Result<()> {
    if !require_root("spare_capacity_is_shared_in_proportion_to_guarantees") {
        return Ok(());
    }
    // 400 mbit spare shared 1:3 -> 200 and 800.
    let shares_ok = |r: &[f64]| {
        (2.4..=3.9).contains(&(r[1] / r[0])) && r[0] > 180.0 && r.iter().sum::<f64>() > 900.0
    };
    let o = run_retrying_if_off(&[tcp("50mbit"), tcp("150mbit")], false, 4.0, shares_ok)?;
    // Precision is the fairness script's job; this checks the mechanism
    // with tolerances a loaded 2-CPU CI machine keeps.
    let ratio = o.rates[1] / o.rates[0];
    assert!((2.4..=3.9).contains(&ratio), "ratio {ratio:.2} (want 3)");
    assert!(
        o.rates[0] > 180.0,
        "small class got {:.1} of 250",
        o.rates[0]
    );
    assert!(
        o.rates.iter().sum::<f64>() > 900.0,
        "capacity unused: {:?}",
        o.rates
    );
    Ok(())
}

#[test]
fn higher_priority_borrows_first_up_to_its_ceiling() -> Result<()> {
    if !require_root("higher_priority_borrows_first_up_to_its_ceiling") {
        return Ok(());
    }
    let hi = Group {
        ceil: Some("600mbit"),
        ..tcp("100mbit")
    };
    let lo = Group {
        priority: 3,
        ..tcp("100mbit")
    };
    let shares_ok = |r: &[f64]| r[0] > 520.0 && r[0] < 640.0 && r[1] > 340.0;
    let o = run_retrying_if_off(&[hi, lo], false, 4.0, shares_ok)?;
    assert!(
        o.rates[0] > 520.0 && o.rates[0] < 640.0,
        "high priority got {:.1} (ceiling 600)",
        o.rates[0]
    );
    assert!(
        o.rates[1] > 340.0,
        "low priority got {:.1} (should get the 400 left)",
        o.rates[1]
    );
    Ok(())
}

#[test]
fn container_traffic_is_classified_by_its_cgroup() -> Result<()> {
    if !require_root("container_traffic_is_classified_by_its_cgroup") {
        return Ok(());
    }
    containers_are_classified(false)
}

/// Forwarded IPv6: the tagger finds the containers' route to the shaped
/// interface with an IPv6 FIB lookup.
#[test]
fn container_ipv6_traffic_is_classified_by_its_cgroup() -> Result<()> {
    const NAME: &str = "container_ipv6_traffic_is_classified_by_its_cgroup";
    if !require_root(NAME) || !testbeds::net::require_ipv6(NAME) {
        return Ok(());
    }
    containers_are_classified(true)
}

fn containers_are_classified(ipv6: bool) -> Result<()> {
    let within = |r: &[f64]| (0.93 * 200.0..=1.07 * 200.0).contains(&r[0]) && r[1] >= 0.93 * 800.0;
    let groups = [tcp("200mbit"), tcp("800mbit")];
    let o = run_family_retrying_if_off(&groups, true, 4.0, ipv6, within)?;
    assert!(
        o.rates[0] >= 0.93 * 200.0 && o.rates[0] <= 1.07 * 200.0,
        "{:?}",
        o.rates
    );
    assert!(o.rates[1] >= 0.93 * 800.0, "{:?}", o.rates);
    for i in 0..2 {
        // Charged from the tag on the shaped interface.
        assert_charged_as_on_the_wire(&o, i);
    }
    assert!(!o.status.tagged_interfaces.is_empty());
    Ok(())
}

/// IPv6 traffic is classified, paced and charged as IPv4 is (its header
/// parsed at another offset, its wire length from its own header size).
#[test]
fn ipv6_classes_get_their_guarantees() -> Result<()> {
    if !require_root("ipv6_classes_get_their_guarantees")
        || !testbeds::net::require_ipv6("ipv6_classes_get_their_guarantees")
    {
        return Ok(());
    }
    let quotas = [200.0, 800.0];
    let within = |rates: &[f64]| {
        rates
            .iter()
            .zip(quotas)
            .all(|(r, q)| *r >= 0.93 * q && *r <= 1.05 * q)
    };
    let groups = [tcp("200mbit"), tcp("800mbit")];
    let o = run_family_retrying_if_off(&groups, false, 4.0, true, within)?;
    for (r, q) in o.rates.iter().zip(quotas) {
        assert!(
            *r >= 0.93 * q && *r <= 1.05 * q,
            "IPv6 class with {q} mbit got {r:.1}: {:?}",
            o.rates
        );
    }
    for i in 0..2 {
        let c = class(&o.status, i);
        assert_eq!(c.drops, 0, "class {i}: paced IPv6 flow dropped");
        assert_charged_as_on_the_wire(&o, i);
    }
    Ok(())
}

/// An ECN-capable IPv6 sender (traffic class ECT(0)) that ignores marks is
/// CE-marked in its IPv6 header and held to its share.
#[test]
fn ecn_capable_ipv6_traffic_is_marked() -> Result<()> {
    if !require_root("ecn_capable_ipv6_traffic_is_marked")
        || !testbeds::net::require_ipv6("ecn_capable_ipv6_traffic_is_marked")
    {
        return Ok(());
    }
    ect_flood_is_marked_and_held(true)
}

#[test]
fn a_non_responsive_sender_is_dropped_down_to_its_share() -> Result<()> {
    if !require_root("a_non_responsive_sender_is_dropped_down_to_its_share") {
        return Ok(());
    }
    let flood = Group {
        udp_bps: Some(1_000_000_000),
        ..tcp("300mbit")
    };
    let o = run(&[flood, tcp("700mbit")], false, 4.0)?;
    assert!(o.rates[0] < 330.0, "udp got {:.1}", o.rates[0]);
    assert!(o.rates[1] >= 0.93 * 700.0, "tcp got {:.1}", o.rates[1]);
    let udp = class(&o.status, 0);
    assert!(udp.drops > 0);
    assert_eq!(udp.ce_marks, 0, "non-ECT packets cannot be marked");
    Ok(())
}

#[test]
fn ecn_capable_traffic_is_marked_before_it_is_dropped() -> Result<()> {
    if !require_root("ecn_capable_traffic_is_marked_before_it_is_dropped") {
        return Ok(());
    }
    ect_flood_is_marked_and_held(false)
}

/// An ECT(0) sender that ignores the marks, over IPv4 or (`ipv6`) IPv6: it
/// is marked first, and only the excess beyond the drop threshold is
/// dropped.
fn ect_flood_is_marked_and_held(ipv6: bool) -> Result<()> {
    let ect = Group {
        udp_bps: Some(600_000_000),
        tos: Some(2),
        ..tcp("300mbit")
    };
    let o = run_family(&[ect, tcp("700mbit")], false, 3.0, ipv6)?;
    let c = class(&o.status, 0);
    let family = if ipv6 { "IPv6" } else { "IPv4" };
    assert!(c.ce_marks > 0, "no CE marks on {family} packets");
    assert!(
        o.rates[0] < 330.0,
        "{family} ect flood got {:.1}",
        o.rates[0]
    );
    Ok(())
}

#[test]
fn a_download_is_not_held_by_its_cgroups_egress_quota() -> Result<()> {
    if !require_root("a_download_is_not_held_by_its_cgroups_egress_quota") {
        return Ok(());
    }
    let _one_at_a_time = TRAFFIC.lock().unwrap_or_else(|p| p.into_inner());
    // A cgroup with a small egress quota receives: the ACKs it sends count
    // against that quota but are never dropped, since a dropped ACK slows
    // the download, not the cgroup's sending.
    let bed = EgressBed::new(1, 0)?;
    let tmp = tempfile::tempdir()?;
    let parent = CgroupDir::new("qos-test-")?;
    // The capacity is the quota: the ACKs alone exceed it, so they run the
    // class past its drop threshold.
    let egress_quota = common::scaled("1mbit")?;
    let (shaper, dir, _) = shaper_with_one_class(&bed, false, &parent, "down", egress_quota)?;
    let receiver = Placement {
        cgroup: Some(dir),
        netns: None,
    };
    let peer = Placement {
        cgroup: None,
        netns: Some(bed.peer.path()),
    };
    let (status, mbit) = common::one_flow_under_control(
        shaper,
        &receiver,
        bed.sender_ips[0],
        &peer,
        None,
        5311,
        tmp.path(),
    )?;
    let quota = egress_quota.bits_per_sec() as f64 / 1e6;
    let c = class(&status, 0);
    eprintln!(
        "download {mbit:.1} Mbit/s, egress quota {quota:.1}; sent {} packets, {} bytes over \
         the quota, {} drops",
        c.packets, c.over_bytes, c.drops
    );
    assert!(
        c.over_bytes > 0,
        "the download's ACKs were not charged: {c:?}"
    );
    // What this cgroup receives with payload is iperf3's control connection
    // (a few messages, which may be dropped); dropped ACKs would be counted in
    // thousands.
    assert!(c.drops <= 10, "the download's ACKs were dropped: {c:?}");
    // A download held by dropped ACKs gets a few dozen times the quota.
    assert!(
        mbit > 60.0 * quota,
        "download {mbit:.1} Mbit/s with an egress quota of {quota:.1}"
    );
    Ok(())
}

/// A shaper on `bed` whose egress capacity is `quota`, and one class with
/// that quota: cgroup `name` under `parent`. Returns the shaper, the
/// cgroup's directory and its name as the status reports it.
fn shaper_with_one_class(
    bed: &EgressBed,
    containers: bool,
    parent: &CgroupDir,
    name: &str,
    quota: qos_core::Rate,
) -> Result<(Shaper, std::path::PathBuf, String)> {
    let mut s = settings(bed.shaped_if(), containers)?;
    s.capacity = quota;
    let mut shaper = Shaper::start(s, &testbeds::cgroup2_root()?)?;
    let dir = parent.child(name)?;
    let cg = qos_core::Hierarchy::detect()?.resolve(&parent.child_name(name))?;
    shaper.set(&cg, NetQuota::egress(quota, None, 0))?;
    if containers {
        shaper.scan_interfaces();
    }
    Ok((shaper, dir, cg.name))
}

/// Environment of the raw sender [`raw_tcp_segments_sender`]: `SRC DST
/// COUNT`.
const RAW_SENDER_ENV: &str = "QOS_TEST_RAW_SEGMENTS";
const RAW_SEGMENTS: u64 = 20_000;

#[test]
fn segments_without_payload_from_a_raw_socket_are_dropped_past_the_quota() -> Result<()> {
    if !require_root("segments_without_payload_from_a_raw_socket_are_dropped_past_the_quota") {
        return Ok(());
    }
    let _one_at_a_time = TRAFFIC.lock().unwrap_or_else(|p| p.into_inner());
    // A TCP socket's segments without payload are never dropped (they are
    // the ACKs of a download); the same segments forged on a raw socket must
    // not get past the quota that way, from the host or from a container
    // (where the tagger tells the shaper what kind of socket sent them).
    for containers in [false, true] {
        let (c, discarded) = raw_segments_through_the_shaper(containers)?;
        eprintln!(
            "raw segments (containers: {containers}): {RAW_SEGMENTS} sent, {discarded} discarded \
             by the container's own stack; the class passed {}, dropped {}, {} bytes over",
            c.packets, c.drops, c.over_bytes
        );
        // Every one that left the sender was charged to its cgroup. A
        // container's stack may discard a few of the burst itself before
        // they reach the shaped interface (the emulated VM: 8-745 of 20 000
        // went missing without it, 97 in a try whose `OutDiscards` were 97).
        assert!(c.packets + c.drops + discarded >= RAW_SEGMENTS, "{c:?}");
        // At 54 wire bytes each, the burst is about nine seconds of the
        // quota: most of it lies past the drop threshold.
        assert!(
            c.drops >= RAW_SEGMENTS / 2,
            "forged segments without payload passed the quota (containers: {containers}): {c:?}"
        );
    }
    Ok(())
}

/// `Ip: OutDiscards` of network namespace `ns` (`/proc/net/snmp`): packets
/// its own stack discarded on the way out.
fn ip_out_discards(ns: &testbeds::Netns) -> Result<u64> {
    let snmp = ns.exec("cat", &["/proc/net/snmp"])?;
    let mut ip = snmp.lines().filter(|l| l.starts_with("Ip:"));
    let (Some(names), Some(values)) = (ip.next(), ip.next()) else {
        anyhow::bail!("no Ip lines in {}'s /proc/net/snmp", ns.name());
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "OutDiscards")
        .and_then(|(_, v)| v.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no Ip OutDiscards in {}'s /proc/net/snmp", ns.name()))
}

/// Sends [`RAW_SEGMENTS`] forged segments from a cgroup (in a container
/// namespace if `containers`) with a small egress quota; returns its class
/// and the segments a container sender's own stack discarded (0 from the
/// host: there the shaper's drops are what its stack reports discarded).
fn raw_segments_through_the_shaper(containers: bool) -> Result<(netqos::NetClassStatus, u64)> {
    let bed = EgressBed::new(1, usize::from(containers))?;
    let parent = CgroupDir::new("qos-test-")?;
    let quota = common::scaled("1mbit")?;
    let (mut shaper, dir, class_name) =
        shaper_with_one_class(&bed, containers, &parent, "raw", quota)?;
    let (src, netns) = if containers {
        (bed.containers[0].ip, Some(bed.containers[0].ns.path()))
    } else {
        (bed.sender_ips[0], None)
    };
    // This test binary again, running only the sender, in the cgroup.
    let mut sender = std::process::Command::new(std::env::current_exe()?);
    sender
        .args(["--exact", "raw_tcp_segments_sender", "--ignored"])
        .env(
            RAW_SENDER_ENV,
            format!("{src} {} {RAW_SEGMENTS}", bed.peer_ip),
        )
        .stdout(std::process::Stdio::null());
    let place = Placement {
        cgroup: Some(dir),
        netns,
    };
    let container_ns = containers.then(|| &bed.containers[0].ns);
    let discards_before = container_ns.map(ip_out_discards).transpose()?;
    let status = testbeds::spawn(&place, &mut sender)?.wait();
    let discarded = match (container_ns, discards_before) {
        (Some(ns), Some(before)) => ip_out_discards(ns)?.saturating_sub(before),
        _ => 0,
    };
    // A container's segments may still be on their way to the shaped
    // interface when the sender exits: control steps read the counters into
    // the status until every segment that left is counted, or for a second.
    let mut stepped = Ok(());
    let mut class = None;
    testbeds::wait_for(std::time::Duration::from_secs(1), || {
        stepped = shaper.tick();
        class = shaper
            .status()
            .classes
            .into_iter()
            .find(|c| c.cgroup == class_name);
        stepped.is_err()
            || class
                .as_ref()
                .is_some_and(|c| c.packets + c.drops + discarded >= RAW_SEGMENTS)
    });
    shaper.stop();
    let status = status?;
    anyhow::ensure!(status.success(), "the raw sender failed: {status}");
    stepped?;
    let class = class.ok_or_else(|| anyhow::anyhow!("no class for {class_name}"))?;
    Ok((class, discarded))
}

/// Not a test of its own: run by
/// `segments_without_payload_from_a_raw_socket_are_dropped_past_the_quota`
/// in the shaped cgroup, it sends TCP segments without payload (bare ACKs,
/// no checksum: the peer discards them) from a raw socket.
#[test]
#[ignore = "run by segments_without_payload_from_a_raw_socket_are_dropped_past_the_quota"]
fn raw_tcp_segments_sender() -> Result<()> {
    use std::{
        net::{Ipv4Addr, SocketAddrV4},
        os::fd::AsRawFd,
    };

    use nix::sys::socket::{
        AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrIn, bind, sendto, socket,
    };
    let Ok(spec) = std::env::var(RAW_SENDER_ENV) else {
        return Ok(());
    };
    let words: Vec<&str> = spec.split_whitespace().collect();
    let [src, dst, count] = words[..] else {
        anyhow::bail!("{RAW_SENDER_ENV}={spec:?}: want SRC DST COUNT");
    };
    let (src, dst): (Ipv4Addr, Ipv4Addr) = (src.parse()?, dst.parse()?);
    let count: u64 = count.parse()?;
    let fd = socket(
        AddressFamily::Inet,
        SockType::Raw,
        SockFlag::empty(),
        SockProtocol::Tcp,
    )?;
    bind(fd.as_raw_fd(), &SockaddrIn::from(SocketAddrV4::new(src, 0)))?;
    let to = SockaddrIn::from(SocketAddrV4::new(dst, 0));
    // Source port, destination port, sequence, acknowledgment, data offset
    // 5 words, ACK flag, window; checksum and urgent pointer zero.
    let mut segment = [0u8; 20];
    segment[0..2].copy_from_slice(&40_000u16.to_be_bytes());
    segment[2..4].copy_from_slice(&5_999u16.to_be_bytes());
    segment[4..8].copy_from_slice(&1u32.to_be_bytes());
    segment[8..12].copy_from_slice(&1u32.to_be_bytes());
    segment[12] = 5 << 4;
    segment[13] = 0x10;
    segment[14..16].copy_from_slice(&1024u16.to_be_bytes());
    for _ in 0..count {
        match sendto(fd.as_raw_fd(), &segment, &to, MsgFlags::empty()) {
            // A drop at the qdisc layer may be reported; it is what is
            // being tested, not a failure to send.
            Ok(_) | Err(nix::errno::Errno::ENOBUFS) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[test]
fn stopping_removes_every_program_and_mapping() -> Result<()> {
    if !require_root("stopping_removes_every_program_and_mapping") {
        return Ok(());
    }
    let bed = EgressBed::new(1, 0)?;
    let parent = CgroupDir::new("qos-test-")?;
    let h = qos_core::Hierarchy::detect()?;
    let mut shaper = Shaper::start(
        settings(bed.shaped_if(), false)?,
        &testbeds::cgroup2_root()?,
    )?;
    parent.child("a")?;
    let cg = h.resolve(&parent.child_name("a"))?;
    shaper.set(&cg, NetQuota::egress("10mbit".parse()?, None, 0))?;
    assert_eq!(egress_entries(&mut shaper), 1);
    assert_eq!(
        common::tc_programs(bed.shaped_if(), aya::programs::TcAttachType::Egress)?,
        1,
        "egress program not attached"
    );
    assert!(shaper.remove(&cg.name)?);
    assert_eq!(egress_entries(&mut shaper), 0, "cgroup mapping left behind");
    assert!(
        !shaper.remove(&cg.name)?,
        "second removal must report nothing to remove"
    );
    let ids: Vec<u32> = shaper
        .datapath()
        .program_ids()
        .into_iter()
        .map(|(_, id)| id)
        .collect();
    assert_eq!(ids.len(), 5, "every program of the object is loaded");
    shaper.stop();
    assert_eq!(
        common::tc_programs_left(
            bed.shaped_if(),
            aya::programs::TcAttachType::Egress,
            Duration::from_secs(5)
        )?,
        0,
        "egress program still attached 5 s after stop"
    );
    let left = common::still_loaded(&ids, Duration::from_secs(5));
    assert!(
        left.is_empty(),
        "programs {left:?} still loaded 5 s after stop (pacer still on the cgroup root?)"
    );
    Ok(())
}

#[test]
fn bad_settings_and_quotas_are_refused_without_side_effects() -> Result<()> {
    if !require_root("bad_settings_and_quotas_are_refused_without_side_effects") {
        return Ok(());
    }
    let root = testbeds::cgroup2_root()?;
    let e =
        Shaper::start(settings("qos-no-such-if", false)?, &root).expect_err("missing interface");
    assert!(
        e.to_string().contains("'qos-no-such-if' does not exist"),
        "{e}"
    );
    let bed = EgressBed::new(1, 0)?;
    let mut shaper = Shaper::start(settings(bed.shaped_if(), false)?, &root)?;
    let parent = CgroupDir::new("qos-test-")?;
    parent.child("a")?;
    let cg = qos_core::Hierarchy::detect()?.resolve(&parent.child_name("a"))?;
    let q = |rate: &str, ceil: Option<&str>, priority| -> Result<NetQuota> {
        Ok(NetQuota::egress(
            rate.parse()?,
            ceil.map(str::parse).transpose()?,
            priority,
        ))
    };
    for (quota, needle) in [
        (q("2gbit", None, 0)?, "exceeds the egress capacity"),
        (
            q("100mbit", Some("50mbit"), 0)?,
            "below the guaranteed egress rate",
        ),
        (q("100mbit", Some("2gbit"), 0)?, "ceil 2gbit exceeds"),
        (q("100mbit", None, 8)?, "priority 8 is out of range"),
    ] {
        let e = shaper.set(&cg, quota).expect_err("refused").to_string();
        assert!(e.contains(needle), "{e}");
    }
    shaper.set(&cg, q("900mbit", None, 0)?)?;
    parent.child("b")?;
    let cg2 = qos_core::Hierarchy::detect()?.resolve(&parent.child_name("b"))?;
    let e = shaper
        .set(&cg2, q("200mbit", None, 0)?)
        .expect_err("admission")
        .to_string();
    assert!(
        e.contains("would total 1100mbit") && e.contains("capacity is 1gbit"),
        "{e}"
    );
    assert_eq!(
        egress_entries(&mut shaper),
        1,
        "refused quota left a mapping"
    );
    assert_eq!(shaper.status().classes.len(), 2);
    shaper.stop();
    Ok(())
}
