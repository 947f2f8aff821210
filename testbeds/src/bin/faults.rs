//! faults: what happens to enforcement and to the configured state when
//! qosd or its surroundings fail. Each fault runs against a real qosd (its
//! own socket, state and bpffs pin directory; `qosd --cleanup` afterwards)
//! and reports whether enforcement continued and whether configured state
//! was lost. Writes `<out>/faults.json` and a PNG per traffic fault.
//!
//! Traffic faults: two cgroups with guarantees of 30 % and 60 % of the
//! capacity send TCP flat out through a veth whose egress qosd shapes; the
//! receiver reports every 100 ms. The fault hits at 3 s.
//! - `sigkill`: qosd is SIGKILLed and started again 1 s later.
//! - `cgroup-removed`: cgroup A's sender is killed and its directory removed.
//! - `iface-down-up`: the shaped interface goes down for 1 s.
//!
//! Enforcement "continued" when no 300 ms after the fault carry more than
//! 110 % of the capacity (shaping gone would let the veth run at several
//! Gbit/s) and the guaranteed groups miss their guarantee in no more
//! windows during the fault than in as many windows before it.
//!
//! State faults:
//! - `restarts`: N restarts, SIGKILL and SIGTERM in turn, with quotas on K
//!   cgroups: after each, every quota is shown with its rate, the cgroup
//!   map holds the same number of entries, the same links are pinned.
//! - `cgroup-cycles`: N create / set quota / delete cycles
//!   (`follow_recreated_cgroups = false`): afterwards the datapath's cgroup
//!   map and the desired state are as before; qosd's resident memory is
//!   sampled along the way.
//! - `io-sigkill`: a buffered writer under an IO limit on a loop device;
//!   qosd is SIGKILLed: the limit stays in the kernel while it is down, the
//!   writer is not left paused after the restart, the limit is shown again.
//! - `device-vanish`: the loop device under an IO limit is detached while a
//!   writer runs: qosd keeps serving, counts the degradation, and the limit
//!   waits in the desired state for the device.
//! - `full-table`: quotas on 4095 cgroups, the most a direction holds: the
//!   4096th is refused with a message; the control step's duration and the
//!   API's latency at that size are reported.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Parser;
use qos_core::Rate;
use serde_json::{Value, json};
use testbeds::{
    CgroupDir, KillOnDrop, Placement,
    daemon::Qosd,
    fairness::{self, Windows},
    io::{IoCgroup, LoopFs, dd},
    iperf::{self, Client, ClientOpts, Server},
    net::EgressBed,
    plot::{Line, line_panels, rate_panels},
    run, wait_for,
};

const FAULTS: [&str; 8] = [
    "sigkill",
    "cgroup-removed",
    "iface-down-up",
    "restarts",
    "cgroup-cycles",
    "io-sigkill",
    "device-vanish",
    "full-table",
];

#[derive(Parser, Debug)]
#[command(about = "Faults against a running qosd: is enforcement continuous, is state kept?")]
struct Args {
    /// Faults to run (default: all).
    #[arg(long = "fault", value_parser = FAULTS)]
    faults: Vec<String>,
    /// Egress capacity shaped in the traffic faults.
    #[arg(long, default_value = "200mbit")]
    capacity: Rate,
    /// Seconds of traffic per traffic fault (the fault hits at 3 s).
    #[arg(long, default_value_t = 8.0)]
    duration: f64,
    /// Restarts in `restarts`.
    #[arg(long, default_value_t = 100)]
    restarts: u32,
    /// Cycles in `cgroup-cycles`.
    #[arg(long, default_value_t = 10_000)]
    cycles: u32,
    #[arg(long, default_value = "results/faults")]
    out: PathBuf,
    /// JSON only, no PNG.
    #[arg(long)]
    json_only: bool,
    /// Exit non-zero when a fault lost state or stopped enforcement.
    #[arg(long)]
    assert: bool,
    /// 100 ms windows below target during a traffic fault that still count
    /// as "continued", beyond those before it (noisy hosts, emulated VMs).
    #[arg(long, default_value_t = 0)]
    tolerate_windows: i64,
}

/// Highest total rate over the groups (three 100 ms windows, fraction of
/// the capacity) that still counts as enforcing.
const MAX_PEAK: f64 = 1.10;

fn main() -> ExitCode {
    let args = Args::parse();
    match run_all(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("faults: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn bin_dir() -> Result<PathBuf> {
    let me = std::env::current_exe()?;
    Ok(me.parent().context("binary directory")?.to_owned())
}

fn run_all(args: &Args) -> Result<bool> {
    if !nix::unistd::geteuid().is_root() {
        bail!("faults needs root (network namespaces, cgroups, eBPF)");
    }
    std::fs::create_dir_all(&args.out)?;
    let wanted: Vec<&str> = if args.faults.is_empty() {
        FAULTS.to_vec()
    } else {
        args.faults.iter().map(String::as_str).collect()
    };
    let bins = bin_dir()?;
    let mut reports = Vec::new();
    let mut ok = true;
    println!(
        "{:<15} {:>11} {:>10} {:>8}  details",
        "fault", "enforcing", "state kept", "seconds"
    );
    for fault in wanted {
        let t = Instant::now();
        let r = match fault {
            "sigkill" | "cgroup-removed" | "iface-down-up" => traffic_fault(fault, args, &bins),
            "restarts" => restarts(args, &bins),
            "cgroup-cycles" => cgroup_cycles(args, &bins),
            "io-sigkill" => io_sigkill(&bins),
            "device-vanish" => device_vanish(&bins),
            "full-table" => full_table(&bins),
            _ => unreachable!("clap checks the names"),
        }
        .with_context(|| format!("fault {fault}"))?;
        let enforcing = r["enforcement_continued"].as_bool();
        let kept = r["state_kept"].as_bool();
        println!(
            "{:<15} {:>11} {:>10} {:>8.1}  {}",
            fault,
            enforcing.map_or("-", |b| if b { "yes" } else { "NO" }),
            kept.map_or("-", |b| if b { "yes" } else { "NO" }),
            t.elapsed().as_secs_f64(),
            r["summary"].as_str().unwrap_or("")
        );
        if enforcing == Some(false) || kept == Some(false) {
            ok = false;
        }
        reports.push(r);
    }
    let path = args.out.join("faults.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&json!({ "faults": reports }))?,
    )
    .with_context(|| format!("writing {}", path.display()))?;
    println!("faults: {}", path.display());
    Ok(ok || !args.assert)
}

/// The egress bed, two guaranteed cgroups, a qosd shaping them.
struct TrafficBed {
    bed: EgressBed,
    _parent: CgroupDir,
    dirs: Vec<PathBuf>,
    names: Vec<String>,
    guarantees: Vec<u64>,
    qosd: Qosd,
}

fn traffic_bed(args: &Args, bins: &Path) -> Result<TrafficBed> {
    let bed = EgressBed::new(2, 0)?;
    let parent = CgroupDir::new("qos-faults-")?;
    let cap = args.capacity.bits_per_sec();
    let qosd = Qosd::start(
        bins,
        "info",
        "",
        &shaping(bed.shaped_if(), &args.capacity.to_string()),
    )?;
    let mut dirs = Vec::new();
    let mut names = Vec::new();
    let mut guarantees = Vec::new();
    for (g, permille) in [("a", 300u64), ("b", 600)] {
        dirs.push(parent.child(g)?);
        let name = parent.child_name(g);
        let rate = cap * permille / 1000;
        qosd.ok(&[
            "net",
            "set",
            &name,
            "--rate",
            &Rate::from_bits_per_sec(rate)?.to_string(),
        ])?;
        names.push(name);
        guarantees.push(rate);
    }
    Ok(TrafficBed {
        bed,
        _parent: parent,
        dirs,
        names,
        guarantees,
        qosd,
    })
}

/// What a traffic fault does at 3 s, given the bed and the running
/// senders (which it may stop); what it says goes into the report.
type FaultAction<'a> = dyn FnMut(&mut TrafficBed, &mut [Option<Client>]) -> Result<Value> + 'a;

/// Runs both groups' traffic for `seconds`, calling `at_fault` at 3 s;
/// returns per-group 100 ms windows (wire bits/s) and what `at_fault` said.
fn traffic(
    tb: &mut TrafficBed,
    seconds: f64,
    at_fault: &mut FaultAction<'_>,
) -> Result<(Vec<Windows>, Value)> {
    let tmp = tempfile::Builder::new().prefix("qosfaults").tempdir()?;
    let peer = Placement {
        cgroup: None,
        netns: Some(tb.bed.peer.path()),
    };
    let mut servers = Vec::new();
    let mut clients = Vec::new();
    for (i, dir) in tb.dirs.iter().enumerate() {
        let port = 5600 + i as u16;
        servers.push(Server::start(&peer, tb.bed.peer_ip, port, tmp.path(), 0.1)?);
        let place = Placement {
            cgroup: Some(dir.clone()),
            netns: None,
        };
        let opts = ClientOpts {
            seconds,
            parallel: 4,
            udp_bps: None,
            bind: Some(tb.bed.sender_ips[i].into()),
            tos: None,
            pacing_bps: None,
            tcp_bps: None,
            socket_buffer: None,
            interval: None,
        };
        clients.push(Some(Client::start(
            &place,
            tb.bed.peer_ip,
            port,
            &opts,
            tmp.path(),
        )?));
    }
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    let said = at_fault(tb, &mut clients)?;
    let rest = Duration::from_secs_f64(seconds + 1.0).saturating_sub(t0.elapsed());
    std::thread::sleep(rest);
    let mut windows = Vec::new();
    for (c, s) in clients.into_iter().zip(servers) {
        if let Some(c) = c {
            let _ = c.finish(Duration::from_secs(20));
        }
        let report = s.finish(Duration::from_secs(20)).unwrap_or_default();
        windows.push(
            report
                .intervals
                .iter()
                .filter(|(a, b, _)| b - a >= 0.05)
                .map(|(a, b, bytes)| {
                    (
                        *a,
                        *b,
                        iperf::wire_bytes(*bytes, false) as f64 * 8.0 / (b - a),
                    )
                })
                .collect(),
        );
    }
    Ok((windows, said))
}

/// Windows of a group in [from, to) below `target`.
fn misses(w: &Windows, from: f64, to: f64, target: f64) -> usize {
    fairness::rates_between(w, from, to)
        .iter()
        .filter(|r| **r < target)
        .count()
}

/// The highest total rate over the groups from `from` on, averaged over
/// three 100 ms windows: one window can hold a 64 KB segment more or less
/// (5 % of 100 Mbit/s), a lost datapath shows as several times the capacity
/// for as long as it is lost.
///
/// Windows that end after `to` are left out: in the 6.1 VM the last ones of
/// the receivers' reports held 1.03-1.15 times the capacity in every run
/// (the end of the run, not the fault). Also returns where the three
/// windows start (s), to tell a lasting loss from a burst.
fn peak_total(windows: &[Windows], from: f64, to: f64) -> (f64, f64) {
    let n = windows.iter().map(Vec::len).max().unwrap_or(0);
    let totals: Vec<(f64, f64)> = (0..n)
        .filter_map(|k| {
            let (start, end) = windows.iter().find_map(|w| w.get(k).map(|x| (x.0, x.1)))?;
            (start >= from && end <= to).then(|| {
                (
                    start,
                    windows.iter().filter_map(|w| w.get(k)).map(|x| x.2).sum(),
                )
            })
        })
        .collect();
    totals
        .windows(3)
        .map(|t| (t.iter().map(|x| x.1).sum::<f64>() / 3.0, t[0].0))
        .fold((0.0, 0.0), |best, x| if x.0 > best.0 { x } else { best })
}

fn traffic_fault(fault: &str, args: &Args, bins: &Path) -> Result<Value> {
    let mut tb = traffic_bed(args, bins)?;
    let cap = args.capacity.bits_per_sec() as f64;
    let mut at_fault = |tb: &mut TrafficBed, clients: &mut [Option<Client>]| -> Result<Value> {
        match fault {
            "sigkill" => {
                tb.qosd.kill()?;
                let down = Instant::now();
                std::thread::sleep(Duration::from_secs(1));
                tb.qosd.restart()?;
                Ok(json!({ "down_s": down.elapsed().as_secs_f64() }))
            }
            "cgroup-removed" => {
                // A cgroup with tasks cannot be removed: its sender goes first.
                if let Some(c) = clients[0].take() {
                    c.stop();
                }
                let t = Instant::now();
                remove_cgroup(&tb.dirs[0])?;
                let name = tb.names[0].clone();
                let gone = wait_for(Duration::from_secs(5), || {
                    tb.qosd
                        .json(&["net", "show"])
                        .is_ok_and(|v| !classes(&v).contains(&name))
                });
                let waiting = tb
                    .qosd
                    .json(&["status"])
                    .map(|s| {
                        s["waiting"]
                            .as_array()
                            .is_some_and(|w| w.iter().any(|x| x == name.as_str()))
                    })
                    .unwrap_or(false);
                Ok(json!({
                    "class_removed": gone,
                    "removed_after_ms": gone.then(|| t.elapsed().as_secs_f64() * 1000.0),
                    "quota_waits": waiting,
                }))
            }
            "iface-down-up" => {
                run("ip", &["link", "set", tb.bed.shaped_if(), "down"])?;
                std::thread::sleep(Duration::from_secs(1));
                run("ip", &["link", "set", tb.bed.shaped_if(), "up"])?;
                Ok(json!({ "down_s": 1.0 }))
            }
            _ => unreachable!(),
        }
    };
    let (windows, said) = traffic(&mut tb, args.duration, &mut at_fault)?;
    // The fault window: 3 s to 5 s (down time and recovery); the baseline:
    // 1 s to 3 s (after the start-up second).
    let (fault_from, fault_to) = (3.0, 5.0);
    let groups_judged: Vec<usize> = match fault {
        // A's traffic stops at the fault by design.
        "cgroup-removed" => vec![1],
        // No traffic flows while the link is down: judged from recovery.
        _ => vec![0, 1],
    };
    let mut per_group = Vec::new();
    let mut extra_misses = 0i64;
    for (i, w) in windows.iter().enumerate() {
        let target = 0.97 * tb.guarantees[i] as f64;
        let before = misses(w, 1.0, 3.0, target);
        let during = if fault == "iface-down-up" {
            misses(w, 5.0, 7.0, target)
        } else {
            misses(w, fault_from, fault_to, target)
        };
        if groups_judged.contains(&i) {
            extra_misses += during as i64 - before as i64;
        }
        per_group.push(json!({
            "cgroup": tb.names[i],
            "guarantee_bps": tb.guarantees[i],
            "misses_before": before,
            "misses_during_fault": during,
            "mean_before_bps": fairness::mean_between(w, 1.0, 3.0),
            "mean_after_bps": fairness::mean_between(w, 5.0, args.duration - 0.1),
            "windows": w,
        }));
    }
    let (peak, peak_at) = peak_total(&windows, 1.0, args.duration - 0.5);
    let peak = peak / cap;
    let enforcing = peak <= MAX_PEAK && extra_misses <= args.tolerate_windows;
    let state_kept = match fault {
        // Both quotas (A's waiting for its cgroup) are still there.
        "cgroup-removed" => {
            said["quota_waits"].as_bool().unwrap_or(false)
                && said["class_removed"].as_bool().unwrap_or(false)
        }
        _ => {
            let v = tb.qosd.json(&["net", "show"])?;
            tb.names.iter().all(|n| classes(&v).contains(n))
        }
    };
    if !args.json_only {
        let series: Vec<Line> = windows
            .iter()
            .enumerate()
            .map(|(i, w)| Line {
                label: tb.names[i].rsplit('/').next().unwrap_or("").to_owned(),
                points: w.iter().map(|(a, b, r)| ((a + b) / 2.0, r / 1e6)).collect(),
                expected: Some(tb.guarantees[i] as f64 / 1e6),
            })
            .collect();
        rate_panels(
            &args.out.join(format!("{fault}.png")),
            &format!("faults {fault} at 3 s: receive rate per cgroup"),
            "Mbit/s",
            &[(format!("qosd, capacity {}", args.capacity), series)],
        )?;
    }
    Ok(json!({
        "fault": fault,
        "enforcement_continued": enforcing,
        "state_kept": state_kept,
        "peak_total_over_capacity": peak,
        "peak_at_s": peak_at,
        "max_peak": MAX_PEAK,
        "extra_missed_windows": extra_misses,
        "fault_report": said,
        "groups": per_group,
        "summary": format!(
            "peak total {:.2}x capacity at {:.1} s (fault at 3 s); {} more 100 ms windows below 97 % of a guarantee during the fault than before{}",
            peak,
            peak_at,
            extra_misses.max(0),
            said["removed_after_ms"].as_f64().map_or(String::new(), |ms| format!("; class removed {ms:.0} ms after the cgroup")),
        ),
    }))
}

fn remove_cgroup(dir: &Path) -> Result<()> {
    // The killed sender may take a moment to leave.
    if !wait_for(Duration::from_secs(5), || std::fs::remove_dir(dir).is_ok()) {
        bail!("{} could not be removed", dir.display());
    }
    Ok(())
}

/// The `[net]` table of a qosd shaping `iface` (no default guarantee, no
/// container taggers).
fn shaping(iface: &str, capacity: &str) -> String {
    format!(
        "[net]\ninterface = \"{iface}\"\negress_capacity = \"{capacity}\"\ndefault_rate = \"0\"\ncontainer_interfaces = \"none\"\n"
    )
}

fn classes(v: &Value) -> Vec<String> {
    v["classes"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|c| c["cgroup"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

fn metrics(q: &Qosd) -> Result<Value> {
    let mut c = qos::client::Client::connect(&q.socket)?;
    match c.call(&qos::protocol::Request::Metrics)? {
        qos::protocol::Reply::Metrics(s) => Ok(serde_json::to_value(*s)?),
        _ => bail!("unexpected reply to metrics"),
    }
}

fn restarts(args: &Args, bins: &Path) -> Result<Value> {
    let bed = EgressBed::new(1, 0)?;
    let parent = CgroupDir::new("qos-faults-")?;
    let mut q = Qosd::start(bins, "warn", "", &shaping(bed.shaped_if(), "1gbit"))?;
    let mut names = Vec::new();
    for i in 0..8 {
        parent.child(&format!("c{i}"))?;
        let name = parent.child_name(&format!("c{i}"));
        q.ok(&["net", "set", &name, "--rate", &format!("{}mbit", 10 + i)])?;
        names.push(name);
    }
    let expected = q.json(&["net", "show"])?;
    let rates = |v: &Value| -> Vec<(String, String)> {
        let mut r: Vec<(String, String)> = v["classes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| {
                Some((
                    c["cgroup"].as_str()?.to_owned(),
                    c["rate"].as_str()?.to_owned(),
                ))
            })
            .collect();
        r.sort();
        r
    };
    let want = rates(&expected);
    let entries0 = metrics(&q)?["daemon"]["net_cgroup_entries"].as_u64();
    let links0 = pinned_link_count(&q.pins);
    let mut lost = 0;
    let mut leaked = 0;
    let mut ready_ms = Vec::new();
    for i in 0..args.restarts {
        if i % 2 == 0 {
            q.kill()?
        } else {
            q.stop()?
        }
        let t = Instant::now();
        q.restart()?;
        ready_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        if rates(&q.json(&["net", "show"])?) != want {
            lost += 1;
        }
        if metrics(&q)?["daemon"]["net_cgroup_entries"].as_u64() != entries0
            || pinned_link_count(&q.pins) != links0
        {
            leaked += 1;
        }
    }
    ready_ms.sort_by(f64::total_cmp);
    let p50 = fairness::percentile(&ready_ms, 50.0).unwrap_or(0.0);
    let max = ready_ms.last().copied().unwrap_or(0.0);
    Ok(json!({
        "fault": "restarts",
        "restarts": args.restarts,
        "quotas": names.len(),
        "state_kept": lost == 0,
        "enforcement_continued": leaked == 0,
        "restarts_losing_state": lost,
        "restarts_changing_datapath_entries_or_links": leaked,
        "restart_to_ready_ms_p50": p50,
        "restart_to_ready_ms_max": max,
        "summary": format!(
            "{} restarts (SIGKILL and SIGTERM in turn) with {} quotas: {lost} lost state, {leaked} changed map entries or pinned links; ready in {p50:.0} ms (p50), {max:.0} ms (max)",
            args.restarts, names.len()
        ),
    }))
}

fn pinned_link_count(pins: &Path) -> usize {
    std::fs::read_dir(pins)
        .into_iter()
        .flatten()
        .flatten()
        .map(|g| {
            std::fs::read_dir(g.path().join("links")).map_or(0, Iterator::count)
                + std::fs::read_dir(g.path().join("tc")).map_or(0, Iterator::count)
        })
        .sum()
}

fn cgroup_cycles(args: &Args, bins: &Path) -> Result<Value> {
    let bed = EgressBed::new(1, 0)?;
    let parent = CgroupDir::new("qos-faults-")?;
    let q = Qosd::start(
        bins,
        "warn",
        "follow_recreated_cgroups = false",
        &shaping(bed.shaped_if(), "100gbit"),
    )?;
    let m0 = metrics(&q)?;
    let entries0 = m0["daemon"]["net_cgroup_entries"].as_u64().unwrap_or(0);
    let mut client = qos::client::Client::connect(&q.socket)?;
    let mut samples = Vec::new();
    let t = Instant::now();
    let step = (args.cycles / 20).max(1);
    for i in 0..args.cycles {
        let name = format!("cycle{i}");
        let dir = parent.child(&name)?;
        client.call(&egress_1mbit(parent.child_name(&name))?)?;
        std::fs::remove_dir(&dir).with_context(|| format!("removing {}", dir.display()))?;
        if i % step == 0 || i + 1 == args.cycles {
            let m = metrics(&q)?;
            samples.push(json!({
                "cycle": i + 1,
                "resident_bytes": m["daemon"]["resident_bytes"],
                "net_cgroup_entries": m["daemon"]["net_cgroup_entries"],
            }));
        }
    }
    let cycle_secs = t.elapsed().as_secs_f64();
    // Every removal is noticed within a second.
    let settled = wait_for(Duration::from_secs(3), || {
        metrics(&q).is_ok_and(|m| m["daemon"]["net_cgroup_entries"].as_u64() == Some(entries0))
    });
    let m1 = metrics(&q)?;
    let state: Value = serde_json::from_str(
        &std::fs::read_to_string(q.state_dir().join("state.json")).unwrap_or_else(|_| "{}".into()),
    )?;
    let state_quotas = state["net"].as_object().map_or(0, serde_json::Map::len);
    let shown = classes(&q.json(&["net", "show"])?).len();
    let rss = |m: &Value| m["daemon"]["resident_bytes"].as_f64().unwrap_or(0.0);
    // Growth over the second half of the cycles: the first half warms the
    // allocator up to the most entries pending at once (removals are
    // noticed every 400 ms).
    let warm = samples
        .get(samples.len() / 2)
        .and_then(|s| s["resident_bytes"].as_f64())
        .unwrap_or(rss(&m0));
    let growth = rss(&m1) - warm;
    let no_leak = settled && state_quotas == 0 && shown == 1 && growth < 1048576.0;
    if !args.json_only {
        let rss_line = Line {
            label: "qosd resident MiB".into(),
            points: samples
                .iter()
                .filter_map(|s| {
                    Some((
                        s["cycle"].as_f64()?,
                        s["resident_bytes"].as_f64()? / 1048576.0,
                    ))
                })
                .collect(),
            expected: None,
        };
        let entries_line = Line {
            label: "datapath cgroup map entries".into(),
            points: samples
                .iter()
                .filter_map(|s| Some((s["cycle"].as_f64()?, s["net_cgroup_entries"].as_f64()?)))
                .collect(),
            expected: None,
        };
        line_panels(
            &args.out.join("cgroup-cycles.png"),
            &format!(
                "faults cgroup-cycles: {} create / quota / delete cycles",
                args.cycles
            ),
            "cycles",
            "",
            &[
                ("qosd resident memory (MiB)".into(), vec![rss_line]),
                ("cgroup map entries".into(), vec![entries_line]),
            ],
        )?;
    }
    Ok(json!({
        "fault": "cgroup-cycles",
        "cycles": args.cycles,
        "cycles_per_s": f64::from(args.cycles) / cycle_secs,
        "state_kept": no_leak,
        "map_entries_before": entries0,
        "map_entries_after": m1["daemon"]["net_cgroup_entries"],
        "state_quotas_after": state_quotas,
        "classes_shown_after": shown,
        "resident_bytes_start": rss(&m0),
        "resident_bytes_warm": warm,
        "resident_bytes_end": rss(&m1),
        "samples": samples,
        "summary": format!(
            "{} cycles at {:.0}/s: map entries {} -> {}, {} quotas left in the state, RSS {:.1} -> {:.1} MiB (second half {:+.2} MiB)",
            args.cycles,
            f64::from(args.cycles) / cycle_secs,
            entries0,
            m1["daemon"]["net_cgroup_entries"],
            state_quotas,
            rss(&m0) / 1048576.0,
            rss(&m1) / 1048576.0,
            growth / 1048576.0
        ),
    }))
}

fn io_sigkill(bins: &Path) -> Result<Value> {
    const MIB: u64 = 1 << 20;
    let fs = LoopFs::new("ext4", 512, true)?;
    let g = IoCgroup::new("qos-faults-io-")?;
    let mut q = Qosd::start(bins, "info", "", "[io]\nenabled = true\n")?;
    q.ok(&[
        "io",
        "set",
        g.name(),
        "--device",
        &fs.devno(),
        "--write-bps",
        "8MiB",
    ])?;
    let _writer = KillOnDrop(g.spawn(&mut dd(&fs.mount().join("w.bin"), 300, false))?);
    let rule = || kernel_write_rule(&g, &fs.devno());
    // Under load; where qosd pauses writers (v1), kill it while it does.
    let paused_at_kill = wait_for(Duration::from_secs(5), || g.frozen());
    q.kill()?;
    let kept_while_down = rule() == Some(8 * MIB);
    let left_paused = g.frozen();
    std::thread::sleep(Duration::from_millis(500));
    q.restart()?;
    // Writers the dead qosd left paused are thawed at start; the new qosd
    // may pause them again itself, which its status then says.
    let thawed_at_start = !left_paused
        || q.log()
            .contains("thawed writers a previous qosd left paused");
    let consistent = wait_for(Duration::from_secs(5), || {
        !g.frozen()
            || q.json(&["io", "show"]).is_ok_and(|v| {
                v["groups"].as_array().is_some_and(|a| {
                    a.iter()
                        .any(|x| x["cgroup"] == g.name() && x["state"] != "running")
                })
            })
    });
    let v = q.json(&["io", "show"])?;
    let shown = v["groups"]
        .as_array()
        .is_some_and(|a| a.iter().any(|x| x["cgroup"] == g.name()));
    Ok(json!({
        "fault": "io-sigkill",
        "enforcement_continued": kept_while_down && thawed_at_start && consistent,
        "state_kept": shown,
        "limit_in_kernel_while_down": kept_while_down,
        "writers_paused_when_killed": paused_at_kill,
        "writers_left_paused_by_the_dead_qosd": left_paused,
        "thawed_at_start": thawed_at_start,
        "pause_state_matches_the_new_qosd": consistent,
        "summary": format!(
            "limit {} in the kernel while qosd was down; writers {} when it was killed, {} at the restart",
            if kept_while_down { "stayed" } else { "was LOST" },
            if left_paused { "paused" } else { "running" },
            if !left_paused {
                "nothing to thaw"
            } else if thawed_at_start {
                "thawed"
            } else {
                "NOT thawed"
            }
        ),
    }))
}

fn device_vanish(bins: &Path) -> Result<Value> {
    let mut fs = LoopFs::new("ext4", 256, true)?;
    let g = IoCgroup::new("qos-faults-io-")?;
    let q = Qosd::start(bins, "info", "", "[io]\nenabled = true\n")?;
    let devno = fs.devno();
    q.ok(&[
        "io",
        "set",
        g.name(),
        "--device",
        &devno,
        "--write-bps",
        "8MiB",
    ])?;
    // A loop device can only go once nothing holds it: the writer's data
    // is written back first (16 MiB at the limit: about 2 s).
    let mut writer = KillOnDrop(g.spawn(&mut dd(&fs.mount().join("w.bin"), 16, false))?);
    writer.0.wait()?;
    run("sync", &["-f", &fs.mount().display().to_string()])?;
    fs.remove_device()?;
    let waiting = format!("{} on {devno} (io)", g.name());
    let waits = wait_for(Duration::from_secs(5), || {
        q.json(&["status"]).is_ok_and(|s| {
            s["waiting"]
                .as_array()
                .is_some_and(|w| w.iter().any(|x| x == waiting.as_str()))
        })
    });
    let serving = q.ok(&["io", "show"]).is_ok() && q.pid().is_some();
    let degradations = metrics(&q)?["daemon"]["degradations"].clone();
    Ok(json!({
        "fault": "device-vanish",
        "state_kept": waits && serving,
        "limit_waits_for_the_device": waits,
        "daemon_serving": serving,
        "degradations": degradations,
        "summary": format!(
            "limit {} for the device; qosd {}; degradations {degradations}",
            if waits { "waits" } else { "was NOT kept waiting" },
            if serving { "serving" } else { "NOT serving" }
        ),
    }))
}

fn full_table(bins: &Path) -> Result<Value> {
    let bed = EgressBed::new(1, 0)?;
    let parent = CgroupDir::new("qos-faults-")?;
    let q = Qosd::start(bins, "warn", "", &shaping(bed.shaped_if(), "1000gbit"))?;
    let mut client = qos::client::Client::connect(&q.socket)?;
    let mut set = |i: u32| -> Result<std::result::Result<(), String>> {
        let name = format!("c{i}");
        parent.child(&name)?;
        Ok(client
            .call(&egress_1mbit(parent.child_name(&name))?)
            .map(|_| ())
            .map_err(|e| e.to_string()))
    };
    let max = netqos::MAX_QUOTAS;
    let mut latencies = Vec::new();
    let t = Instant::now();
    for i in 0..max {
        let call = Instant::now();
        if let Err(e) = set(i)? {
            bail!("quota {i} of {max} refused: {e}");
        }
        latencies.push(call.elapsed().as_secs_f64() * 1000.0);
    }
    let fill_s = t.elapsed().as_secs_f64();
    let refused = set(max)?;
    // A few seconds at full size for the step figures.
    std::thread::sleep(Duration::from_secs(3));
    let m = metrics(&q)?;
    let mut probe = Vec::new();
    for _ in 0..20 {
        let call = Instant::now();
        q.ok(&["status"])?;
        probe.push(call.elapsed().as_secs_f64() * 1000.0);
    }
    probe.sort_by(f64::total_cmp);
    latencies.sort_by(f64::total_cmp);
    let refused_ok = refused
        .as_ref()
        .err()
        .is_some_and(|e| e.contains("quota slots of this direction are in use"));
    let step_last = m["daemon"]["control_step_last_ms"].as_f64().unwrap_or(0.0);
    let step_max = m["daemon"]["control_step_max_ms"].as_f64().unwrap_or(0.0);
    let status_p50 = fairness::percentile(&probe, 50.0).unwrap_or(0.0);
    let set_p99 = fairness::percentile(&latencies, 99.0).unwrap_or(0.0);
    Ok(json!({
        "fault": "full-table",
        "state_kept": refused_ok,
        "quotas": max,
        "fill_seconds": fill_s,
        "set_latency_ms_p50": fairness::percentile(&latencies, 50.0),
        "set_latency_ms_p99": set_p99,
        "status_latency_ms_p50_full": status_p50,
        "control_step_last_ms": step_last,
        "control_step_max_ms": step_max,
        "refused": refused.err(),
        "summary": format!(
            "{max} quotas set in {fill_s:.0} s (p99 {set_p99:.1} ms per call), the next refused{}; at full size a control step takes {step_last:.1} ms (due every 10 ms), qosctl status {status_p50:.0} ms",
            if refused_ok { "" } else { " NOT" }
        ),
    }))
}

/// The write bytes/s rule the kernel holds for the cgroup on the device.
fn kernel_write_rule(g: &IoCgroup, devno: &str) -> Option<u64> {
    if let Ok(v1) = g.read("blkio.throttle.write_bps_device") {
        return v1
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{devno} "))?.trim().parse().ok())
            .filter(|v| *v > 0);
    }
    let v2 = g.read("io.max").ok()?;
    v2.lines()
        .find(|l| l.starts_with(&format!("{devno} ")))?
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("wbps=")?.parse().ok())
}

/// An egress quota of 1 Mbit/s for `cgroup` (the cycles and the full table
/// set thousands of them).
fn egress_1mbit(cgroup: String) -> Result<qos::protocol::Request> {
    Ok(qos::protocol::Request::NetSet {
        cgroup,
        rate: Some("1mbit".parse()?),
        ceil: None,
        priority: 0,
        ingress_rate: None,
        ingress_ceil: None,
    })
}
