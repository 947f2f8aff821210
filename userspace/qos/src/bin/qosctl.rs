//! qosctl: talks to qosd over its socket.

use std::{path::PathBuf, time::Duration};

use blkio::{ByteRate, Device, IoLimits, IoStatus, policy::MAX_IOPS};
use clap::{Parser, Subcommand, ValueEnum};
use emc::{MemStatus, policy::format_bytes};
use netqos::{NetClassStatus, NetStatus};
use qos::{
    Status,
    client::{Client, ClientError},
    config::DEFAULT_SOCKET,
    metrics::{Snapshot, TopRow},
    protocol::{Reply, Request},
};
use qos_core::{Rate, Size, units::format_bps};

const RATE_HELP: &str = "RATE uses tc units: bit, kbit, mbit, gbit, tbit are BITS per second; \
bps, kbps, mbps, gbps, tbps are BYTES per second (10mbps = 80mbit); a bare number is bits per \
second; kibit, mibps, ... are binary (1024) multiples; decimals are allowed (1.5gbit).";

const SIZE_HELP: &str = "SIZE is bytes with binary multiples: 512M = 512MiB = 512 × 2^20; \
K, M, G, T with an optional i and B.";

const BYTE_RATE_HELP: &str = "RATE is BYTES per second with binary multiples: 20MiB = 20M/s = \
20 × 2^20 bytes/s; K, M, G, T with an optional i and B, an optional /s or ps; a bare number is \
bytes per second. DEV is a block device path (/dev/sdb) or major:minor (8:16).";

/// Control qosd: per-cgroup network, memory and disk IO quotas, status.
#[derive(Parser, Debug)]
#[command(version, about, after_help = RATE_HELP)]
struct Args {
    /// qosd's API socket.
    #[arg(long, global = true, default_value = DEFAULT_SOCKET, env = "QOSD_SOCKET")]
    socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Daemon and host overview.
    Status {
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Network bandwidth quotas (egress and ingress).
    Net {
        #[command(subcommand)]
        command: NetCommand,
    },
    /// Elastic memory: guarantees, limits, priorities.
    Mem {
        #[command(subcommand)]
        command: MemCommand,
    },
    /// Disk IO: byte rates, IOPS and weights per cgroup and device.
    Io {
        #[command(subcommand)]
        command: IoCommand,
    },
    /// Live per-cgroup view, refreshed every second: bandwidth out and in,
    /// disk IO, memory, throttling (drops, CE marks, window clamps; paused
    /// IO; memory reclaim).
    Top {
        /// Seconds between refreshes.
        #[arg(long, default_value_t = 1.0, value_parser = parse_interval)]
        interval: f64,
        /// Print one view (over one interval) and exit.
        #[arg(long)]
        once: bool,
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish,
    /// powershell) to stdout.
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand, Debug)]
enum IoCommand {
    /// Limit a cgroup's IO on one device: byte rates and IOPS per
    /// direction, and a weight (its share of the device among the busy
    /// cgroups with a weight). Buffered writes count against the cgroup
    /// that dirtied the pages. Replaces the cgroup's limits on that device.
    #[command(after_help = BYTE_RATE_HELP)]
    Set {
        /// cgroup: a path relative to the cgroup mounts ("tenants/a") or an
        /// absolute path under the blkio hierarchy or the cgroup2 mount.
        cgroup: String,
        /// Block device: a path (/dev/sdb) or major:minor (8:16).
        #[arg(long, value_name = "DEV")]
        device: String,
        /// Most bytes per second written to the device.
        #[arg(long, value_name = "RATE", value_parser = parse_byte_rate)]
        write_bps: Option<ByteRate>,
        /// Most bytes per second read from the device.
        #[arg(long, value_name = "RATE", value_parser = parse_byte_rate)]
        read_bps: Option<ByteRate>,
        /// Most write operations per second.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=MAX_IOPS))]
        write_iops: Option<u64>,
        /// Most read operations per second.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=MAX_IOPS))]
        read_iops: Option<u64>,
        /// Share of the device among busy cgroups, 1 to 1000.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1000))]
        weight: Option<u32>,
    },
    /// Remove a cgroup's IO limits on one device, or on every device.
    Unset {
        cgroup: String,
        /// Only this device (path or major:minor); default: every device.
        #[arg(long, value_name = "DEV")]
        device: Option<String>,
    },
    /// Mode, writeback attribution, and per cgroup and device: limits,
    /// enforcement state, backlog, debt and counters.
    Show(ShowArgs),
}

#[derive(Subcommand, Debug)]
enum MemCommand {
    /// Give a cgroup a memory guarantee (protected), optionally a limit (the
    /// most it may ever use) and a priority (who is reclaimed and killed
    /// last). Above its guarantee a cgroup uses what the host has spare.
    #[command(after_help = SIZE_HELP)]
    Set {
        /// cgroup: a path relative to the cgroup mounts ("tenants/a") or an
        /// absolute path under the memory hierarchy or the cgroup2 mount.
        cgroup: String,
        #[arg(long, value_parser = parse_size)]
        guarantee: Size,
        #[arg(long, value_parser = parse_size)]
        limit: Option<Size>,
        /// 0 (most important) to 7 (reclaimed and killed first).
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=7))]
        priority: u32,
    },
    /// Remove a cgroup's memory quota (guarantee, limit and caps).
    Unset { cgroup: String },
    /// Host level, per-cgroup usage, caps, reclaim, kills, PSI.
    Show(ShowArgs),
}

#[derive(Subcommand, Debug)]
enum NetCommand {
    /// Give a cgroup guaranteed rates (egress, ingress or both), optionally
    /// ceilings and a priority. Replaces the cgroup's quota in both
    /// directions: a direction without a rate is no longer shaped for it.
    #[command(after_help = RATE_HELP)]
    Set {
        /// cgroup2 directory: a path relative to the cgroup2 mount
        /// ("tenants/a") or an absolute path under it.
        cgroup: String,
        /// Guaranteed egress rate (always available to the cgroup when it is
        /// busy sending).
        #[arg(long, value_parser = parse_rate, required_unless_present = "ingress_rate")]
        rate: Option<Rate>,
        /// Most the cgroup may send by borrowing idle capacity (default: the
        /// egress capacity).
        #[arg(long, value_parser = parse_rate, requires = "rate")]
        ceil: Option<Rate>,
        /// Guaranteed ingress rate (always available to the cgroup's sockets
        /// when they are busy receiving).
        #[arg(long, value_parser = parse_rate)]
        ingress_rate: Option<Rate>,
        /// Most the cgroup may receive by borrowing idle capacity (default:
        /// the ingress capacity).
        #[arg(long, value_parser = parse_rate, requires = "ingress_rate")]
        ingress_ceil: Option<Rate>,
        /// Who borrows idle capacity first: 0 (highest) to 7 (lowest).
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=7))]
        priority: u32,
    },
    /// Remove a cgroup's quota; its traffic joins the default class.
    Unset { cgroup: String },
    /// Quotas, allocation and counters per cgroup.
    Show(ShowArgs),
}

/// Options of every `show`.
#[derive(clap::Args, Debug)]
struct ShowArgs {
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    output: Output,
    /// Refresh every SECS seconds until interrupted.
    #[arg(long, value_name = "SECS")]
    watch: Option<f64>,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum Output {
    Table,
    Json,
}

fn parse_interval(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.1..=3600.0).contains(&v) => Ok(v),
        Ok(v) => Err(format!("{v} is out of range 0.1..=3600 seconds")),
        Err(e) => Err(format!("{s:?} is not a number of seconds: {e}")),
    }
}

fn parse_rate(s: &str) -> Result<Rate, String> {
    s.parse::<Rate>().map_err(|e| e.to_string())
}

fn parse_size(s: &str) -> Result<Size, String> {
    s.parse::<Size>().map_err(|e| e.to_string())
}

fn parse_byte_rate(s: &str) -> Result<ByteRate, String> {
    s.parse::<ByteRate>().map_err(|e| e.to_string())
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(args) {
        eprintln!("qosctl: {e}");
        std::process::exit(e.exit_code());
    }
}

fn run(args: Args) -> Result<(), ClientError> {
    if let Command::Completion { shell } = args.command {
        use clap::CommandFactory;
        clap_complete::generate(
            shell,
            &mut Args::command(),
            "qosctl",
            &mut std::io::stdout(),
        );
        return Ok(());
    }
    let mut client = Client::connect(&args.socket)?;
    match args.command {
        Command::Completion { .. } => {}
        Command::Top {
            interval,
            once,
            output,
        } => top(&mut client, interval, once, output)?,
        Command::Status { output } => {
            let Reply::Status(s) = client.call(&Request::Status)? else {
                return Err(unexpected());
            };
            print(output, &*s, status_table);
        }
        Command::Net { command } => match command {
            NetCommand::Set {
                cgroup,
                rate,
                ceil,
                priority,
                ingress_rate,
                ingress_ceil,
            } => {
                let reply = client.call(&Request::NetSet {
                    cgroup,
                    rate,
                    ceil,
                    priority,
                    ingress_rate,
                    ingress_ceil,
                });
                match reply {
                    Ok(Reply::NetApplied { cgroup, quota }) => {
                        let dir = |name: &str, rate: Option<Rate>, ceil: Option<Rate>| {
                            rate.map(|r| {
                                let ceil = ceil.map(|c| format!(" ceil {c}")).unwrap_or_default();
                                format!(" {name} {r}{ceil}")
                            })
                            .unwrap_or_default()
                        };
                        println!(
                            "{cgroup}:{}{} priority {}",
                            dir("egress", quota.rate, quota.ceil),
                            dir("ingress", quota.ingress_rate, quota.ingress_ceil),
                            quota.priority
                        );
                    }
                    Ok(_) => return Err(unexpected()),
                    Err(e) => return Err(e),
                }
            }
            NetCommand::Unset { cgroup } => {
                client.call(&Request::NetUnset {
                    cgroup: cgroup.clone(),
                })?;
                println!("{cgroup}: quota removed");
            }
            NetCommand::Show(args) => show(
                &mut client,
                &Request::NetShow,
                &args,
                |r| match r {
                    Reply::Net(s) => Some(s),
                    _ => None,
                },
                net_table,
            )?,
        },
        Command::Mem { command } => match command {
            MemCommand::Set {
                cgroup,
                guarantee,
                limit,
                priority,
            } => {
                let Reply::MemApplied { cgroup, quota } = client.call(&Request::MemSet {
                    cgroup,
                    guarantee,
                    limit,
                    priority,
                })?
                else {
                    return Err(unexpected());
                };
                println!(
                    "{cgroup}: guarantee {} limit {} priority {}",
                    quota.guarantee,
                    quota.limit.map_or("none".into(), |l| l.to_string()),
                    quota.priority
                );
            }
            MemCommand::Unset { cgroup } => {
                client.call(&Request::MemUnset {
                    cgroup: cgroup.clone(),
                })?;
                println!("{cgroup}: memory quota removed");
            }
            MemCommand::Show(args) => show(
                &mut client,
                &Request::MemShow,
                &args,
                |r| match r {
                    Reply::Mem(s) => Some(s),
                    _ => None,
                },
                mem_table,
            )?,
        },
        Command::Io { command } => match command {
            IoCommand::Set {
                cgroup,
                device,
                write_bps,
                read_bps,
                write_iops,
                read_iops,
                weight,
            } => {
                let limits = IoLimits {
                    write_bps,
                    read_bps,
                    write_iops,
                    read_iops,
                    weight,
                };
                let Reply::IoApplied {
                    cgroup,
                    device,
                    limits,
                } = client.call(&Request::IoSet {
                    cgroup,
                    device,
                    limits,
                })?
                else {
                    return Err(unexpected());
                };
                println!("{cgroup} on {device}: {}", limits_text(&limits));
            }
            IoCommand::Unset { cgroup, device } => {
                client.call(&Request::IoUnset {
                    cgroup: cgroup.clone(),
                    device: device.clone(),
                })?;
                match device {
                    Some(d) => println!("{cgroup} on {d}: IO limits removed"),
                    None => println!("{cgroup}: IO limits removed"),
                }
            }
            IoCommand::Show(args) => show(
                &mut client,
                &Request::IoShow,
                &args,
                |r| match r {
                    Reply::Io(s) => Some(s),
                    _ => None,
                },
                io_table,
            )?,
        },
    }
    Ok(())
}

/// `write 10MiB/s, read 300 iops, weight 100`.
fn limits_text(l: &IoLimits) -> String {
    let mut parts = Vec::new();
    if let Some(r) = l.write_bps {
        parts.push(format!("write {r}"));
    }
    if let Some(r) = l.read_bps {
        parts.push(format!("read {r}"));
    }
    if let Some(n) = l.write_iops {
        parts.push(format!("write {n} iops"));
    }
    if let Some(n) = l.read_iops {
        parts.push(format!("read {n} iops"));
    }
    if let Some(w) = l.weight {
        parts.push(format!("weight {w}"));
    }
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(", ")
    }
}

fn per_sec(bytes: u64) -> String {
    format!("{}/s", format_bytes(bytes))
}

/// `7:3 (loop3)` where the device has a name on this host.
fn device_text(d: Device) -> String {
    match d.name() {
        Some(n) => format!("{d} ({n})"),
        None => d.to_string(),
    }
}

fn io_table(s: &IoStatus) -> String {
    let mut out = format!("IO mode: {}\n", s.mode_description);
    match &s.tracker {
        Some(t) => {
            out += &format!(
                "tracker: kernel {}, maps up to {}\n",
                t.kernel,
                format_bytes(t.map_memory_bytes)
            );
            for d in &t.devices {
                out += &format!(
                    "  {}: {:.1} % of {} file writes attributed{}{}\n",
                    device_text(d.device),
                    d.attributed_pct,
                    format_bytes(d.file_write_bytes),
                    d.scheduler
                        .as_ref()
                        .map(|s| format!(", scheduler {s}"))
                        .unwrap_or_default(),
                    d.capacity_estimate_bps
                        .map(|c| format!(", capacity estimate {}", per_sec(c)))
                        .unwrap_or_default(),
                );
            }
        }
        None => out += "tracker: not loaded (writeback attribution is not verified)\n",
    }
    let mut rows = vec![
        [
            "CGROUP",
            "DEVICE",
            "LIMITS",
            "EFFECTIVE",
            "STATE",
            "PENDING",
            "DEBT",
            "DIRTIED",
            "WRITTEN BACK",
            "LEAKED",
            "WRITE RATE",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for g in &s.groups {
        rows.push(vec![
            g.cgroup.clone(),
            g.device.to_string(),
            limits_text(&g.limits),
            g.effective_write_bps.map_or("-".into(), per_sec),
            g.state.name().to_owned(),
            format_bytes(g.pending_bytes),
            format_bytes(g.debt_bytes),
            format_bytes(g.dirtied_bytes),
            format_bytes(g.written_back_bytes),
            format_bytes(g.leaked_bytes),
            per_sec(g.write_bps.max(0.0) as u64),
        ]);
    }
    out += &columns(&rows);
    let degraded: Vec<String> = s
        .groups
        .iter()
        .filter_map(|g| {
            g.degraded
                .as_ref()
                .map(|d| format!("  {} on {}: {d}\n", g.cgroup, g.device))
        })
        .collect();
    if !degraded.is_empty() {
        out += "\ndegraded:\n";
        out += &degraded.concat();
    }
    if !s.events.is_empty() {
        out += "\nrecent events:\n";
        for e in &s.events {
            out += &format!("  {e}\n");
        }
    }
    out
}

fn mem_table(s: &MemStatus) -> String {
    let mut out = format!(
        "{} memory ({}): {} of {} in use, {:.1} % free, level {}, PSI some {:.1} % full {:.1} %\n\
         guaranteed {} (reserve {}), swap {}, scope OOM killer {}\n",
        s.scope,
        s.backend,
        format_bytes(s.used),
        format_bytes(s.capacity),
        s.free_pct,
        s.level,
        s.psi_some10,
        s.psi_full10,
        format_bytes(s.guaranteed),
        format_bytes(s.reserve),
        if s.swap { "on" } else { "off" },
        if s.scope_oom_held {
            "held by qosd"
        } else {
            "the kernel's"
        },
    );
    let mut rows = vec![
        [
            "CGROUP",
            "GUARANTEE",
            "LIMIT",
            "PRIO",
            "USAGE",
            "CAP",
            "STATE",
            "RECLAIMED",
            "KILLS",
            "OOM",
            "PSI",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for c in &s.cgroups {
        rows.push(vec![
            c.name.clone(),
            format_bytes(c.guarantee),
            c.limit.map_or("-".into(), format_bytes),
            c.priority.to_string(),
            format_bytes(c.usage),
            c.cap.map_or("-".into(), format_bytes),
            c.state.clone(),
            format_bytes(c.counters.reclaimed_bytes),
            c.counters.kills.to_string(),
            c.counters.kernel_oom_kills.to_string(),
            format!("{:.1}", c.psi_some10),
        ]);
    }
    out += &columns(&rows);
    if !s.recent.is_empty() {
        out += "\nrecent events:\n";
        for e in &s.recent {
            out += &format!(
                "  +{:.1}s {:?} {} {}\n",
                e.t_ms as f64 / 1000.0,
                e.kind,
                e.cgroup.as_deref().unwrap_or("-"),
                e.detail
            );
        }
    }
    out
}

/// Asks once, or every `watch` seconds until interrupted, and prints the
/// reply as a table or JSON. `extract` picks the expected reply.
fn show<T: serde::Serialize>(
    client: &mut Client,
    request: &Request,
    &ShowArgs { output, watch }: &ShowArgs,
    extract: fn(Reply) -> Option<Box<T>>,
    table: fn(&T) -> String,
) -> Result<(), ClientError> {
    loop {
        let s = extract(client.call(request)?).ok_or_else(unexpected)?;
        if watch.is_some() && output == Output::Table {
            print!("\x1b[2J\x1b[H");
        }
        print(output, &*s, table);
        match watch {
            Some(secs) if secs > 0.0 => std::thread::sleep(Duration::from_secs_f64(secs)),
            _ => return Ok(()),
        }
    }
}

fn snapshot(client: &mut Client) -> Result<Snapshot, ClientError> {
    match client.call(&Request::Metrics)? {
        Reply::Metrics(s) => Ok(*s),
        _ => Err(unexpected()),
    }
}

/// `qosctl top`: rates between consecutive snapshots.
fn top(client: &mut Client, interval: f64, once: bool, output: Output) -> Result<(), ClientError> {
    let mut prev = snapshot(client)?;
    loop {
        std::thread::sleep(Duration::from_secs_f64(interval));
        let cur = snapshot(client)?;
        let rows = qos::metrics::top_rows(&prev, &cur);
        if output == Output::Table && !once {
            print!("\x1b[2J\x1b[H");
        }
        match output {
            Output::Json => println!(
                "{}",
                serde_json::to_string_pretty(&rows).unwrap_or_default()
            ),
            Output::Table => print!("{}", top_table(&rows, &cur)),
        }
        if once {
            return Ok(());
        }
        prev = cur;
    }
}

fn top_table(rows: &[TopRow], cur: &Snapshot) -> String {
    let d = &cur.daemon;
    let mut out = format!(
        "qosd {} up {}s, rss {}, {} request(s), {} waiting, degradations {}\n",
        d.version,
        d.uptime_secs,
        format_bytes(d.resident_bytes),
        d.requests,
        d.waiting,
        d.degradations.values().sum::<u64>()
    );
    out += &format!(
        "{:<32} {:>11} {:>11} {:>9} {:>11} {:>11} {:>4} {:>10} {:>10} {:>10}\n",
        "CGROUP",
        "NET OUT",
        "NET IN",
        "THROT/s",
        "IO WRITE/s",
        "IO READ/s",
        "HELD",
        "MEM",
        "MEM CAP",
        "RECLAIM/s"
    );
    let bps = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), format_bps);
    let bytes_s = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |b| format_bytes(b as u64));
    for r in rows {
        out += &format!(
            "{:<32} {:>11} {:>11} {:>9} {:>11} {:>11} {:>4} {:>10} {:>10} {:>10}\n",
            r.cgroup,
            bps(r.egress_bps),
            bps(r.ingress_bps),
            r.net_throttle_per_s
                .map_or_else(|| "-".to_owned(), |v| format!("{v:.0}")),
            bytes_s(r.io_write_bps),
            bytes_s(r.io_read_bps),
            r.io_throttled_devices
                .map_or_else(|| "-".to_owned(), |v| v.to_string()),
            r.mem_usage_bytes
                .map_or_else(|| "-".to_owned(), format_bytes),
            r.mem_cap_bytes.map_or_else(|| "-".to_owned(), format_bytes),
            bytes_s(r.mem_reclaim_bps),
        );
    }
    if rows.is_empty() {
        out += "(no configured cgroup)\n";
    }
    out
}

fn unexpected() -> ClientError {
    ClientError::Protocol("reply does not match the request".into())
}

fn print<T: serde::Serialize>(output: Output, v: &T, table: fn(&T) -> String) {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(v).unwrap_or_default()),
        Output::Table => print!("{}", table(v)),
    }
}

fn status_table(s: &Status) -> String {
    let mut out = format!(
        "qosd {} (pid {}, up {}s)\ncgroups: {} (cgroup2 at {})\n",
        s.version, s.pid, s.uptime_secs, s.cgroup_mode, s.cgroup2_root
    );
    match &s.net {
        Some(n) => {
            out += &format!(
                "net: {} egress {} — {} quota(s), {} guaranteed incl. default class; tagger on {}\n",
                n.interface,
                n.capacity,
                n.classes,
                n.guaranteed,
                if n.tagged_interfaces.is_empty() {
                    "no interface".to_string()
                } else {
                    n.tagged_interfaces.join(", ")
                }
            );
            out += &match (&n.ingress_capacity, &n.ingress_guaranteed) {
                (Some(cap), Some(g)) => {
                    format!("net: ingress {cap} — {g} guaranteed incl. default class\n")
                }
                _ => "net: ingress not shaped\n".to_string(),
            };
        }
        None => out += "net: not configured\n",
    }
    match &s.mem {
        Some(m) => {
            out += &format!(
                "mem: {} backend, scope {} ({}), level {}, {} quota(s), {} guaranteed; woken by {}\n",
                m.backend,
                m.scope,
                format_bytes(m.capacity),
                m.level,
                m.quotas,
                format_bytes(m.guaranteed),
                m.woken_by
            );
        }
        None => out += "mem: not enabled\n",
    }
    match &s.io {
        Some(io) => out += &format!("io: {}, {} limit(s)\n", io.mode, io.limits),
        None => out += "io: not enabled\n",
    }
    if !s.waiting.is_empty() {
        out += &format!("waiting for cgroups: {}\n", s.waiting.join(", "));
    }
    if let Some(f) = &s.state_file {
        out += &format!("state: {f}\n");
    }
    out
}

/// Renders rows as aligned columns.
fn columns(rows: &[Vec<String>]) -> String {
    let n = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..n)
        .map(|i| {
            rows.iter()
                .map(|r| r.get(i).map_or(0, |c| c.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        out += line.join("  ").trim_end();
        out.push('\n');
    }
    out
}

fn bytes(b: u64) -> String {
    let f = b as f64;
    if f >= 1e9 {
        format!("{:.1}G", f / 1e9)
    } else if f >= 1e6 {
        format!("{:.1}M", f / 1e6)
    } else if f >= 1e3 {
        format!("{:.1}K", f / 1e3)
    } else {
        format!("{b}")
    }
}

fn net_table(s: &NetStatus) -> String {
    let mut out = format!("{} egress {}\n", s.interface, s.capacity);
    out += &class_table(&s.classes, "PACED");
    if let Some(i) = &s.ingress {
        // Without ACK pacing the windows are sized for the buffer upstream:
        // say which, so a wrong `ingress_upstream_buffer` shows.
        let sized = if i.ack_pacing == "on" || i.upstream_buffer_bytes == 0 {
            String::new()
        } else {
            format!(
                "; windows sized for a {} upstream buffer, {} µs of queue",
                Size::clamped(i.upstream_buffer_bytes),
                i.shared_queue_us
            )
        };
        out += &format!(
            "\n{} ingress {} (ACK pacing {}{sized})\n",
            s.interface, i.capacity, i.ack_pacing
        );
        out += &class_table(&i.classes, "CLAMPS");
    }
    out
}

/// One direction's classes. The last column counts the flow-level actions:
/// pacing updates (egress) or receive-window clamps (ingress).
fn class_table(classes: &[NetClassStatus], flow_action: &str) -> String {
    let mut rows = vec![
        [
            "CGROUP",
            "RATE",
            "CEIL",
            "PRIO",
            "ALLOC",
            "NOW",
            "FLOWS",
            "BYTES",
            "BORROWED",
            "CE",
            "DROPS",
            flow_action,
        ]
        .map(String::from)
        .to_vec(),
    ];
    for c in classes {
        rows.push(vec![
            c.cgroup.clone(),
            c.rate.clone(),
            c.ceil.clone(),
            c.priority.to_string(),
            // Held at it per packet (ingress beside UDP, without fq).
            if c.held_at_alloc {
                format!("{} (held)", format_bps(c.alloc_bps as f64))
            } else {
                format_bps(c.alloc_bps as f64)
            },
            format_bps(c.rate_bps as f64),
            c.flows.to_string(),
            bytes(c.bytes),
            bytes(c.borrowed_bytes),
            c.ce_marks.to_string(),
            c.drops.to_string(),
            if flow_action == "CLAMPS" {
                c.window_clamps
            } else {
                c.pacing_updates
            }
            .to_string(),
        ]);
    }
    columns(&rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_ingress(ack_pacing: &str) -> NetStatus {
        NetStatus {
            interface: "eth0".into(),
            capacity: "1gbit".into(),
            ingress: Some(netqos::IngressStatus {
                capacity: "950mbit".into(),
                ack_pacing: ack_pacing.into(),
                upstream_buffer_bytes: 64 * 1024,
                shared_queue_us: 276,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn net_show_names_the_upstream_buffer_where_windows_hold_flows() {
        let off = net_table(&with_ingress("off: the kernel has no fq qdisc"));
        assert!(
            off.contains(
                "eth0 ingress 950mbit (ACK pacing off: the kernel has no fq qdisc; \
                 windows sized for a 64KiB upstream buffer, 276 µs of queue)"
            ),
            "{off}"
        );
        let on = net_table(&with_ingress("on"));
        assert!(
            on.contains("eth0 ingress 950mbit (ACK pacing on)\n"),
            "{on}"
        );
    }
}
