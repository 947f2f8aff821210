//! Helpers shared by the root integration tests.
#![allow(clippy::expect_used, reason = "test code: a failure panics")]

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use netqos::Shaper;

/// Runs the shaper's control loop on a thread until the returned flag is
/// set, recording `observe(shaper)` after every control step (what the
/// status shows while traffic runs; `|_| ()` for nothing).
pub fn control_loop<T: Send + 'static>(
    shaper: Shaper,
    mut observe: impl FnMut(&Shaper) -> T + Send + 'static,
) -> (Arc<AtomicBool>, std::thread::JoinHandle<(Shaper, Vec<T>)>) {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let h = std::thread::spawn(move || {
        let mut shaper = shaper;
        let mut seen = Vec::new();
        while !flag.load(Ordering::Relaxed) {
            shaper.tick().expect("control step");
            seen.push(observe(&shaper));
            std::thread::sleep(netqos::TICK);
        }
        (shaper, seen)
    });
    (stop, h)
}

/// tc programs attached to `iface` in one direction, as the kernel lists
/// them: tcx links on 6.6+, cls_bpf filters under clsact before.
pub fn tc_programs(iface: &str, kind: aya::programs::TcAttachType) -> anyhow::Result<usize> {
    use netqos::datapath::{TcAttachMode, tc_attach_mode};
    if tc_attach_mode() == TcAttachMode::Tcx {
        let (_, progs) = aya::programs::SchedClassifier::query_tcx(iface, kind)?;
        return Ok(progs.len());
    }
    let dir = match kind {
        aya::programs::TcAttachType::Egress => "egress",
        _ => "ingress",
    };
    // "filter protocol all pref 49152 bpf chain 0 handle 0x1 qos_egress direct-action ..."
    let out = testbeds::run("tc", &["filter", "show", "dev", iface, dir])?;
    Ok(out
        .lines()
        .filter(|l| l.contains(" bpf ") && l.contains("handle"))
        .count())
}

/// [`tc_programs`] once none is left or `timeout` passed. A detached link
/// lives on while another reference to it does: a child process that
/// another test thread forked holds a copy of every descriptor until it
/// execs (seen once in a CI run: the ingress tagger listed right after
/// stop).
pub fn tc_programs_left(
    iface: &str,
    kind: aya::programs::TcAttachType,
    timeout: std::time::Duration,
) -> anyhow::Result<usize> {
    testbeds::wait_for(timeout, || matches!(tc_programs(iface, kind), Ok(0)));
    tc_programs(iface, kind)
}

/// Program ids of `ids` the kernel still has loaded, `timeout` after they
/// were detached. The kernel frees a detached program asynchronously (a
/// cgroup's program array is released from a work queue), so this polls.
pub fn still_loaded(ids: &[u32], timeout: std::time::Duration) -> Vec<u32> {
    let left = || -> Vec<u32> {
        let loaded: Vec<u32> = aya::programs::loaded_programs()
            .filter_map(|p| p.ok())
            .map(|p| p.id())
            .collect();
        ids.iter()
            .copied()
            .filter(|id| loaded.contains(id))
            .collect()
    };
    testbeds::wait_for(timeout, || left().is_empty());
    left()
}

/// Every rate of the traffic tests is multiplied by `QOS_TEST_RATE_SCALE`
/// (default 1): an emulated VM cannot carry a gigabit, and the shares are
/// what the tests check. Measured rates are divided by it again, so the
/// assertions read the same on every machine.
pub fn rate_scale() -> f64 {
    let scale = std::env::var("QOS_TEST_RATE_SCALE")
        .ok()
        .map(|s| {
            s.parse::<f64>()
                .expect("QOS_TEST_RATE_SCALE must be a number")
        })
        .unwrap_or(1.0);
    assert!(
        scale > 0.0 && scale <= 1.0,
        "QOS_TEST_RATE_SCALE must be in (0, 1], got {scale}"
    );
    scale
}

/// `rate` (tc units) times [`rate_scale`].
pub fn scaled(rate: &str) -> anyhow::Result<qos_core::Rate> {
    let r: qos_core::Rate = rate.parse()?;
    Ok(qos_core::Rate::from_bits_per_sec(
        (r.bits_per_sec() as f64 * rate_scale()) as u64,
    )?)
}

/// One TCP flow of 3 s from `client` (bound to `bind`) to a server at
/// `server_ip:port` in `server`, with the shaper's control loop running
/// meanwhile; then stops the shaper. Returns its last status and the Mbit/s
/// the server received on the wire. The tests of traffic that must not be held by the opposite
/// direction's quota (a download's ACKs, an upload's ACKs) run one each.
pub fn one_flow_under_control(
    shaper: Shaper,
    server: &testbeds::Placement,
    server_ip: std::net::Ipv4Addr,
    client: &testbeds::Placement,
    bind: Option<std::net::Ipv4Addr>,
    port: u16,
    out_dir: &std::path::Path,
) -> anyhow::Result<(netqos::NetStatus, f64)> {
    use std::time::Duration;
    use testbeds::iperf::{Client, ClientOpts, Server, wire_bytes};
    const SECS: f64 = 3.0;

    let (stop, handle) = control_loop(shaper, |_| ());
    let flow = (|| {
        let srv = Server::start(server, server_ip, port, out_dir, 0.1)?;
        let opts = ClientOpts {
            seconds: SECS,
            parallel: 1,
            udp_bps: None,
            bind: bind.map(Into::into),
            tos: None,
            pacing_bps: None,
            tcp_bps: None,
            socket_buffer: None,
            interval: None,
        };
        let cl = Client::start(client, server_ip, port, &opts, out_dir)?;
        cl.finish(Duration::from_secs(30))?;
        srv.finish(Duration::from_secs(20))
    })();
    stop.store(true, Ordering::Relaxed);
    let (shaper, _) = handle.join().expect("control thread");
    let status = shaper.status();
    shaper.stop();
    let bytes = flow?.bytes;
    Ok((status, wire_bytes(bytes, false) as f64 * 8.0 / SECS / 1e6))
}

/// Calls `run` up to `tries` times while the rates it measured (`rates`)
/// miss `shares_ok`, printing every try that missed; returns the last
/// outcome, whose shares the caller asserts. For traffic tests on the
/// host's two CPUs, where a slow spell of the host can move less than the
/// capacity.
pub fn retry_while_shares_off<T>(
    tries: u32,
    mut run: impl FnMut() -> anyhow::Result<T>,
    rates: impl Fn(&T) -> &[f64],
    shares_ok: impl Fn(&[f64]) -> bool,
) -> anyhow::Result<T> {
    let mut o = run()?;
    for attempt in 2..=tries {
        let r = rates(&o);
        if shares_ok(r) {
            break;
        }
        eprintln!(
            "shares off in try {} (total {:.0} Mbit/s): {r:?}; trying again",
            attempt - 1,
            r.iter().sum::<f64>()
        );
        o = run()?;
    }
    Ok(o)
}
