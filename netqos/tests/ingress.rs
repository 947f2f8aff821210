//! The ingress datapath for real: senders in a peer namespace, receivers in
//! cgroups on the host or in container namespaces, shares measured at the
//! receivers. Needs root (under CI a missing privilege fails the test).
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "test code: a failure panics"
)]

mod common;

use std::{sync::atomic::Ordering, time::Duration};

use common::control_loop;

use anyhow::{Context, Result};
use netqos::{
    ContainerInterfaces, Direction, NetClassStatus, NetQuota, NetStatus, Shaper, ShaperSettings,
    policy::Tuning,
};
use testbeds::{
    CgroupDir, Placement, Sysctl,
    iperf::{Client, ClientOpts, Server, wire_bytes, wire_bytes_of},
    net::{EgressBed, HostVeth},
    require_root,
};

/// One receiver group of a test.
struct Group {
    quota: &'static str,
    ceil: Option<&'static str>,
    priority: u32,
    /// The sender negotiates ECN.
    ecn: bool,
    /// Parallel TCP flows into the group.
    flows: u32,
    /// One UDP flow instead, offered at the link's rate.
    udp: bool,
}

const fn tcp(quota: &'static str) -> Group {
    Group {
        quota,
        ceil: None,
        priority: 0,
        ecn: true,
        flows: 1,
        udp: false,
    }
}

/// What a control step saw.
struct Step {
    /// Seconds since the senders started.
    t: f64,
    /// Each group's open and active flows (`NetClassStatus::flows`,
    /// `NetClassStatus::active_flows`).
    flows: Vec<(u64, f64)>,
    /// Each group's window round trip (`NetClassStatus::window_rtt_us`).
    window_rtts: Vec<u64>,
    /// Each group held at its allocation (`NetClassStatus::held_at_alloc`).
    held_at_alloc: Vec<bool>,
    /// Each group's packets dropped and received so far
    /// (`NetClassStatus::drops`, `NetClassStatus::packets`).
    drops_packets: Vec<(u64, u64)>,
}

struct Outcome {
    /// Wire Mbit/s per group, after a 1 s warm-up.
    rates: Vec<f64>,
    /// Wire bytes each group's receiver took in over the whole run.
    wire: Vec<u64>,
    status: NetStatus,
    /// Every control step's view of the groups.
    steps: Vec<Step>,
    /// Each group's receiver intervals (start s, end s, bytes; iperf3's).
    intervals: Vec<Vec<(f64, f64, u64)>>,
    /// Packets the other ingress shaper counted (`Link::other_shapers`).
    others_received: u64,
}

fn settings(iface: &str) -> Result<ShaperSettings> {
    Ok(ShaperSettings {
        interface: iface.to_owned(),
        capacity: "10gbit".parse()?,
        default_rate: None,
        ingress_capacity: Some(CAPACITY.parse()?),
        ingress_default_rate: None,
        ingress_clamp_ecn: false,
        ingress_ack_pacing: true,
        ingress_upstream_buffer: netqos::DEFAULT_UPSTREAM_BUFFER,
        default_priority: 7,
        container_interfaces: ContainerInterfaces::Mode("none".into()),
        replace_bbr: true,
        tuning: Tuning::default(),
        pin_root: None,
        max_quotas: netqos::MAX_QUOTAS,
    })
}

/// The link ingress traffic arrives over, and its upstream buffer.
const LINK: &str = "1gbit";
const LINK_BUFFER: u64 = netqos::DEFAULT_UPSTREAM_BUFFER;
/// Configured ingress capacity: a little below the link, so that the
/// receiver, not the upstream buffer, decides who gets what.
const CAPACITY: &str = "950mbit";

/// One shaper at a time (one test's shaper, or the three of
/// `other_shapers_leave_a_received_flow_its_window_clamp`): traffic tests
/// share two CPUs.
static SHAPERS: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_shaper_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    SHAPERS.lock().unwrap_or_else(|p| p.into_inner())
}

/// A shaper running its control loop on a thread of its own; stopped when
/// dropped (a failed test leaves nothing attached for the next one).
struct Ticking {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// None once joined.
    thread: Option<std::thread::JoinHandle<(Shaper, Vec<()>)>>,
}

impl Ticking {
    fn new(shaper: Shaper) -> Self {
        let (stop, thread) = control_loop(shaper, |_| ());
        Self {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the shaper; its status at the end.
    fn finish(mut self) -> NetStatus {
        let shaper = self.join().expect("control thread");
        let status = shaper.status();
        shaper.stop();
        status
    }

    fn join(&mut self) -> Option<Shaper> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take()?.join().ok().map(|(shaper, _)| shaper)
    }
}

impl Drop for Ticking {
    fn drop(&mut self) {
        if let Some(shaper) = self.join() {
            shaper.stop();
        }
    }
}

/// `ack_pacing`: `[net] ingress_ack_pacing` (it takes effect only where the
/// kernel has fq).
fn run(groups: &[Group], containers: bool, ack_pacing: bool, secs: f64) -> Result<Outcome> {
    run_over(&BASE_LINK, groups, containers, ack_pacing, secs)
}

/// The link of [`run`]: IPv4, no delay.
const BASE_LINK: Link = Link {
    rate: LINK,
    capacity: CAPACITY,
    delay_ms: 0,
    delay_later: None,
    ipv6: false,
    other_shapers: false,
    clamp_ecn: false,
    buffer: LINK_BUFFER,
    told_buffer: LINK_BUFFER,
};

/// What the senders reach the receivers over (nominal, unscaled rates).
struct Link {
    rate: &'static str,
    /// Configured ingress capacity.
    capacity: &'static str,
    /// netem on the senders' link; 0: none.
    delay_ms: u32,
    /// (s, ms): this long after the senders start, the link's delay
    /// becomes that (needs `delay_ms` > 0: the netem to change).
    delay_later: Option<(f64, u32)>,
    /// Flows over IPv6 (to containers: forwarded IPv6).
    ipv6: bool,
    /// Two more shapers run meanwhile on links of their own, started
    /// before and after this run's: one shaping ingress, one egress only.
    /// Their sockops programs see this run's sockets too.
    other_shapers: bool,
    /// The shaper holds ECN flows by their windows too
    /// (`ingress_clamp_ecn`; the daemon's default, off here so that the
    /// other tests see CE marks).
    clamp_ecn: bool,
    /// Bytes of the link's buffer (its tbf's limit), and what the shaper
    /// is told it is (`ingress_upstream_buffer`).
    buffer: u64,
    told_buffer: u64,
}

/// [`run`] over `link`.
fn run_over(
    link: &Link,
    groups: &[Group],
    containers: bool,
    ack_pacing: bool,
    secs: f64,
) -> Result<Outcome> {
    let _one_shaper = one_shaper_at_a_time();
    let n = groups.len();
    let bed = EgressBed::new(n, if containers { n } else { 0 })?;
    let _cubic_allowed = bed.peer_senders()?;
    bed.peer_link_with_delay(
        &common::scaled(link.rate)?.to_string(),
        &link.buffer.to_string(),
        link.delay_ms,
    )?;
    // Host receivers accept ECN when the sender asks (kernel default 2).
    let _ecn = Sysctl::set("net.ipv4.tcp_ecn", "2")?;
    let tmp = tempfile::tempdir()?;
    let parent = CgroupDir::new("qos-test-")?;
    let h = qos_core::Hierarchy::detect()?;
    let mut s = settings(bed.shaped_if())?;
    s.ingress_capacity = Some(common::scaled(link.capacity)?);
    s.ingress_ack_pacing = ack_pacing;
    s.ingress_clamp_ecn = link.clamp_ecn;
    s.ingress_upstream_buffer = link.told_buffer;
    if containers {
        // The tagger on this bed's container veths only (other tests' beds
        // may exist at the same time): it holds the containers' ACKs.
        s.container_interfaces = ContainerInterfaces::Patterns(
            bed.containers
                .iter()
                .map(|c| c.veth.host().to_owned())
                .collect(),
        );
    }
    // Attach order decides whose sockops program runs first.
    let other_beds = if link.other_shapers {
        Some((EgressBed::new(1, 0)?, EgressBed::new(1, 0)?))
    } else {
        None
    };
    let before = other_beds
        .as_ref()
        .map(|(b, _)| -> Result<Ticking> {
            let s = settings(b.shaped_if())?;
            Ok(Ticking::new(Shaper::start(s, &testbeds::cgroup2_root()?)?))
        })
        .transpose()?;
    let mut shaper = Shaper::start(s, &testbeds::cgroup2_root()?)?;
    let after = other_beds
        .as_ref()
        .map(|(_, b)| -> Result<Ticking> {
            let egress_only = ShaperSettings {
                ingress_capacity: None,
                ..settings(b.shaped_if())?
            };
            Ok(Ticking::new(Shaper::start(
                egress_only,
                &testbeds::cgroup2_root()?,
            )?))
        })
        .transpose()?;
    let mut pairs = Vec::new();
    for (i, g) in groups.iter().enumerate() {
        let name = format!("g{i}");
        let dir = parent.child(&name)?;
        let cg = h.resolve(&parent.child_name(&name))?;
        let quota = NetQuota::ingress(
            common::scaled(g.quota)?,
            g.ceil.map(common::scaled).transpose()?,
            g.priority,
        );
        shaper.set(&cg, quota)?;
        let (ip, netns) = if containers {
            (
                bed.containers[i].addr(link.ipv6)?,
                Some(bed.containers[i].ns.path()),
            )
        } else {
            (bed.sender_addr(i, link.ipv6)?, None)
        };
        bed.sender_ecn(ip, g.ecn)?;
        let receiver = Placement {
            cgroup: Some(dir),
            netns,
        };
        let port = 5401 + i as u16;
        let server = Server::start(&receiver, ip, port, tmp.path(), 0.1)?;
        pairs.push((server, ip, port));
    }
    let t0 = std::time::Instant::now();
    let (stop, handle) = control_loop(shaper, move |shaper| {
        let st = shaper.status();
        let flows = (0..n)
            .map(|i| (class(&st, i).flows, class(&st, i).active_flows))
            .collect();
        let window_rtts = (0..n).map(|i| class(&st, i).window_rtt_us).collect();
        let held_at_alloc = (0..n).map(|i| class(&st, i).held_at_alloc).collect();
        let drops_packets = (0..n)
            .map(|i| (class(&st, i).drops, class(&st, i).packets))
            .collect();
        Step {
            t: t0.elapsed().as_secs_f64(),
            flows,
            window_rtts,
            held_at_alloc,
            drops_packets,
        }
    });
    let sender = Placement {
        cgroup: None,
        netns: Some(bed.peer.path()),
    };
    let mut running = Vec::new();
    for ((server, ip, port), g) in pairs.into_iter().zip(groups) {
        let opts = ClientOpts {
            seconds: secs,
            parallel: g.flows,
            udp_bps: g
                .udp
                .then(|| common::scaled(link.rate).map(|r| r.bits_per_sec()))
                .transpose()?,
            bind: None,
            tos: None,
            pacing_bps: None,
            tcp_bps: None,
            socket_buffer: None,
            interval: None,
        };
        running.push((server, Client::start(&sender, ip, port, &opts, tmp.path())?));
    }
    if let Some((after, delay_ms)) = link.delay_later {
        // A step of the scenario, not a wait for a condition.
        std::thread::sleep(Duration::from_secs_f64(after).saturating_sub(t0.elapsed()));
        let (delay, limit) = (format!("{delay_ms}ms"), (delay_ms * 1000).to_string());
        let dev = bed.shaped.peer();
        bed.peer.exec(
            "tc",
            &[
                "qdisc", "change", "dev", dev, "root", "handle", "1:", "netem", "delay", &delay,
                "limit", &limit,
            ],
        )?;
        eprintln!(
            "link delay {delay} from {:.2} s",
            t0.elapsed().as_secs_f64()
        );
    }
    let mut rates = Vec::new();
    let mut wire = Vec::new();
    let mut intervals = Vec::new();
    for ((server, client), g) in running.into_iter().zip(groups) {
        client.finish(Duration::from_secs_f64(secs + 20.0))?;
        let r = server.finish(Duration::from_secs(20))?;
        let (bytes, t) = r
            .intervals
            .iter()
            .filter(|i| i.0 >= 1.0 && i.1 - i.0 >= 0.05)
            .fold((0u64, 0.0), |(b, t), i| (b + i.2, t + i.1 - i.0));
        // In nominal (unscaled) Mbit/s, what the assertions are written in.
        let wire_of = |b| wire_bytes_of(b, g.udp, link.ipv6);
        rates.push(wire_of(bytes) as f64 * 8.0 / t / 1e6 / common::rate_scale());
        let on_wire = wire_of(r.bytes);
        eprintln!("receiver bytes {} wire {on_wire}", r.bytes);
        wire.push(on_wire);
        intervals.push(r.intervals);
    }
    stop.store(true, Ordering::Relaxed);
    let (shaper, steps) = handle.join().expect("control thread");
    let status = shaper.status();
    shaper.stop();
    // What the other ingress shaper took for its own interface's.
    // What the other shapers took for packets of their own interfaces.
    let others_received = [before, after]
        .into_iter()
        .flatten()
        .filter_map(|other| other.finish().ingress)
        .flat_map(|i| i.classes)
        .map(|c| c.packets)
        .sum();
    eprintln!("rates (mbit): {rates:?}");
    for c in &ingress(&status).classes {
        eprintln!(
            "  {} alloc {} rate {} own {} packets {} bytes {} ce {} drops {} clamps {} initial windows {} flows {} over {}",
            c.cgroup,
            c.alloc_bps,
            c.rate_bps,
            c.own_tokens,
            c.packets,
            c.bytes,
            c.ce_marks,
            c.drops,
            c.window_clamps,
            c.initial_windows,
            c.flows,
            c.over_bytes,
        );
    }
    Ok(Outcome {
        rates,
        wire,
        status,
        steps,
        intervals,
        others_received,
    })
}

/// [`run`], up to [`SHARE_TRIES`] times while the shares miss `shares_ok`:
/// CE marks (the tests that check them turn window clamps of ECN flows
/// off) hold shares that swing from run to run, and a slow spell of the host lets them miss bounds that hold otherwise (a CI
/// run of 2026-12-03 moved only 855 and then 525 of the 1000 Mbit/s, every
/// receiver held by the CPU rather than its class). Every try is printed;
/// the last must pass. The mechanism checks (marks, clamps, drops) are
/// asserted on the returned outcome.
fn run_retrying_if_off(
    groups: &[Group],
    containers: bool,
    ack_pacing: bool,
    secs: f64,
    shares_ok: impl Fn(&[f64]) -> bool,
) -> Result<Outcome> {
    run_over_retrying_if_off(&BASE_LINK, groups, containers, ack_pacing, secs, shares_ok)
}

/// [`run_retrying_if_off`] over `link`.
fn run_over_retrying_if_off(
    link: &Link,
    groups: &[Group],
    containers: bool,
    ack_pacing: bool,
    secs: f64,
    shares_ok: impl Fn(&[f64]) -> bool,
) -> Result<Outcome> {
    common::retry_while_shares_off(
        SHARE_TRIES,
        || run_over(link, groups, containers, ack_pacing, secs),
        |o| &o.rates,
        shares_ok,
    )
}

const SHARE_TRIES: u32 = 3;

/// Upper bound of group `i`'s rate: `hi` × its quota plus what the others
/// left of their guarantees, which flows to the busy groups by design (a
/// slow host leaves a large class short of its guarantee, and its share
/// goes to the small one).
fn upper_bound(rates: &[f64], quotas: &[f64], i: usize, hi: f64) -> f64 {
    let unused: f64 = rates
        .iter()
        .zip(quotas)
        .enumerate()
        .filter(|(j, _)| *j != i)
        .map(|(_, (r, q))| (q - r).max(0.0))
        .sum();
    hi * quotas[i] + unused
}

/// Whether every group got at least `lo` × its quota and at most
/// [`upper_bound`] with `hi`.
fn shares_within(rates: &[f64], quotas: &[f64], lo: f64, hi: f64) -> bool {
    rates
        .iter()
        .zip(quotas)
        .enumerate()
        .all(|(i, (r, q))| *r >= lo * q && *r <= upper_bound(rates, quotas, i, hi))
}

/// [`shares_within`], naming the first group out of bounds.
fn assert_shares_within(rates: &[f64], quotas: &[f64], lo: f64, hi: f64) {
    for (i, (r, q)) in rates.iter().zip(quotas).enumerate() {
        assert!(
            *r >= lo * q && *r <= upper_bound(rates, quotas, i, hi),
            "class with {q} mbit got {r:.1}: {rates:?}"
        );
    }
}

fn ingress(s: &NetStatus) -> &netqos::IngressStatus {
    s.ingress.as_ref().expect("ingress status")
}

fn class(s: &NetStatus, i: usize) -> &NetClassStatus {
    // Class 0 is the default class; groups follow in order of creation.
    &ingress(s).classes[i + 1]
}

#[test]
fn ingress_busy_classes_get_their_guarantees_by_ecn() -> Result<()> {
    if !require_root("ingress_busy_classes_get_their_guarantees_by_ecn") {
        return Ok(());
    }
    // CE marks are what this test checks: without ACK pacing.
    let quotas = [100.0, 300.0, 550.0];
    let shares_ok = |rates: &[f64]| {
        shares_within(rates, &quotas, 0.5, 1.75) && rates[0] < rates[1] && rates[1] < rates[2]
    };
    let o = run_retrying_if_off(
        &[tcp("100mbit"), tcp("300mbit"), tcp("550mbit")],
        false,
        false,
        4.0,
        shares_ok,
    )?;
    // Loose: on this host the classes get 107-161 / 222-275 / 524-546
    // (marks cannot hold a flow on a veth's round trip; qosd holds ECN
    // flows by their windows by default, see
    // `received_flows_share_the_link_in_proportion_to_their_windows`). The
    // test checks that each class is held around its guarantee and in
    // order; without shaping they would split the link about evenly (333
    // each).
    assert_shares_within(&o.rates, &quotas, 0.5, 1.75);
    assert!(
        o.rates[0] < o.rates[1] && o.rates[1] < o.rates[2],
        "classes out of order: {:?}",
        o.rates
    );
    let marks: u64 = (0..3).map(|i| class(&o.status, i).ce_marks).sum();
    let packets: u64 = (0..3).map(|i| class(&o.status, i).packets).sum();
    let drops: u64 = (0..3).map(|i| class(&o.status, i).drops).sum();
    assert!(marks > 0, "ECN flows were not marked");
    // Marked rather than dropped: drops stay a small fraction of the marks
    // (the fairness script reports the rates against the 0.1 % target).
    assert!(
        drops * 20 < marks && drops * 100 < packets,
        "{drops} drops, {marks} marks, {packets} packets"
    );
    Ok(())
}

/// Without ACK pacing (no fq), every received TCP flow is held by its
/// receive window: the windows are sized in proportion to the shares, and
/// the senders' link queue splits its rate in proportion to them. No CE
/// mark nor drop is needed once the windows are set: the policer would
/// only stall flows (with marks and drops, the fairness script's 100 ms
/// windows went to 0 for every class).
#[test]
fn received_flows_share_the_link_in_proportion_to_their_windows() -> Result<()> {
    if !require_root("received_flows_share_the_link_in_proportion_to_their_windows") {
        return Ok(());
    }
    let quotas = [100.0, 300.0, 550.0];
    // The link runs at 1000 against a capacity of 950: each class gets its
    // share of the link's rate.
    let shares_ok = |rates: &[f64]| shares_within(rates, &quotas, 0.85, 1.3);
    let link = Link {
        clamp_ecn: true,
        ..BASE_LINK
    };
    let groups = [tcp("100mbit"), tcp("300mbit"), tcp("550mbit")];
    let o = run_over_retrying_if_off(&link, &groups, false, false, 4.0, shares_ok)?;
    assert_shares_within(&o.rates, &quotas, 0.85, 1.3);
    let packets: u64 = (0..3).map(|i| class(&o.status, i).packets).sum();
    for i in 0..3 {
        let c = class(&o.status, i);
        assert!(c.window_clamps > 0, "class {i}: no window clamp written");
        // A flow is marked (and could be dropped) only before its first
        // window step.
        assert!(
            c.ce_marks * 100 <= packets && c.drops * 1000 <= packets,
            "class {i}: {} marks, {} drops of {packets} packets",
            c.ce_marks,
            c.drops
        );
    }
    Ok(())
}

/// Behind a shallow buffer upstream (64 KB), told of it, the windows add
/// up to half of it and the classes still share the link in proportion.
/// Sized for the default 256 KB (128 KB of windows) instead, they
/// overflowed it: the fairness script's all-busy gave 131 / 424 / 494 of
/// 100 / 300 / 600 (p5 0.00 / 1.18 / 0.55) with 838 retransmissions.
#[test]
fn received_flows_share_a_shallow_upstream_buffer_they_are_told_of() -> Result<()> {
    if !require_root("received_flows_share_a_shallow_upstream_buffer_they_are_told_of") {
        return Ok(());
    }
    let quotas = [100.0, 300.0, 550.0];
    // Every class within 15 % of its quota's part of what the link gave
    // (the link runs faster than the capacity). Told 256 KB, three runs
    // (each with its two retries) gave 98 / 421 / 479, 154 / 446 / 399 and
    // 175 / 525 / 300: 1.34-1.67 and 0.55-0.87 of their parts.
    let proportional = |rates: &[f64]| {
        let scale = rates.iter().sum::<f64>() / quotas.iter().sum::<f64>();
        rates
            .iter()
            .zip(quotas)
            .all(|(r, q)| (r / (q * scale) - 1.0).abs() <= 0.15)
    };
    let link = Link {
        clamp_ecn: true,
        buffer: 64 * 1024,
        told_buffer: 64 * 1024,
        ..BASE_LINK
    };
    let groups = [tcp("100mbit"), tcp("300mbit"), tcp("550mbit")];
    let o = run_over_retrying_if_off(&link, &groups, false, false, 4.0, proportional)?;
    assert!(
        proportional(&o.rates),
        "quotas {quotas:?} behind a 64 KB buffer: {:?}",
        o.rates
    );
    assert_shares_within(&o.rates, &quotas, 0.85, 1.3);
    Ok(())
}

/// A ceiling holds received flows that windows do not: two classes whose
/// ceilings add up to less than the link have it to themselves, and a
/// window holds nothing on a veth's round trip (before `decide` policed
/// window-held packets past the ceiling, they got 412-421 and 577-587 of
/// their 250 and 350 Mbit/s in six 4 s runs). One class's flow answers ECN
/// and is marked, the other's does not and is dropped.
#[test]
fn a_ceiling_holds_received_flows_their_windows_do_not() -> Result<()> {
    if !require_root("a_ceiling_holds_received_flows_their_windows_do_not") {
        return Ok(());
    }
    let ceils = [250.0, 350.0];
    let within = |rates: &[f64]| {
        rates
            .iter()
            .zip(ceils)
            .all(|(r, c)| *r >= 0.7 * c && *r <= 1.15 * c)
    };
    let link = Link {
        clamp_ecn: true,
        ..BASE_LINK
    };
    let groups = [
        Group {
            ceil: Some("250mbit"),
            ..tcp("100mbit")
        },
        Group {
            ceil: Some("350mbit"),
            ecn: false,
            ..tcp("100mbit")
        },
    ];
    let o = run_over_retrying_if_off(&link, &groups, false, false, 4.0, within)?;
    assert!(within(&o.rates), "ceilings {ceils:?}, got {:?}", o.rates);
    let (marked, plain) = (class(&o.status, 0), class(&o.status, 1));
    assert!(marked.ce_marks > 0, "the ECN class was not marked");
    assert!(plain.drops > 0, "the class without ECN lost nothing");
    assert_eq!(plain.ce_marks, 0, "a flow without ECN cannot be marked");
    Ok(())
}

/// A class whose configured ceiling binds it on a full link is held there
/// by its windows (`policy::ceiling_window_mult`), not by its ceiling
/// bucket: a flow without ECN is not dropped to it. Before, its windows got
/// the link's excess like every class's, and the bucket took it back by
/// drops (and CE marks from an ECN flow: 6 763 in the fairness script's
/// priority scenario).
#[test]
fn a_class_at_its_ceiling_on_a_full_link_is_held_by_its_windows() -> Result<()> {
    if !require_root("a_class_at_its_ceiling_on_a_full_link_is_held_by_its_windows") {
        return Ok(());
    }
    let ceil = 300.0;
    let within = |rates: &[f64]| rates[0] >= 0.8 * ceil && rates[0] <= 1.1 * ceil;
    let groups = [
        Group {
            ceil: Some("300mbit"),
            ecn: false,
            ..tcp("100mbit")
        },
        tcp("100mbit"),
    ];
    // Both classes window-held, as the daemon's default has them.
    let link = Link {
        clamp_ecn: true,
        ..BASE_LINK
    };
    let o = run_over_retrying_if_off(&link, &groups, false, false, 4.0, within)?;
    assert!(within(&o.rates), "ceiling {ceil}, got {:?}", o.rates);
    let capped = class(&o.status, 0);
    // Windows hold only where a queue stands upstream: the link full.
    let total: f64 = o.rates.iter().sum();
    assert!(total >= 0.9 * 950.0, "the link was not full: {:?}", o.rates);
    // The bound without ECN over the whole run; once the windows
    // steer it (after the warm-up), ECN's: held by its windows, the class
    // is not dropped (the bucket's drops were spaced all along: 0.3-0.5 %
    // of its packets on the 2-CPU host; the start may cost a few).
    // At scaled-down rates (the emulated VM: a 15 Mbit/s ceiling) the
    // ceiling bucket's least depth, 64 KB, is 35 ms of the ceiling and one
    // GRO aggregate of a slow CPU can overrun it: four CI runs of f1373de
    // and b038046 lost 0.8-3.0 % of the class's aggregates (4-11 of
    // 1 049-1 169 after the first second), a known limit (README). There
    // the bound is 5 %.
    let scaled_down = common::rate_scale() < 1.0;
    let (run_permille, after_permille) = if scaled_down { (50, 50) } else { (10, 1) };
    assert!(
        capped.drops * 1000 <= capped.packets * run_permille,
        "the class at its ceiling lost {} of {} packets",
        capped.drops,
        capped.packets
    );
    let (drops_then, packets_then) = o
        .steps
        .iter()
        .find(|s| s.t >= 1.0)
        .map(|s| s.drops_packets[0])
        .context("no control step after the warm-up")?;
    let (drops, packets) = (capped.drops - drops_then, capped.packets - packets_then);
    assert!(
        drops * 1000 <= packets * after_permille,
        "after the warm-up the class at its ceiling lost {drops} of {packets} packets"
    );
    Ok(())
}

/// A UDP flood beside a window-held TCP class gets its guarantee: its
/// sender waits on the same queue upstream as the TCP sender, whose window
/// takes that queue from it whatever it is sized for (56-329 of 500 Mbit/s
/// in the fairness script's udp scenario), so while the UDP class receives
/// traffic no window holds, the TCP class is held at its allocation: its
/// windows steered to it (`policy::held_window_mult`), its ceiling bucket
/// a quarter above it as the backstop (`policy::datapath_ceil`).
#[test]
fn a_udp_class_beside_window_held_tcp_gets_its_guarantee() -> Result<()> {
    if !require_root("a_udp_class_beside_window_held_tcp_gets_its_guarantee") {
        return Ok(());
    }
    let quotas = [475.0, 475.0];
    let shares_ok = |rates: &[f64]| shares_within(rates, &quotas, 0.8, 1.3);
    let link = Link {
        clamp_ecn: true,
        ..BASE_LINK
    };
    let groups = [
        Group {
            udp: true,
            ..tcp("475mbit")
        },
        tcp("475mbit"),
    ];
    let o = run_over_retrying_if_off(&link, &groups, false, false, 4.0, shares_ok)?;
    assert_shares_within(&o.rates, &quotas, 0.8, 1.3);
    let (udp, held) = (class(&o.status, 0), class(&o.status, 1));
    assert!(
        udp.unheld_bytes * 2 > udp.bytes,
        "the UDP class's traffic counted as held: {} of {} bytes unheld",
        udp.unheld_bytes,
        udp.bytes
    );
    assert!(
        held.window_clamps > 0,
        "the TCP flow's window was not clamped"
    );
    let steps = o.steps.len();
    let held_steps = o.steps.iter().filter(|s| s.held_at_alloc[1]).count();
    assert!(
        held_steps * 3 > steps,
        "the TCP class held at its allocation in {held_steps} of {steps} control steps"
    );
    assert!(
        o.steps.iter().all(|s| !s.held_at_alloc[0]),
        "the UDP class held at its allocation"
    );
    // Held by its windows, steered to its allocation: neither dropped (0.1 %
    // of its packets is the bound) nor needing marks.
    assert!(
        held.drops * 1000 <= held.packets,
        "the TCP class lost {} of {} packets",
        held.drops,
        held.packets
    );
    Ok(())
}

#[test]
fn ingress_flow_without_ecn_is_clamped() -> Result<()> {
    if !require_root("ingress_flow_without_ecn_is_clamped") {
        return Ok(());
    }
    let o = clamp_run(&BASE_LINK)?;
    let c = class(&o.status, 0);
    assert!(c.window_clamps > 0, "no window clamp written");
    assert_eq!(c.ce_marks, 0, "a non-ECN flow cannot be marked");
    // The clamp steps record the class's round trip for its pacing loop: a
    // veth's, well under the 30 ms from which the loop's gains shrink.
    assert!(
        c.rtt_us > 0 && c.rtt_us < 30_000,
        "class round trip {} µs",
        c.rtt_us
    );
    // Held near its share by the clamp, with drops the exception. Precision
    // is the fairness script's job; these bounds hold on a loaded CI box.
    // The upper one is loose: on this host the clamped flow takes 1.23-1.33×
    // its share from the marked ECN class next to it (marks hold nothing on
    // a veth's round trip; the daemon's default clamps ECN flows too).
    assert!(
        c.drops * 100 <= c.packets,
        "{} drops of {} packets",
        c.drops,
        c.packets
    );
    assert!(clamp_shares_ok(&o.rates), "{:?}", o.rates);
    Ok(())
}

/// The clamp scenario: a 200 Mbit/s flow without ECN beside a 750 one with
/// it, no ACK pacing (with it, the clamp sizes the ACK queue instead).
fn clamp_run(link: &Link) -> Result<Outcome> {
    let plain = Group {
        ecn: false,
        ..tcp("200mbit")
    };
    let groups = [plain, tcp("750mbit")];
    run_over_retrying_if_off(link, &groups, false, false, 4.0, clamp_shares_ok)
}

/// The clamped flow's bounds in [`clamp_run`].
fn clamp_shares_ok(rates: &[f64]) -> bool {
    rates[0] >= 0.7 * 200.0 && rates[0] <= upper_bound(rates, &[200.0, 750.0], 0, 1.45)
}

/// Shapers on other interfaces of the host (a library user's) leave this
/// one's received flows alone. Their programs are attached to the same
/// cgroup root and see these flows' packets and sockets: before, the other
/// ingress shaper charged them to its default class (the ingress tag did
/// not say which interface), which clamped the flow's window too, and one
/// program turned off the per-segment callback the other's clamps need (the
/// flag is the socket's). Without the fixes: no clamp and 4.4 % of the
/// packets dropped in a CI run, or the clamped flow starved (0.02-76 of its
/// 200 Mbit/s). Clamps and drops are compared with the same run alone,
/// made first.
#[test]
fn other_shapers_leave_a_received_flow_its_window_clamp() -> Result<()> {
    if !require_root("other_shapers_leave_a_received_flow_its_window_clamp") {
        return Ok(());
    }
    let link = Link {
        other_shapers: true,
        ..BASE_LINK
    };
    let alone = clamp_run(&BASE_LINK)?;
    let o = clamp_run(&link)?;
    // Its program sees every packet delivered to a socket: it must tell the
    // ones received through its own interface (none here) from this run's.
    assert_eq!(
        o.others_received, 0,
        "another shaper charged this run's packets"
    );
    let (a, c) = (class(&alone.status, 0), class(&o.status, 0));
    let dropped = |c: &NetClassStatus| c.drops as f64 / c.packets.max(1) as f64;
    eprintln!(
        "alone: {} clamps, {:.2} % dropped; beside other shapers: {} clamps, {:.2} % dropped",
        a.window_clamps,
        100.0 * dropped(a),
        c.window_clamps,
        100.0 * dropped(c)
    );
    // The clamp acts as it does alone, give or take a run's noise. With
    // the callback lost: 2 clamps (or none) against 190 alone on the host.
    assert!(
        c.window_clamps > 0 && c.window_clamps * 2 >= a.window_clamps,
        "{} clamps beside other shapers, {} alone",
        c.window_clamps,
        a.window_clamps
    );
    // And holds the flow as well: with the callback lost 3.4 % and 4.4 %
    // were dropped against 0.34 % alone on the host. (In the VM the clamp
    // alone loses 3-4 %: see the VM suite's exclusions.)
    assert!(
        dropped(c) <= 2.0 * dropped(a) + 0.01,
        "{} drops of {} packets beside other shapers; alone {} of {}",
        c.drops,
        c.packets,
        a.drops,
        a.packets
    );
    assert!(clamp_shares_ok(&o.rates), "{:?}", o.rates);
    Ok(())
}

#[test]
fn ingress_into_containers_is_classified_by_the_receiving_cgroup() -> Result<()> {
    if !require_root("ingress_into_containers_is_classified_by_the_receiving_cgroup") {
        return Ok(());
    }
    flows_into_containers_are_classified(&BASE_LINK)
}

/// Forwarded IPv6: the tag set on the shaped interface survives IPv6
/// forwarding, and the receiving socket's cgroup is found inside the
/// container's namespace.
#[test]
fn ipv6_flows_into_containers_are_classified_by_the_receiving_cgroup() -> Result<()> {
    const NAME: &str = "ipv6_flows_into_containers_are_classified_by_the_receiving_cgroup";
    if !require_root(NAME) || !testbeds::net::require_ipv6(NAME) {
        return Ok(());
    }
    let link = Link {
        ipv6: true,
        ..BASE_LINK
    };
    flows_into_containers_are_classified(&link)
}

fn flows_into_containers_are_classified(link: &Link) -> Result<()> {
    // The smaller receiver takes at least half its guarantee and at most its
    // share plus what the larger left of its guarantee. Which one leads is
    // not asserted: a CI run on a slow day of this host moved only 770-895
    // of the 1000 Mbit/s, and the larger receiver in its container got 359
    // and 434 against the smaller one's 412 and 460, with every byte in
    // the right class. Classification is asserted on the bytes below.
    let quotas = [200.0, 750.0];
    let shares_ok =
        |rates: &[f64]| rates[0] >= 0.5 * 200.0 && rates[0] <= upper_bound(rates, &quotas, 0, 1.3);
    let groups = [tcp("200mbit"), tcp("750mbit")];
    let o = run_over_retrying_if_off(link, &groups, true, true, 4.0, shares_ok)?;
    // Classification is what this test checks: each class counted what its
    // container's receiver took in (within 5 %: the class also counts the
    // handshakes and iperf's control connection); left in the default class,
    // both would count nothing. The share bounds are loose because the
    // smaller receiver in a container gets 130-180 of its 200 on this host
    // (ingress accuracy is an open item of its own issue).
    for (i, wire) in o.wire.iter().enumerate() {
        let counted = class(&o.status, i).bytes;
        assert!(
            counted.abs_diff(*wire) * 20 <= *wire,
            "class {i} counted {counted} bytes, its receiver took in {wire} on the wire"
        );
    }
    let default = ingress(&o.status).classes[0].bytes;
    let total: u64 = o.wire.iter().sum();
    assert!(
        default * 100 <= total,
        "the default class counted {default} of {total} bytes"
    );
    assert!(shares_ok(&o.rates), "{:?}", o.rates);
    Ok(())
}

/// IPv6 flows are classified by their receiving cgroup and held near their
/// shares: by their ACK clocks where the kernel has fq (no drops), by CE
/// marks and window clamps where it has not. One sender without ECN: were
/// its IPv6 TCP not parsed, nothing but drops could hold it.
#[test]
fn ipv6_received_flows_are_held_at_their_shares() -> Result<()> {
    if !require_root("ipv6_received_flows_are_held_at_their_shares")
        || !testbeds::net::require_ipv6("ipv6_received_flows_are_held_at_their_shares")
    {
        return Ok(());
    }
    let link = Link {
        ipv6: true,
        ..BASE_LINK
    };
    let quotas = [200.0, 750.0];
    // As loose as the IPv4 tests' without ACK pacing (see
    // ingress_busy_classes_get_their_guarantees_by_ecn).
    let shares_ok = |rates: &[f64]| {
        rates
            .iter()
            .zip(quotas)
            .enumerate()
            .all(|(i, (r, q))| *r >= 0.5 * q && *r <= upper_bound(rates, &quotas, i, 1.75))
    };
    let plain = Group {
        ecn: false,
        ..tcp("200mbit")
    };
    // Marks need the link full: a CI run of 5af68fc had the two receivers
    // take 779 of the 950 Mbit/s (most likely both flows on one CPU by RPS)
    // and the ECN class, under its share, was not marked. Tried again.
    let full = |rates: &[f64]| rates.iter().sum::<f64>() >= 0.85 * 950.0;
    let groups = [plain, tcp("750mbit")];
    let o = run_over_retrying_if_off(&link, &groups, false, true, 4.0, |r| {
        shares_ok(r) && full(r)
    })?;
    assert!(shares_ok(&o.rates), "IPv6 shares: {:?}", o.rates);
    assert!(full(&o.rates), "the link was not full: {:?}", o.rates);
    let (plain, ecn) = (class(&o.status, 0), class(&o.status, 1));
    for c in [plain, ecn] {
        assert!(c.bytes > 0, "{}: no IPv6 bytes charged", c.cgroup);
    }
    let paced = ingress(&o.status).ack_pacing == "on";
    eprintln!(
        "ACK pacing {paced}: clamps {} / {}, marks {} / {}, drops {} / {} of {} / {} packets",
        plain.window_clamps,
        ecn.window_clamps,
        plain.ce_marks,
        ecn.ce_marks,
        plain.drops,
        ecn.drops,
        plain.packets,
        ecn.packets
    );
    if paced {
        assert_eq!(
            (plain.drops, ecn.drops),
            (0, 0),
            "ACK-paced IPv6 flows dropped"
        );
    } else {
        assert!(
            plain.window_clamps > 0,
            "the IPv6 flow without ECN was not clamped"
        );
        assert_eq!(plain.ce_marks, 0, "a non-ECN IPv6 flow cannot be marked");
        assert!(ecn.ce_marks > 0, "the IPv6 ECN flow was not marked");
        for c in [plain, ecn] {
            assert!(
                c.drops * 100 <= c.packets,
                "{}: {} drops of {} packets",
                c.cgroup,
                c.drops,
                c.packets
            );
        }
    }
    Ok(())
}

/// Receive windows (`rcv_ssthresh`, bytes) of the host's established TCP
/// sockets on local `port`, accepted or still queued.
fn receive_windows(port: u16) -> Result<Vec<u64>> {
    let out = testbeds::run(
        "ss",
        &[
            "-Htin",
            "state",
            "established",
            &format!("( sport = :{port} )"),
        ],
    )?;
    Ok(out
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("rcv_ssthresh:"))
        .map(|v| v.parse())
        .collect::<Result<_, _>>()?)
}

#[test]
fn a_burst_of_accepted_flows_gets_its_first_flights_bounded() -> Result<()> {
    if !require_root("a_burst_of_accepted_flows_gets_its_first_flights_bounded") {
        return Ok(());
    }
    first_flights_bounded(5471, Listener::V4)
}

#[test]
fn a_dual_stack_listeners_ipv4_flows_get_their_first_flights_bounded() -> Result<()> {
    if !require_root("a_dual_stack_listeners_ipv4_flows_get_their_first_flights_bounded") {
        return Ok(());
    }
    first_flights_bounded(5472, Listener::DualStack)
}

#[test]
fn an_ipv6_listeners_flows_get_their_first_flights_bounded() -> Result<()> {
    if !require_root("an_ipv6_listeners_flows_get_their_first_flights_bounded")
        || !testbeds::net::require_ipv6("an_ipv6_listeners_flows_get_their_first_flights_bounded")
    {
        return Ok(());
    }
    first_flights_bounded(5473, Listener::V6)
}

#[test]
fn ipv6_flows_with_extension_headers_get_their_first_flights_bounded() -> Result<()> {
    let name = "ipv6_flows_with_extension_headers_get_their_first_flights_bounded";
    if !require_root(name) || !testbeds::net::require_ipv6(name) {
        return Ok(());
    }
    // The class of a SYN is read from its TCP ports, past the destination
    // options header the senders' sockets put before TCP.
    first_flights_bounded(5476, Listener::V6DestOpts)
}

/// Where the listener of [`first_flights_bounded`] listens.
#[derive(Clone, Copy, PartialEq)]
enum Listener {
    /// The class's IPv4 address; IPv4 flows.
    V4,
    /// `[::]`, whose request sockets are IPv6 ones for IPv4 SYNs; IPv4
    /// flows.
    DualStack,
    /// The class's IPv6 address; IPv6 flows.
    V6,
    /// As `V6`, every packet of the senders' flows carrying a destination
    /// options header (an IPv6 extension header) before TCP.
    V6DestOpts,
}

/// Connects to `addr` from a socket whose packets carry a destination
/// options header (8 bytes: one PadN option) before TCP.
fn connect_with_dest_opts(addr: std::net::SocketAddrV6) -> Result<std::net::TcpStream> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: plain socket(2); the descriptor is owned at once.
    let fd = unsafe { libc::socket(libc::AF_INET6, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    anyhow::ensure!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a new descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // Next header (the kernel fills it in), length 0 (8 bytes), PadN of 4.
    let opts: [u8; 8] = [0, 0, 1, 4, 0, 0, 0, 0];
    // SAFETY: the option buffer outlives the call; its length is passed.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_DSTOPTS,
            opts.as_ptr().cast(),
            opts.len() as libc::socklen_t,
        )
    };
    anyhow::ensure!(rc == 0, "IPV6_DSTOPTS: {}", std::io::Error::last_os_error());
    let sa = libc::sockaddr_in6 {
        sin6_family: libc::AF_INET6 as libc::sa_family_t,
        sin6_port: addr.port().to_be(),
        sin6_flowinfo: 0,
        sin6_addr: libc::in6_addr {
            s6_addr: addr.ip().octets(),
        },
        sin6_scope_id: 0,
    };
    // SAFETY: `sa` is a valid sockaddr_in6 of the size passed.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&sa as *const libc::sockaddr_in6).cast(),
            std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
        )
    };
    anyhow::ensure!(
        rc == 0,
        "connect to {addr}: {}",
        std::io::Error::last_os_error()
    );
    Ok(std::net::TcpStream::from(fd))
}

/// Eight connections into a 2 Mbit/s class, to an iperf3 server listening
/// as `listener` says.
fn first_flights_bounded(port: u16, listener: Listener) -> Result<()> {
    let _one_shaper = one_shaper_at_a_time();
    let bed = EgressBed::new(1, 0)?;
    let tmp = tempfile::tempdir()?;
    let parent = CgroupDir::new("qos-test-")?;
    let h = qos_core::Hierarchy::detect()?;
    let mut s = settings(bed.shaped_if())?;
    s.ingress_capacity = Some("100mbit".parse()?);
    let mut shaper = Shaper::start(s, &testbeds::cgroup2_root()?)?;
    let dir = parent.child("burst")?;
    let cg = h.resolve(&parent.child_name("burst"))?;
    // 2 Mbit/s, no round trip measured yet (100 ms assumed): 25 KB, 16
    // segments of first flights. The first flow is offered all 16 (and
    // charged a sender's usual ten), the second the six left, the rest two
    // each.
    let rate: qos_core::Rate = "2mbit".parse()?;
    shaper.set(&cg, NetQuota::ingress(rate, Some(rate), 0))?;
    let v6 = matches!(listener, Listener::V6 | Listener::V6DestOpts);
    let ip = bed.sender_addr(0, v6)?;
    // A listener in the class; its accept queue holds the connections
    // whether or not it accepts them.
    let receiver = Placement {
        cgroup: Some(dir),
        netns: None,
    };
    let _server = if listener == Listener::DualStack {
        let child = testbeds::KillOnDrop(testbeds::spawn(
            &receiver,
            std::process::Command::new("iperf3")
                .args(["-s", "-1", "-p", &port.to_string()])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null()),
        )?);
        let filter = format!("( sport = :{port} )");
        let listening = testbeds::wait_for(Duration::from_secs(5), || {
            testbeds::run("ss", &["-Hltn6", &filter]).is_ok_and(|o| !o.trim().is_empty())
        });
        assert!(listening, "iperf3 did not listen on [::]:{port}");
        (Some(child), None)
    } else {
        (
            None,
            Some(Server::start(&receiver, ip, port, tmp.path(), 0.1)?),
        )
    };
    const FLOWS: usize = 8;
    // Connections opened one after another from the senders' namespace
    // that send nothing: their windows stay what their SYN-ACKs offered.
    let peer = bed.peer.path().to_owned();
    let _clients = std::thread::scope(|s| {
        s.spawn(|| -> Result<Vec<std::net::TcpStream>> {
            let ns = std::fs::File::open(&peer)?;
            nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
            (0..FLOWS)
                .map(|_| match (listener, ip) {
                    (Listener::V6DestOpts, std::net::IpAddr::V6(v6)) => {
                        connect_with_dest_opts(std::net::SocketAddrV6::new(v6, port, 0, 0))
                    }
                    _ => Ok(std::net::TcpStream::connect((ip, port))?),
                })
                .collect()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("connecting from {} panicked", peer.display()))?
    })?;
    let mut windows = Vec::new();
    let all_open = testbeds::wait_for(Duration::from_secs(10), || {
        windows = receive_windows(port).unwrap_or_default();
        windows.len() >= FLOWS
    });
    assert!(
        all_open,
        "{} of {FLOWS} connections seen: {windows:?}",
        windows.len()
    );
    shaper.tick()?; // reads the counters
    let status = shaper.status();
    shaper.stop();
    let bounded = class(&status, 0).initial_windows;
    eprintln!("receive windows {windows:?}; {bounded} bounded");
    windows.sort_unstable();
    // The client's connections may be spread over more than the 6 ms a
    // segment drains in at 2 Mbit/s on a slow host: a little room may come
    // back.
    let segment = if v6 { 1428 } else { 1448 };
    assert!(
        (10 * segment..=16 * segment).contains(&windows[FLOWS - 1]),
        "the first flow's window is not the class's room (16 segments): {windows:?}"
    );
    assert!(
        windows[FLOWS - 3] <= 3 * segment,
        "the later flows' windows were not bounded: {windows:?}"
    );
    let granted: u64 = windows[..FLOWS - 1].iter().sum();
    assert!(
        granted <= 24 * segment,
        "{granted} bytes of first flights granted past the first: {windows:?}"
    );
    assert_eq!(
        bounded, FLOWS as u64,
        "initial windows counted as bounded for {FLOWS} flows"
    );
    Ok(())
}

#[test]
fn stopping_removes_every_ingress_attachment() -> Result<()> {
    if !require_root("stopping_removes_every_ingress_attachment") {
        return Ok(());
    }
    let _one_shaper = one_shaper_at_a_time();
    let bed = EgressBed::new(1, 0)?;
    let parent = CgroupDir::new("qos-test-")?;
    let h = qos_core::Hierarchy::detect()?;
    let root = testbeds::cgroup2_root()?;
    let dev = bed.shaped_if();
    assert!(netqos::qdisc::root(dev).unwrap().is_default());
    let mut shaper = Shaper::start(settings(dev)?, &root)?;
    // ACK pacing: fq (ours) at the root where the kernel has fq; otherwise
    // the status says why it is off and the root is left alone.
    let ack = ingress(&shaper.status()).ack_pacing.clone();
    if testbeds::net::fq_available()? {
        assert_eq!(ack, "on");
        assert!(netqos::qdisc::root(dev).unwrap().is_ours());
        // Deleted by hand: ACK pacing goes off at the next interface scan,
        // and fq is back at the one after (the default qdisc returned).
        testbeds::run("tc", &["qdisc", "del", "dev", dev, "root"])?;
        shaper.scan_interfaces();
        let ack = ingress(&shaper.status()).ack_pacing.clone();
        assert!(ack.starts_with("off: fq at the root"), "{ack}");
        shaper.scan_interfaces();
        assert_eq!(ingress(&shaper.status()).ack_pacing, "on");
        assert!(netqos::qdisc::root(dev).unwrap().is_ours());
    } else {
        assert!(ack.starts_with("off: the kernel has no fq qdisc"), "{ack}");
        assert!(netqos::qdisc::root(dev).unwrap().is_default());
    }
    parent.child("a")?;
    let cg = h.resolve(&parent.child_name("a"))?;
    shaper.set(&cg, NetQuota::ingress("10mbit".parse()?, None, 0))?;
    assert_eq!(entries(&mut shaper, Direction::Ingress), 1);
    assert_eq!(entries(&mut shaper, Direction::Egress), 0);
    assert_eq!(
        common::tc_programs(bed.shaped_if(), aya::programs::TcAttachType::Ingress)?,
        1,
        "ingress tagger not attached"
    );
    // Unsetting the quota removes its mapping.
    assert!(shaper.remove(&cg.name)?);
    assert_eq!(entries(&mut shaper, Direction::Ingress), 0);
    let ids: Vec<u32> = shaper
        .datapath()
        .program_ids()
        .into_iter()
        .map(|(_, id)| id)
        .collect();
    shaper.stop();
    assert_eq!(
        common::tc_programs_left(
            bed.shaped_if(),
            aya::programs::TcAttachType::Ingress,
            Duration::from_secs(5)
        )?,
        0,
        "ingress tagger still attached 5 s after stop"
    );
    let left = netqos::qdisc::root(dev).unwrap();
    assert!(left.is_default(), "root qdisc left behind: {left:?}");
    let left = common::still_loaded(&ids, Duration::from_secs(5));
    assert!(
        left.is_empty(),
        "programs {left:?} still loaded 5 s after stop (cgroup_skb still on the cgroup root?)"
    );
    Ok(())
}

fn entries(shaper: &mut Shaper, dir: Direction) -> usize {
    shaper.datapath().maps(dir).cgroup_entries()
}

#[test]
fn a_configured_root_qdisc_is_not_replaced_for_ack_pacing() -> Result<()> {
    if !require_root("a_configured_root_qdisc_is_not_replaced_for_ack_pacing") {
        return Ok(());
    }
    let _one_shaper = one_shaper_at_a_time();
    let bed = EgressBed::new(1, 0)?;
    let dev = bed.shaped_if();
    testbeds::run(
        "tc",
        &["qdisc", "add", "dev", dev, "root", "handle", "1:", "htb"],
    )?;
    let shaper = Shaper::start(settings(dev)?, &testbeds::cgroup2_root()?)?;
    let ack = ingress(&shaper.status()).ack_pacing.clone();
    assert!(
        ack.starts_with("off:") && ack.contains("configured root qdisc (htb 1:)"),
        "{ack}"
    );
    shaper.stop();
    let root = netqos::qdisc::root(dev).unwrap();
    assert_eq!((root.kind.as_str(), root.handle.as_str()), ("htb", "1:"));
    // Turned off in the configuration: the root is not even looked at.
    let mut s = settings(dev)?;
    s.ingress_ack_pacing = false;
    let shaper = Shaper::start(s, &testbeds::cgroup2_root()?)?;
    let ack = ingress(&shaper.status()).ack_pacing.clone();
    assert!(ack.starts_with("off: turned off"), "{ack}");
    shaper.stop();
    Ok(())
}

/// Whether the ACK-pacing test `name` can run here: as root (see
/// `require_root`), on a kernel that can hold ACKs (otherwise it checks
/// [`ack_pacing_unavailable_is_reported`] only).
fn ack_pacing_test_runs(name: &str) -> Result<bool> {
    Ok(require_root(name) && !ack_pacing_unavailable_is_reported()?)
}

/// Where this kernel cannot hold ACKs (no sch_fq, as on the 6.18 host),
/// checks that qosd says so and falls back, and returns true: an ACK-pacing
/// test can check nothing else there. The VM suite (Debian's 6.1, which has
/// fq) runs the rest of such tests.
fn ack_pacing_unavailable_is_reported() -> Result<bool> {
    if testbeds::net::fq_available()? {
        return Ok(false);
    }
    let _one_shaper = one_shaper_at_a_time();
    let bed = EgressBed::new(1, 0)?;
    let shaper = Shaper::start(settings(bed.shaped_if())?, &testbeds::cgroup2_root()?)?;
    let ack = ingress(&shaper.status()).ack_pacing.clone();
    shaper.stop();
    assert!(ack.starts_with("off: the kernel has no fq qdisc"), "{ack}");
    Ok(true)
}

#[test]
fn ack_pacing_holds_received_flows_at_their_shares_without_drops() -> Result<()> {
    if !ack_pacing_test_runs("ack_pacing_holds_received_flows_at_their_shares_without_drops")? {
        return Ok(());
    }
    let plain = Group {
        ecn: false,
        ..tcp("300mbit")
    };
    let o = run(&[tcp("150mbit"), plain, tcp("500mbit")], false, true, 4.0)?;
    assert_eq!(ingress(&o.status).ack_pacing, "on");
    for (i, q) in [150.0, 300.0, 500.0].into_iter().enumerate() {
        let c = class(&o.status, i);
        // Held by the ACK clock and the window, not by losses.
        assert_eq!(c.drops, 0, "class {i}: {} drops", c.drops);
        let r = o.rates[i];
        assert!(
            r >= 0.75 * q && r <= 1.25 * q,
            "class with {q} mbit got {r:.1}: {:?}",
            o.rates
        );
    }
    Ok(())
}

/// The fairness script's many-flows from 60 ms away: 32 flows into a class
/// beside a single flow's, equal quotas, each of the 32 at a thirty-second
/// of its class (windows of a few packets). Their class's allocation stays
/// split over most of the 32. Weighed against its own rate, a flow bound by
/// its window counted less whenever the count fell (its rate rose faster
/// than its window could follow): in the 6.1 VM this test measured a median
/// of 18 and a tenth percentile of 5.4 that way. Needs ACK pacing and
/// netem: the VM suite runs it (Debian's 6.1); the host (no fq, no netem)
/// checks that qosd says ACK pacing is off.
#[test]
fn many_slow_flows_from_afar_stay_counted() -> Result<()> {
    if !ack_pacing_test_runs("many_slow_flows_from_afar_stay_counted")? {
        return Ok(());
    }
    const FLOWS: u32 = 32;
    const SECS: f64 = 8.0;
    // The fairness script's many-flows at 20 Mbit/s from 60 ms away (at
    // the VM's scale of 1/20).
    let link = Link {
        rate: "420mbit",
        capacity: "400mbit",
        delay_ms: 60,
        delay_later: None,
        ipv6: false,
        other_shapers: false,
        clamp_ecn: false,
        ..BASE_LINK
    };
    let many = Group {
        flows: FLOWS,
        ..tcp("160mbit")
    };
    let o = run_over(&link, &[many, tcp("160mbit")], false, true, SECS)?;
    assert_eq!(ingress(&o.status).ack_pacing, "on");
    // From a second after the last flow opened (iperf3 opens them over two
    // seconds in the VM) to a second before the end.
    let open_at = o
        .steps
        .iter()
        .find(|s| s.flows[0].0 >= u64::from(FLOWS))
        .map(|s| s.t)
        .expect("every flow opened");
    let mut counts: Vec<f64> = o
        .steps
        .iter()
        .filter(|s| s.t >= open_at + 1.0 && s.t <= SECS - 1.0)
        .map(|s| s.flows[0].1)
        .collect();
    eprintln!("active flows from {open_at:.1} s: {counts:?}");
    assert!(counts.len() >= 50, "{} samples", counts.len());
    counts.sort_by(f64::total_cmp);
    let median = counts[counts.len() / 2];
    let low = counts[counts.len() / 10];
    eprintln!("active flows: median {median:.1}, tenth percentile {low:.1} of {FLOWS}");
    assert!(
        median >= 0.6 * f64::from(FLOWS) && low >= 0.4 * f64::from(FLOWS),
        "active flows: median {median:.1}, tenth percentile {low:.1} of {FLOWS}"
    );
    Ok(())
}

/// A queue that grows upstream after a flow's handshake (a flood filling
/// the link's buffer; here the link's delay raised from 1 to 41 ms) is
/// covered by the flow's receive window: its path round trip, measured from
/// its ACKs' departures to the data echoing their timestamps, replaces the
/// handshake's. Sized from the handshake's (2 ms + 10 ms of slack), the
/// window would hold it near a quarter of its rate. Needs ACK pacing and
/// netem: the VM suite runs it; the host checks that qosd says ACK pacing
/// is off.
#[test]
fn a_received_flows_window_covers_a_queue_grown_upstream() -> Result<()> {
    if !ack_pacing_test_runs("a_received_flows_window_covers_a_queue_grown_upstream")? {
        return Ok(());
    }
    const SECS: f64 = 8.0;
    const GROWN_AT: f64 = 2.0;
    let link = Link {
        rate: "420mbit",
        capacity: "400mbit",
        delay_ms: 1,
        delay_later: Some((GROWN_AT, 41)),
        ipv6: false,
        other_shapers: false,
        clamp_ecn: false,
        ..BASE_LINK
    };
    let o = run_over(&link, &[tcp("400mbit")], false, true, SECS)?;
    // While the flow runs (iperf3's control connection, whose server sends
    // its results at the end, updates its own round trip then).
    let median_window = |from: f64, to: f64| {
        let mut w: Vec<u64> = o
            .steps
            .iter()
            .filter(|s| s.t >= from && s.t <= to)
            .map(|s| s.window_rtts[0])
            .collect();
        eprintln!("window round trips (µs) from {from:.1} to {to:.1} s: {w:?}");
        assert!(w.len() >= 5, "{} samples", w.len());
        w.sort_unstable();
        w[w.len() / 2]
    };
    let before = median_window(0.5, GROWN_AT);
    assert!(
        before < 10_000,
        "window round trip {before} µs before the delay grew"
    );
    let after = median_window(GROWN_AT + 1.0, SECS - 1.0);
    assert!(
        (35_000..=55_000).contains(&after),
        "window round trip {after} µs (median) for a link of 41 ms"
    );
    // From two seconds after the delay grew (the path round trip is the
    // least of a whole 200 ms window) to the end.
    let (bytes, t) = o.intervals[0]
        .iter()
        .filter(|i| i.0 >= GROWN_AT + 2.0 && i.1 - i.0 >= 0.05)
        .fold((0u64, 0.0), |(b, t), i| (b + i.2, t + i.1 - i.0));
    let mbit = wire_bytes(bytes, false) as f64 * 8.0 / t / 1e6 / common::rate_scale();
    eprintln!("after the queue grew: {mbit:.0} of 400 Mbit/s (nominal) over {t:.1} s");
    assert!(t >= 2.0, "{t:.1} s of intervals");
    assert!(
        mbit >= 0.6 * 400.0,
        "{mbit:.0} of 400 Mbit/s: held by a window sized for the handshake's round trip"
    );
    Ok(())
}

#[test]
fn an_upload_is_not_held_by_its_cgroups_ingress_quota() -> Result<()> {
    if !require_root("an_upload_is_not_held_by_its_cgroups_ingress_quota") {
        return Ok(());
    }
    let _one_shaper = one_shaper_at_a_time();
    // A cgroup with a small ingress quota sends (its egress is not shaped):
    // the ACKs it receives must not run an ACK clock that holds its data.
    let bed = EgressBed::new(1, 0)?;
    let tmp = tempfile::tempdir()?;
    let parent = CgroupDir::new("qos-test-")?;
    let h = qos_core::Hierarchy::detect()?;
    // The ingress capacity is the quota: the ACKs alone exceed it, so they
    // run the class past its drop threshold. With TSO the ACK count is not
    // proportional to the upload (one per 20 to 100 KB sent; slow runs
    // had 95 KB and 33 KB of ACKs in 3 s): a tiny quota and shallow
    // buckets keep them well past what the class may receive (8 KB in
    // 3 s) however the upload goes.
    let ingress_quota = common::scaled("10kbit")?;
    let mut s = settings(bed.shaped_if())?;
    s.ingress_capacity = Some(ingress_quota);
    s.tuning.min_depth = 4 * 1024;
    s.tuning.min_pool = 4 * 1024;
    let mut shaper = Shaper::start(s, &testbeds::cgroup2_root()?)?;
    let dir = parent.child("up")?;
    let cg = h.resolve(&parent.child_name("up"))?;
    shaper.set(&cg, NetQuota::ingress(ingress_quota, None, 0))?;
    let ack = ingress(&shaper.status()).ack_pacing.clone();
    let peer = Placement {
        cgroup: None,
        netns: Some(bed.peer.path()),
    };
    let uploader = Placement {
        cgroup: Some(dir),
        netns: None,
    };
    let (status, mbit) = common::one_flow_under_control(
        shaper,
        &peer,
        bed.peer_ip,
        &uploader,
        Some(bed.sender_ips[0]),
        5461,
        tmp.path(),
    )?;
    let quota = ingress_quota.bits_per_sec() as f64 / 1e6;
    let c = class(&status, 0);
    eprintln!(
        "upload {mbit:.1} Mbit/s, ingress quota {quota:.3}, ACK pacing {ack}; \
         received {} packets, {} bytes over the quota, {} drops",
        c.packets, c.over_bytes, c.drops
    );
    // The ACKs count against the ingress quota (several Mbit/s, past the
    // capacity) but are never dropped: a dropped ACK slows the
    // upload, not the traffic it is charged to.
    assert!(
        c.over_bytes > 0,
        "the upload's ACKs were not charged: {c:?}"
    );
    // What this cgroup receives with payload is iperf3's control connection
    // (a few messages, which may be dropped); dropped ACKs would be counted in
    // thousands.
    assert!(c.drops <= 10, "the upload's ACKs were dropped: {c:?}");
    // Held by its ACKs' clock, an upload would get about 20× the ingress
    // quota (1448 payload bytes per 66-byte ACK); unshaped it gets far more.
    assert!(
        mbit > 60.0 * quota,
        "upload {mbit:.1} Mbit/s with an ingress quota of {quota:.1} (ACK pacing {ack})"
    );
    Ok(())
}

/// What `tc` (iproute2, a second opinion) lists on `dev`, a line per
/// qdisc: its kind, then `root` or `parent X`, and its flow limit if it has
/// one (handles of qdiscs under mq are the kernel's choice: left out).
fn tc_qdiscs(dev: &str) -> Result<Vec<String>> {
    let out = testbeds::run("tc", &["qdisc", "show", "dev", dev])?;
    let mut lines: Vec<String> = out
        .lines()
        .filter(|l| l.starts_with("qdisc "))
        .map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let after = |word: &str| {
                w.iter()
                    .position(|x| *x == word)
                    .and_then(|i| w.get(i + 1))
                    .map(|v| format!(" {word} {v}"))
                    .unwrap_or_default()
            };
            let place = if w.get(3) == Some(&"root") {
                format!(" {} root", w[2])
            } else {
                after("parent")
            };
            format!("{}{place}{}", w[1], after("flow_limit"))
        })
        .collect();
    lines.sort();
    Ok(lines)
}

#[test]
fn the_ack_pacing_qdisc_is_read_installed_and_removed_over_netlink() -> Result<()> {
    if !require_root("the_ack_pacing_qdisc_is_read_installed_and_removed_over_netlink") {
        return Ok(());
    }
    use netqos::qdisc::{self, AckQdisc};
    let fq = testbeds::net::fq_available()?;
    for queues in [1, 3] {
        let veth = HostVeth::new("qdq", queues)?;
        let dev = veth.name();
        let root = qdisc::root(dev)?;
        assert!(root.is_default() && !root.is_ours(), "{root:?}");
        assert_eq!(root.kind, "noqueue");
        let state = qdisc::ensure_fq(dev);
        if fq {
            assert_eq!(state, AckQdisc::Ready { installed: true });
            let root = qdisc::root(dev)?;
            assert!(root.is_ours(), "{root:?}");
            let listed = tc_qdiscs(dev)?;
            if queues == 1 {
                assert_eq!(root.kind, "fq");
                assert_eq!(listed, ["fq 7105: root flow_limit 1000p"]);
            } else {
                // One fq per transmit queue under our mq.
                assert_eq!(root.kind, "mq");
                assert_eq!(
                    listed,
                    [
                        "fq parent 7105:1 flow_limit 1000p",
                        "fq parent 7105:2 flow_limit 1000p",
                        "fq parent 7105:3 flow_limit 1000p",
                        "mq 7105: root",
                    ]
                );
            }
            // Asking again changes nothing.
            assert_eq!(qdisc::ensure_fq(dev), AckQdisc::Ready { installed: false });
            qdisc::remove_ours(dev);
            assert!(qdisc::root(dev)?.is_default());
        } else {
            let AckQdisc::Unavailable(why) = &state else {
                panic!("without sch_fq: {state:?}");
            };
            // Under mq, the first fq below it is refused.
            let refused = if queues == 1 {
                "qdisc add root fq"
            } else {
                "qdisc replace parent 7105:1 fq"
            };
            assert!(
                why.starts_with(&format!(
                    "the kernel has no fq qdisc (sch_fq): {refused} on {dev}: "
                )),
                "{why}"
            );
            // Nothing half-installed (under mq, the mq is gone again).
            assert!(qdisc::root(dev)?.is_default());
        }
    }

    // A configured root is reported, never replaced, and outlives
    // remove_ours.
    let veth = HostVeth::new("qdq", 1)?;
    let dev = veth.name();
    testbeds::run(
        "tc",
        &["qdisc", "add", "dev", dev, "root", "handle", "1:", "htb"],
    )?;
    let state = qdisc::ensure_fq(dev);
    let AckQdisc::Unavailable(why) = &state else {
        panic!("over a configured htb: {state:?}");
    };
    assert!(why.contains("configured root qdisc (htb 1:)"), "{why}");
    qdisc::remove_ours(dev);
    let root = qdisc::root(dev)?;
    assert_eq!((root.kind.as_str(), root.handle.as_str()), ("htb", "1:"));

    // A missing interface is named in the error.
    let gone = testbeds::unique("qdq");
    let e = qdisc::root(&gone).unwrap_err().to_string();
    assert!(e.contains(&gone), "{e}");
    let state = qdisc::ensure_fq(&gone);
    assert!(
        matches!(&state, AckQdisc::Failed(why) if why.contains(&gone)),
        "{state:?}"
    );
    Ok(())
}
