//! iperf3 traffic: one-off servers in the receiver namespace, clients placed
//! in cgroups or container namespaces, and their JSON reports.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::{KillOnDrop, Placement, spawn, wait_for};

/// TCP maximum segment size on a 1500-byte MTU with timestamps.
pub const TCP_MSS: u64 = 1448;
/// Ethernet + IPv4 + TCP (with timestamps) header bytes per segment.
pub const TCP_OVERHEAD: u64 = 66;
/// UDP payload the clients send.
pub const UDP_PAYLOAD: u64 = 1400;
/// Ethernet + IPv4 + UDP header bytes per datagram.
pub const UDP_OVERHEAD: u64 = 42;

/// How much longer an IPv6 header is than an IPv4 one (without options).
pub const IPV6_EXTRA: u64 = 20;

/// Wire bytes (what tc and HTB charge) of `payload` bytes of bulk traffic
/// over IPv4.
pub fn wire_bytes(payload: u64, udp: bool) -> u64 {
    wire_bytes_of(payload, udp, false)
}

/// [`wire_bytes`] over IPv4 or (`ipv6`) IPv6, whose TCP segments carry
/// [`IPV6_EXTRA`] bytes less payload in the same frame.
pub fn wire_bytes_of(payload: u64, udp: bool, ipv6: bool) -> u64 {
    let extra = if ipv6 { IPV6_EXTRA } else { 0 };
    let (seg, ovh) = if udp {
        (UDP_PAYLOAD, UDP_OVERHEAD + extra)
    } else {
        (TCP_MSS - extra, TCP_OVERHEAD + extra)
    };
    payload + payload.div_ceil(seg) * ovh
}

/// Per-interval received payload, as a receiver reports it.
#[derive(Clone, Debug, Default)]
pub struct ServerReport {
    /// (start s, end s, payload bytes) relative to the test start.
    pub intervals: Vec<(f64, f64, u64)>,
    pub bytes: u64,
    pub seconds: f64,
}

/// What a sender reports.
#[derive(Clone, Debug, Default)]
pub struct ClientReport {
    pub bytes: u64,
    pub retransmits: u64,
    /// Per interval ([`ClientOpts::interval`]; iperf3's default is 1 s):
    /// what it sent.
    pub intervals: Vec<ClientInterval>,
}

/// One interval of a sender's report.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClientInterval {
    /// Start and end, s, relative to the test start.
    pub start: f64,
    pub end: f64,
    /// Payload bytes written in it (all streams).
    pub bytes: u64,
    /// Each TCP stream's smoothed round trip at its end, µs, as its
    /// kernel saw it (none for UDP).
    pub srtt_us: Vec<u64>,
}

/// A one-off iperf3 server writing its JSON report to a file.
#[derive(Debug)]
pub struct Server {
    child: KillOnDrop,
    out: PathBuf,
    pub port: u16,
}

impl Server {
    /// Starts `iperf3 -s -1` on `port` and waits until it listens.
    pub fn start(
        place: &Placement,
        bind: impl Into<IpAddr>,
        port: u16,
        out_dir: &Path,
        interval: f64,
    ) -> Result<Self> {
        let bind: IpAddr = bind.into();
        let out = out_dir.join(format!("server-{port}.json"));
        let file =
            std::fs::File::create(&out).with_context(|| format!("creating {}", out.display()))?;
        let mut cmd = Command::new("iperf3");
        cmd.args([
            "-s",
            "-1",
            "-J",
            "-B",
            &bind.to_string(),
            "-p",
            &port.to_string(),
            "-i",
            &interval.to_string(),
        ])
        .stdout(file)
        .stderr(Stdio::null())
        .stdin(Stdio::null());
        let child = KillOnDrop(spawn(place, &mut cmd)?);
        let s = Self { child, out, port };
        if !wait_listening(s.child.0.id(), port) {
            bail!("iperf3 server on port {port} did not start listening");
        }
        Ok(s)
    }

    /// Waits for the server to finish its one test and parses the report.
    pub fn finish(mut self, timeout: Duration) -> Result<ServerReport> {
        let text = wait_for_report(&mut self.child, &self.out, timeout, "server")?;
        parse_server(&text).with_context(|| format!("parsing {}", self.out.display()))
    }
}

/// Waits (up to 5 s) until process `pid` listens on TCP `port` (IPv4 or
/// IPv6). Listening shows in /proc/net/tcp{,6} of the process's namespace;
/// the cheapest check without entering it is the process's own view.
pub fn wait_listening(pid: u32, port: u16) -> bool {
    let hex_port = format!(":{:04X} ", port);
    let listens = |table: &str| {
        std::fs::read_to_string(format!("/proc/{pid}/net/{table}"))
            .map(|t| {
                t.lines()
                    .any(|l| l.contains(&hex_port) && l.split_whitespace().nth(3) == Some("0A"))
            })
            .unwrap_or(false)
    };
    wait_for(Duration::from_secs(5), || listens("tcp") || listens("tcp6"))
}

/// Waits for an iperf3 process to exit and returns its JSON report.
fn wait_for_report(
    child: &mut KillOnDrop,
    out: &Path,
    timeout: Duration,
    what: &str,
) -> Result<String> {
    child.wait_exit(timeout, &format!("iperf3 {what}"))?;
    std::fs::read_to_string(out).with_context(|| format!("reading {}", out.display()))
}

/// The elements of a JSON array, none where `v` is not one.
fn elements(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or(&[])
}

/// (start s, end s, bytes) of one interval of a report (all streams' sum),
/// none where a field is missing.
fn interval_sum(iv: &Value) -> Option<(f64, f64, u64)> {
    let s = &iv["sum"];
    Some((
        s["start"].as_f64()?,
        s["end"].as_f64()?,
        s["bytes"].as_u64()?,
    ))
}

/// Parses a receiver's JSON report.
pub fn parse_server(text: &str) -> Result<ServerReport> {
    let v: Value = serde_json::from_str(text)?;
    if let Some(e) = v["error"].as_str() {
        bail!("iperf3 server: {e}");
    }
    let mut r = ServerReport {
        intervals: elements(&v["intervals"])
            .iter()
            .filter_map(interval_sum)
            .collect(),
        ..ServerReport::default()
    };
    let end = &v["end"];
    let sum = if end["sum_received"].is_object() {
        &end["sum_received"]
    } else {
        &end["sum"]
    };
    r.bytes = sum["bytes"]
        .as_u64()
        .unwrap_or_else(|| r.intervals.iter().map(|i| i.2).sum());
    r.seconds = sum["seconds"].as_f64().unwrap_or(0.0);
    Ok(r)
}

/// Client options.
#[derive(Clone, Debug, Default)]
pub struct ClientOpts {
    pub seconds: f64,
    pub parallel: u32,
    /// UDP at this many bits per second.
    pub udp_bps: Option<u64>,
    pub bind: Option<IpAddr>,
    /// IP TOS byte (2 = ECT(0): ECN-capable without any ECN reaction).
    pub tos: Option<u8>,
    /// Each stream's socket paced at this many bits per second
    /// (`--fq-rate`, `SO_MAX_PACING_RATE`: the IP packets' bytes; TCP
    /// paces itself where the qdisc is not fq).
    pub pacing_bps: Option<u64>,
    /// TCP written by the application at most this many bits per second,
    /// in blocks of one segment so that it sends steadily (iperf3 `-b`
    /// and `-l` without `-u`: a light flow, not held by any pacing).
    pub tcp_bps: Option<u64>,
    /// Both ends' socket buffers, bytes (iperf3 `-w`, with
    /// [`allow_socket_buffers`]; the kernel doubles what `SO_SNDBUF` and
    /// `SO_RCVBUF` ask for). A UDP sender's buffer decides whether a full
    /// qdisc on its way out holds it back (the socket waits while its
    /// buffer's worth is queued) or drops what it sends past the qdisc's
    /// limit; absent, the kernel's defaults.
    pub socket_buffer: Option<u64>,
    /// Report interval, s (iperf3 `-i`; its default 1 s when absent).
    pub interval: Option<f64>,
}

/// Receive buffers of the fairness script's UDP flows. With the default
/// (208 KiB: about 2 ms of a 500 Mbit/s flow's datagrams) the receiver
/// lost datagrams whenever it was not scheduled for that long: 1 040 in a
/// 6 s run of the udp scenario on a 2-CPU host (`UdpRcvbufErrors`), lost
/// after the shaper counted them and missing from the receiver's 100 ms
/// windows.
pub const UDP_RECEIVE_BUFFER: u64 = 4 << 20;

/// Raises `net.core.rmem_default` (and `rmem_max` with it) to
/// [`UDP_RECEIVE_BUFFER`] where lower, until the guards drop: the UDP
/// receivers get it without asking (TCP sizes its buffers from
/// `tcp_rmem`), while the senders keep the kernel's send buffer. iperf3's
/// `-w` would set both ends', and a sender's send buffer decides whether
/// the link's qdisc holds it back (see [`ClientOpts::socket_buffer`]).
pub fn udp_receive_buffers() -> Result<Vec<crate::Sysctl>> {
    raise_sysctls(
        &["net.core.rmem_max", "net.core.rmem_default"],
        UDP_RECEIVE_BUFFER,
    )
}

/// Raises `net.core.rmem_max` and `wmem_max` to `bytes` where lower
/// (iperf3 fails when it cannot get the buffer `-w` asks for), until the
/// guards drop.
pub fn allow_socket_buffers(bytes: u64) -> Result<Vec<crate::Sysctl>> {
    raise_sysctls(&["net.core.rmem_max", "net.core.wmem_max"], bytes)
}

/// Sets each of `keys` to `value` where it is lower, in order; the guards
/// put the old values back. Only the host's first network namespace has
/// the `net.core` buffer sysctls; they apply to every namespace.
fn raise_sysctls(keys: &[&str], value: u64) -> Result<Vec<crate::Sysctl>> {
    let mut guards = Vec::new();
    for key in keys {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        if !std::path::Path::new(&path).exists() {
            continue;
        }
        let now: u64 = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {path}"))?
            .trim()
            .parse()
            .with_context(|| format!("parsing {path}"))?;
        if now < value {
            guards.push(crate::Sysctl::set(key, &value.to_string())?);
        }
    }
    Ok(guards)
}

/// An iperf3 client writing its JSON report to a file.
#[derive(Debug)]
pub struct Client {
    child: KillOnDrop,
    out: PathBuf,
}

impl Client {
    pub fn start(
        place: &Placement,
        server: impl Into<IpAddr>,
        port: u16,
        opts: &ClientOpts,
        out_dir: &Path,
    ) -> Result<Self> {
        let out = out_dir.join(format!("client-{port}.json"));
        let file = std::fs::File::create(&out)?;
        let mut cmd = Command::new("iperf3");
        cmd.args([
            "-c",
            &server.into().to_string(),
            "-p",
            &port.to_string(),
            "-J",
            "-t",
            &format!("{}", opts.seconds),
        ])
        .args(["-P", &opts.parallel.max(1).to_string()])
        .stdout(file)
        .stderr(Stdio::null())
        .stdin(Stdio::null());
        if let Some(b) = opts.bind {
            cmd.args(["-B", &b.to_string()]);
        }
        if let Some(tos) = opts.tos {
            cmd.args(["-S", &tos.to_string()]);
        }
        if let Some(bps) = opts.pacing_bps {
            cmd.args(["--fq-rate", &bps.to_string()]);
        }
        if let (Some(bps), None) = (opts.tcp_bps, opts.udp_bps) {
            cmd.args(["-b", &bps.to_string(), "-l", "1400"]);
        }
        if let Some(bps) = opts.udp_bps {
            cmd.args(["-u", "-b", &bps.to_string(), "-l", &UDP_PAYLOAD.to_string()]);
        }
        if let Some(bytes) = opts.socket_buffer {
            cmd.args(["-w", &bytes.to_string()]);
        }
        if let Some(secs) = opts.interval {
            cmd.args(["-i", &secs.to_string()]);
        }
        let child = KillOnDrop(spawn(place, &mut cmd)?);
        Ok(Self { child, out })
    }

    /// Stops the client early (on/off traffic).
    pub fn stop(mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.0.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let _ = wait_for(Duration::from_secs(3), || {
            matches!(self.child.0.try_wait(), Ok(Some(_)))
        });
    }

    pub fn finish(mut self, timeout: Duration) -> Result<ClientReport> {
        let text = wait_for_report(&mut self.child, &self.out, timeout, "client")?;
        parse_client(&text).with_context(|| format!("parsing {}", self.out.display()))
    }
}

/// Parses a sender's JSON report.
pub fn parse_client(text: &str) -> Result<ClientReport> {
    let v: Value = serde_json::from_str(text)?;
    if let Some(e) = v["error"].as_str() {
        bail!("iperf3 client: {e}");
    }
    let end = &v["end"];
    let sent = if end["sum_sent"].is_object() {
        &end["sum_sent"]
    } else {
        &end["sum"]
    };
    let intervals = elements(&v["intervals"])
        .iter()
        .filter_map(|iv| {
            let (start, end, bytes) = interval_sum(iv)?;
            Some(ClientInterval {
                start,
                end,
                bytes,
                srtt_us: elements(&iv["streams"])
                    .iter()
                    .filter_map(|st| st["rtt"].as_u64())
                    .collect(),
            })
        })
        .collect();
    Ok(ClientReport {
        bytes: sent["bytes"].as_u64().unwrap_or(0),
        retransmits: sent["retransmits"].as_u64().unwrap_or(0),
        intervals,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_accounting() {
        assert_eq!(wire_bytes(1448, false), 1514);
        assert_eq!(wire_bytes(1449, false), 1449 + 132);
        assert_eq!(wire_bytes(1400 * 10, true), 1442 * 10);
        assert_eq!(wire_bytes(0, false), 0);
        // IPv6: full frames are still 1514 bytes, with 20 bytes less payload.
        assert_eq!(wire_bytes_of(1428, false, true), 1514);
        assert_eq!(wire_bytes_of(1429, false, true), 1429 + 172);
        assert_eq!(wire_bytes_of(1400 * 10, true, true), 1462 * 10);
    }

    #[test]
    fn parses_reports() {
        let server = r#"{"intervals":[{"sum":{"start":0,"end":0.1,"bytes":1000}},{"sum":{"start":0.1,"end":0.2,"bytes":3000}}],
                         "end":{"sum_received":{"bytes":4000,"seconds":0.2}}}"#;
        let r = parse_server(server).expect("server");
        assert_eq!(r.intervals.len(), 2);
        assert_eq!(r.bytes, 4000);
        let client = r#"{"end":{"sum_sent":{"bytes":5000,"retransmits":3}}}"#;
        let c = parse_client(client).expect("client");
        assert_eq!((c.bytes, c.retransmits), (5000, 3));
        assert!(c.intervals.is_empty());
        // TCP: streams carry their round trips; UDP's carry none.
        let tcp = r#"{"intervals":[{"streams":[{"rtt":450},{"rtt":900}],"sum":{"start":0,"end":0.1,"bytes":7000}},
                                   {"sum":{"start":0.1,"end":0.2}}],
                      "end":{"sum_sent":{"bytes":7000,"retransmits":0}}}"#;
        let c = parse_client(tcp).expect("tcp client");
        assert_eq!(
            c.intervals,
            vec![ClientInterval {
                start: 0.0,
                end: 0.1,
                bytes: 7000,
                srtt_us: vec![450, 900]
            }]
        );
        let udp = r#"{"intervals":[{"streams":[{"packets":5}],"sum":{"start":0,"end":0.1,"bytes":7000}}],
                      "end":{"sum":{"bytes":7000}}}"#;
        let c = parse_client(udp).expect("udp client");
        assert_eq!(c.intervals[0].srtt_us, Vec::<u64>::new());
        assert_eq!(c.intervals[0].bytes, 7000);
        assert!(parse_server(r#"{"error":"boom"}"#).is_err());
    }
}
