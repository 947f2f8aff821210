//! A small request/response probe (the latency a guaranteed tenant's RPCs
//! see while its link is contended): the client sends a request, waits for
//! the whole response, records the round trip, and repeats on a fixed
//! schedule. Run by the `rr-probe` program inside a cgroup or namespace.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// Round-trip figures of one probe run, microseconds.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct RrStats {
    pub samples: usize,
    pub request_bytes: usize,
    pub response_bytes: usize,
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

impl RrStats {
    /// Figures of the round trips `rtts_us` (None when there are none).
    pub fn from_samples(
        rtts_us: &[f64],
        request_bytes: usize,
        response_bytes: usize,
    ) -> Option<Self> {
        let mut v: Vec<f64> = rtts_us.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        // Nearest rank: the smallest sample with at least p % at or below it.
        let rank = |p: f64| {
            let k = ((p / 100.0) * v.len() as f64).ceil() as usize;
            v[k.clamp(1, v.len()) - 1]
        };
        Some(Self {
            samples: v.len(),
            request_bytes,
            response_bytes,
            p50_us: rank(50.0),
            p99_us: rank(99.0),
            max_us: v[v.len() - 1],
        })
    }
}

/// Serves every connection on `listener`: for each `request_bytes` read,
/// answers `response_bytes`. Runs until the process is killed.
pub fn serve(listener: TcpListener, request_bytes: usize, response_bytes: usize) -> Result<()> {
    for conn in listener.incoming() {
        let mut s = conn.context("accepting a probe connection")?;
        std::thread::spawn(move || {
            let _ = s.set_nodelay(true);
            let mut req = vec![0u8; request_bytes];
            let resp = vec![0x5au8; response_bytes];
            while s.read_exact(&mut req).is_ok() {
                if s.write_all(&resp).is_err() {
                    break;
                }
            }
        });
    }
    Ok(())
}

/// Sends one request every `interval` for `duration` over one connection
/// from `bind` (any port) to `server` and returns the round trips, µs.
/// A round trip longer than the interval delays the next request (no
/// overlap): the schedule then resumes from that point.
pub fn run_client(
    server: SocketAddr,
    bind: Option<Ipv4Addr>,
    duration: Duration,
    interval: Duration,
    request_bytes: usize,
    response_bytes: usize,
) -> Result<Vec<f64>> {
    let mut s = connect(server, bind)?;
    s.set_nodelay(true).context("TCP_NODELAY")?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .context("read timeout")?;
    let req = vec![0xa5u8; request_bytes];
    let mut resp = vec![0u8; response_bytes];
    let start = Instant::now();
    let mut next = start;
    let mut rtts = Vec::new();
    while start.elapsed() < duration {
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        }
        let t = Instant::now();
        s.write_all(&req).context("sending a probe request")?;
        s.read_exact(&mut resp)
            .context("reading a probe response")?;
        rtts.push(t.elapsed().as_secs_f64() * 1e6);
        next = (next + interval).max(Instant::now());
    }
    Ok(rtts)
}

fn connect(server: SocketAddr, bind: Option<Ipv4Addr>) -> Result<TcpStream> {
    let Some(local) = bind else {
        return TcpStream::connect_timeout(&server, Duration::from_secs(5))
            .with_context(|| format!("connecting to {server}"));
    };
    // std has no bind-then-connect; nix does.
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrIn, bind as bind_fd, connect as connect_fd,
        socket,
    };
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .context("creating the probe socket")?;
    let SocketAddr::V4(v4) = server else {
        bail!("the probe speaks IPv4 only, not {server}");
    };
    use std::os::fd::AsRawFd;
    bind_fd(
        fd.as_raw_fd(),
        &SockaddrIn::from(std::net::SocketAddrV4::new(local, 0)),
    )
    .with_context(|| format!("binding the probe socket to {local}"))?;
    connect_fd(fd.as_raw_fd(), &SockaddrIn::from(v4))
        .with_context(|| format!("connecting from {local} to {server}"))?;
    Ok(TcpStream::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=200).map(f64::from).collect();
        let s = RrStats::from_samples(&v, 64, 1000).unwrap();
        assert_eq!(s.samples, 200);
        assert_eq!(s.p50_us, 100.0);
        assert_eq!(s.p99_us, 198.0);
        assert_eq!(s.max_us, 200.0);
        let one = RrStats::from_samples(&[7.0], 1, 1).unwrap();
        assert_eq!((one.p50_us, one.p99_us, one.max_us), (7.0, 7.0, 7.0));
        assert!(RrStats::from_samples(&[], 1, 1).is_none());
        assert!(RrStats::from_samples(&[f64::NAN], 1, 1).is_none());
    }

    #[test]
    fn a_probe_round_trip_over_loopback() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || serve(l, 64, 1000));
        let rtts = run_client(
            addr,
            Some(Ipv4Addr::LOCALHOST),
            Duration::from_millis(200),
            Duration::from_millis(10),
            64,
            1000,
        )
        .unwrap();
        // 200 ms at one request per 10 ms.
        assert!(
            (15..=21).contains(&rtts.len()),
            "{} round trips",
            rtts.len()
        );
        assert!(rtts.iter().all(|r| *r > 0.0 && *r < 1e6));
    }
}
