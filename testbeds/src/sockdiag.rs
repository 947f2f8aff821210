//! What each receiver's TCP sockets got from the network, sampled over
//! sock_diag (`tcpi_bytes_received`, `tcpi_data_segs_in`).
//!
//! iperf3's intervals count what the receiving application read. Under an
//! emulated CPU the reader runs late, and its 100 ms windows jitter with it
//! even when the network delivered evenly; the kernel's per-socket counters
//! advance when data arrives in order, whoever reads it. The fairness script
//! reports windows of both, so a short window can be put down to the network
//! or to the reader.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::{
    AF_INET, IPPROTO_TCP, SockDiagMessage,
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags, nlas::Nla},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};

use crate::iperf::TCP_OVERHEAD;

/// One receiving group: its sockets are the TCP sockets bound to `addr` in
/// the network namespace `netns` (None: the caller's).
#[derive(Clone, Debug)]
pub struct RxGroup {
    pub netns: Option<PathBuf>,
    pub addr: Ipv4Addr,
}

/// Per-group totals at one instant.
#[derive(Clone, Debug, PartialEq)]
pub struct RxSample {
    /// Seconds since the sampler's reference instant.
    pub t: f64,
    /// Wire bytes (payload + per-segment headers) received so far, per group.
    pub wire_bytes: Vec<u64>,
}

/// Payload bytes a server port's sockets must have received before its
/// test counts as started: above what iperf3 sends before its data (the
/// test's parameters and a 37-byte cookie per stream: under 3 KB for 64
/// streams), below one stream's first flight. (A UDP test's control
/// connection passes it only with its results, at the end: the caller
/// leaves UDP tests out.)
pub const FIRST_DATA_BYTES: u64 = 4096;

/// Running per-group totals built from per-socket counters that appear,
/// grow and vanish (a socket's bytes between its last sample and its close
/// are not seen), and the payload each local port's sockets received.
#[derive(Debug)]
pub struct RxTotals {
    last: HashMap<(usize, u64), (u64, u32)>,
    total: Vec<u64>,
    port_payload: HashMap<u16, u64>,
}

impl RxTotals {
    pub fn new(groups: usize) -> Self {
        Self {
            last: HashMap::new(),
            total: vec![0; groups],
            port_payload: HashMap::new(),
        }
    }

    /// Records socket `key` of `group`, bound to local `port`, at `bytes`
    /// received in `segs` data segments (the kernel's cumulative counters;
    /// segments wrap at 2^32).
    pub fn update(&mut self, group: usize, key: (usize, u64), port: u16, bytes: u64, segs: u32) {
        let (b0, s0) = self.last.insert(key, (bytes, segs)).unwrap_or((0, 0));
        let payload = bytes.saturating_sub(b0);
        let wire = payload + u64::from(segs.wrapping_sub(s0)) * TCP_OVERHEAD;
        self.total[group] += wire;
        *self.port_payload.entry(port).or_default() += payload;
    }

    pub fn totals(&self) -> &[u64] {
        &self.total
    }

    /// The local ports whose sockets have received at least `bytes` of
    /// payload so far.
    pub fn ports_past(&self, bytes: u64) -> impl Iterator<Item = u16> + '_ {
        self.port_payload
            .iter()
            .filter(move |(_, b)| **b >= bytes)
            .map(|(p, _)| *p)
    }
}

/// What a sampler saw: the samples, and for each local port whose sockets
/// received data, the two sample times between which they first passed
/// [`FIRST_DATA_BYTES`].
#[derive(Debug, Default)]
pub struct RxRecord {
    pub samples: Vec<RxSample>,
    pub first_data: HashMap<u16, (f64, f64)>,
}

impl RxRecord {
    /// When port `port`'s data began to arrive: midway between the samples
    /// around its first [`FIRST_DATA_BYTES`] (half a period's error).
    pub fn data_start(&self, port: u16) -> Option<f64> {
        self.first_data.get(&port).map(|(a, b)| (a + b) / 2.0)
    }
}

/// (start s, end s, wire bits per second) between consecutive samples, for
/// one group.
pub fn windows(samples: &[RxSample], group: usize) -> Vec<(f64, f64, f64)> {
    samples
        .windows(2)
        .filter(|w| w[1].t > w[0].t)
        .map(|w| {
            let bits = (w[1].wire_bytes[group] - w[0].wire_bytes[group]) as f64 * 8.0;
            (w[0].t, w[1].t, bits / (w[1].t - w[0].t))
        })
        .collect()
}

/// A thread dumping the groups' TCP sockets every period until finished.
#[derive(Debug)]
pub struct RxSampler {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Result<RxRecord>>,
}

impl RxSampler {
    /// Opens one sock_diag socket per network namespace and starts sampling;
    /// sample times are seconds since `t0`.
    pub fn start(groups: Vec<RxGroup>, t0: Instant, period: Duration) -> Result<Self> {
        let mut spaces: Vec<Option<PathBuf>> = Vec::new();
        for g in &groups {
            if !spaces.contains(&g.netns) {
                spaces.push(g.netns.clone());
            }
        }
        let sockets = spaces
            .iter()
            .map(|ns| open_in(ns.as_deref()))
            .collect::<Result<Vec<_>>>()?;
        // Fail here, not in the thread, on a kernel without TCP socket
        // dumps (tcp_diag).
        for (k, socket) in sockets.iter().enumerate() {
            dump_tcp(socket, 0).with_context(|| {
                format!(
                    "dumping TCP sockets in {}",
                    spaces[k]
                        .as_deref()
                        .map_or("this network namespace".into(), |p| p.display().to_string())
                )
            })?;
        }
        let of_group: Vec<(usize, Ipv4Addr)> = groups
            .iter()
            .map(|g| {
                (
                    spaces.iter().position(|s| *s == g.netns).unwrap_or(0),
                    g.addr,
                )
            })
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut totals = RxTotals::new(of_group.len());
            let mut record = RxRecord::default();
            let mut next = Instant::now();
            let mut sequence = 0;
            loop {
                // Only a sample begun after finish() was called is its last:
                // one under way then may predate what the caller waited for.
                let last = stopped.load(Ordering::Relaxed);
                for (space, socket) in sockets.iter().enumerate() {
                    sequence += 1;
                    for c in dump_tcp(socket, sequence)? {
                        if let Some(g) = of_group
                            .iter()
                            .position(|&(s, a)| s == space && IpAddr::V4(a) == c.local)
                        {
                            totals.update(
                                g,
                                (space, c.cookie),
                                c.port,
                                c.bytes_received,
                                c.data_segs_in,
                            );
                        }
                    }
                }
                let t = t0.elapsed().as_secs_f64();
                let before = record.samples.last().map_or(0.0, |s| s.t);
                for port in totals.ports_past(FIRST_DATA_BYTES) {
                    record.first_data.entry(port).or_insert((before, t));
                }
                record.samples.push(RxSample {
                    t,
                    wire_bytes: totals.totals().to_vec(),
                });
                if last {
                    return Ok(record);
                }
                if stopped.load(Ordering::Relaxed) {
                    continue;
                }
                // A fixed schedule: a late sample does not shift the later ones.
                next += period;
                let now = Instant::now();
                if next > now {
                    std::thread::sleep(next - now);
                } else {
                    next = now;
                }
            }
        });
        Ok(Self { stop, thread })
    }

    /// Stops after one last sample and returns the record: every sample
    /// and each port's first data.
    pub fn finish(self) -> Result<RxRecord> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.join() {
            Ok(r) => r,
            Err(_) => bail!("the sock_diag sampler panicked"),
        }
    }
}

/// A connected sock_diag socket in `netns` (a socket stays in the namespace
/// it was created in, so a short-lived thread enters it to create one).
fn open_in(netns: Option<&Path>) -> Result<Socket> {
    let open = || -> Result<Socket> {
        let mut socket = Socket::new(NETLINK_SOCK_DIAG).context("opening a sock_diag socket")?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(socket)
    };
    match netns {
        None => open(),
        Some(ns) => std::thread::scope(|s| {
            s.spawn(|| {
                let f = std::fs::File::open(ns)
                    .with_context(|| format!("opening network namespace {}", ns.display()))?;
                nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)
                    .with_context(|| format!("entering network namespace {}", ns.display()))?;
                open()
            })
            .join()
            .map_err(|_| anyhow::anyhow!("entering {} panicked", ns.display()))?
        }),
    }
}

/// What a dump tells of one TCP socket.
struct TcpSocketCounters {
    local: IpAddr,
    port: u16,
    cookie: u64,
    bytes_received: u64,
    data_segs_in: u32,
}

/// Every IPv4 TCP socket of the socket's namespace.
fn dump_tcp(socket: &Socket, sequence: u32) -> Result<Vec<TcpSocketCounters>> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    header.sequence_number = sequence;
    let mut packet = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family: AF_INET,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::INFO,
            states: StateFlags::all(),
            socket_id: SocketId::new_v4(),
        })
        .into(),
    );
    packet.finalize();
    let mut out = vec![0; packet.buffer_len()];
    packet.serialize(&mut out);
    socket.send(&out, 0).context("sending a sock_diag dump")?;
    let mut found = Vec::new();
    loop {
        let (buf, _) = socket
            .recv_from_full()
            .context("reading a sock_diag dump")?;
        let mut offset = 0;
        while offset < buf.len() {
            let len = NetlinkBuffer::new_checked(&buf[offset..])
                .map(|b| b.length() as usize)
                .map_err(|e| anyhow::anyhow!("sock_diag answer: {e}"))?;
            let part = &buf[offset..offset + len];
            offset += (len + 3) & !3;
            let reply = NetlinkMessage::<SockDiagMessage>::deserialize(part)
                .map_err(|e| anyhow::anyhow!("sock_diag answer: {e}"))?;
            if reply.header.sequence_number != sequence {
                continue;
            }
            match reply.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                    let info = r.nlas.iter().find_map(|n| match n {
                        Nla::TcpInfo(i) => Some((i.bytes_received, i.data_segs_in)),
                        _ => None,
                    });
                    if let Some((bytes, segs)) = info {
                        found.push(TcpSocketCounters {
                            local: r.header.socket_id.source_address,
                            port: r.header.socket_id.source_port,
                            cookie: u64::from_ne_bytes(r.header.socket_id.cookie),
                            bytes_received: bytes,
                            data_segs_in: segs,
                        });
                    }
                }
                NetlinkPayload::Done(_) => return Ok(found),
                NetlinkPayload::Error(e) => match e.code {
                    None => return Ok(found),
                    Some(code) => {
                        let errno = -code.get();
                        return Err(std::io::Error::from_raw_os_error(errno)).context(
                            if errno == nix::errno::Errno::ENOENT as i32 {
                                "sock_diag dump refused: the kernel has no TCP handler (tcp_diag)"
                            } else {
                                "sock_diag dump refused"
                            },
                        );
                    }
                },
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_add_each_sockets_growth_with_its_segment_headers() {
        let mut t = RxTotals::new(2);
        t.update(0, (0, 1), 80, 1448, 1);
        assert_eq!(t.totals(), &[1448 + TCP_OVERHEAD, 0]);
        t.update(0, (0, 1), 80, 2 * 1448, 2);
        t.update(0, (0, 2), 80, 100, 1);
        t.update(1, (1, 1), 81, 0, 0);
        assert_eq!(
            t.totals(),
            &[2 * 1448 + 2 * TCP_OVERHEAD + 100 + TCP_OVERHEAD, 0]
        );
        // The same cookie in another namespace is another socket.
        t.update(1, (1, 2), 81, 1448, 1);
        assert_eq!(t.totals()[1], 1448 + TCP_OVERHEAD);
        // Per port: the payload alone.
        let mut past: Vec<u16> = t.ports_past(2 * 1448 + 100).collect();
        assert_eq!(past, [80]);
        past = t.ports_past(1448).collect();
        past.sort_unstable();
        assert_eq!(past, [80, 81]);
    }

    #[test]
    fn segment_counters_wrap() {
        let mut t = RxTotals::new(1);
        t.update(0, (0, 1), 80, 0, u32::MAX);
        let before = t.totals()[0];
        t.update(0, (0, 1), 80, 2896, 1);
        assert_eq!(t.totals()[0] - before, 2896 + 2 * TCP_OVERHEAD);
    }

    #[test]
    fn windows_are_rates_between_samples() {
        let s = |t, b| RxSample {
            t,
            wire_bytes: vec![b],
        };
        let w = windows(
            &[s(0.0, 0), s(0.1, 12_500), s(0.1, 12_500), s(0.3, 12_500)],
            0,
        );
        assert_eq!(w.len(), 2);
        assert!((w[0].2 - 1_000_000.0).abs() < 1e-6);
        assert_eq!((w[1].0, w[1].1, w[1].2), (0.1, 0.3, 0.0));
    }

    /// A loopback transfer shows up in the sampled totals (sock_diag needs
    /// no privilege).
    #[test]
    fn a_loopback_transfer_is_counted() -> Result<()> {
        use std::io::{Read, Write};
        // An address of this process's own in 127/8: other tests' loopback
        // sockets (on 127.0.0.1) are not counted with it.
        let pid = std::process::id();
        let addr = Ipv4Addr::new(127, 83, (pid / 254 % 256) as u8, (pid % 254 + 1) as u8);
        let listener = std::net::TcpListener::bind((addr, 0))?;
        let port = listener.local_addr()?.port();
        let t0 = Instant::now();
        let sampler = RxSampler::start(
            vec![RxGroup { netns: None, addr }],
            t0,
            Duration::from_millis(10),
        )?;
        let mut tx = std::net::TcpStream::connect((addr, port))?;
        let (mut rx, _) = listener.accept()?;
        tx.write_all(&[7u8; 100_000])?;
        drop(tx);
        let mut got = Vec::new();
        rx.read_to_end(&mut got)?;
        // finish() takes a last sample after it is called: the receiver's
        // socket is still open then.
        let record = sampler.finish()?;
        let finished = t0.elapsed().as_secs_f64();
        let last = record.samples.last().map_or(0, |s| s.wire_bytes[0]);
        // The receiver's socket counts 100 000 bytes plus headers; the
        // sender's (its source is 127.0.0.1 here) received no data.
        assert!(
            (100_000..=100_000 + 100 * TCP_OVERHEAD + 1000).contains(&last),
            "counted {last} bytes for a 100 000 byte transfer"
        );
        // Its data began on the listening port, between two samples.
        let (a, b) = record.first_data[&port];
        assert!(
            0.0 <= a && a < b && b <= finished,
            "first data between {a} and {b} s, finished at {finished} s"
        );
        assert_eq!(record.data_start(port), Some((a + b) / 2.0));
        // The sender's port (not the group's address) is not recorded.
        assert_eq!(record.first_data.len(), 1, "{:?}", record.first_data);
        drop(rx);
        Ok(())
    }
}
