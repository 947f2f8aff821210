//! A small allocator with a known behaviour, for memory tests and the
//! elasticity script: grows anonymous memory at a set rate (every page
//! touched), optionally keeps a file's pages in the page cache, holds,
//! oscillates, or touches its working set at random and reports the
//! latency of each access.
//!
//! Output (stdout, one JSON object per line): `{"event":"ready",...}` once
//! the target is reached; with `--touch`, `{"event":"latency","t":s,
//! "p50_ns":..,"p99_ns":..,"max_ns":..,"n":..}` every 100 ms.

use std::{
    io::{Read, Write},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use clap::{Args, Parser};

const CHUNK: usize = 4 << 20;
const PAGE: usize = 4096;

#[derive(Args, Clone, Debug, Default)]
pub struct LoadArgs {
    /// Anonymous memory to reach, MiB.
    #[arg(long, default_value_t = 0)]
    pub anon_mb: u64,
    /// Allocation rate, MiB/s (0: as fast as possible).
    #[arg(long, default_value_t = 0)]
    pub rate_mbps: u64,
    /// Keep this file's pages in the page cache (created if missing).
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// Size of that file, MiB.
    #[arg(long, default_value_t = 0)]
    pub file_mb: u64,
    /// After reaching the target, swing between --anon-mb and this many MiB
    /// with this period (seconds).
    #[arg(long)]
    pub oscillate_low_mb: Option<u64>,
    #[arg(long, default_value_t = 4.0)]
    pub period_s: f64,
    /// Touch the working set at random and report access latencies.
    #[arg(long)]
    pub touch: bool,
    /// Exit this many seconds after the target is reached (0: run until
    /// killed).
    #[arg(long, default_value_t = 0.0)]
    pub hold_s: f64,
}

#[derive(Parser, Debug)]
#[command(about = "Allocate memory with a known behaviour (memory tests)")]
pub struct Cli {
    #[command(flatten)]
    pub load: LoadArgs,
}

fn emit(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

struct Anon {
    chunks: Vec<Vec<u8>>,
}

impl Anon {
    fn mb(&self) -> u64 {
        (self.chunks.len() * CHUNK) as u64 >> 20
    }

    /// Grows (touching every page) or shrinks to `target_mb` at `rate` MiB/s.
    fn go_to(&mut self, target_mb: u64, rate_mbps: u64) {
        let start = Instant::now();
        let mut moved: u64 = 0;
        while self.mb() != target_mb {
            if self.mb() < target_mb {
                self.chunks.push(vec![0x5a; CHUNK]);
            } else {
                self.chunks.pop();
            }
            moved += (CHUNK >> 20) as u64;
            if rate_mbps > 0 {
                let due = Duration::from_secs_f64(moved as f64 / rate_mbps as f64);
                if let Some(wait) = due.checked_sub(start.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
        }
    }
}

fn keep_file_cached(path: &PathBuf, mb: u64) -> Result<()> {
    let want = mb << 20;
    let exists = std::fs::metadata(path)
        .map(|m| m.len() >= want)
        .unwrap_or(false);
    if !exists {
        let mut f =
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        let block = vec![0x33u8; 1 << 20];
        for _ in 0..mb {
            f.write_all(&block)?;
        }
        f.sync_all()?;
    }
    // Read twice: the second pass moves the pages to the active list.
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..2 {
        let mut f =
            std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
        while f.read(&mut buf)? > 0 {}
    }
    Ok(())
}

/// Random page touches; latency percentiles every 100 ms. Runs until
/// `until`.
fn touch(anon: &mut Anon, start: Instant, until: Option<Instant>) {
    let pages_per_chunk = CHUNK / PAGE;
    let n_pages = anon.chunks.len() * pages_per_chunk;
    if n_pages == 0 {
        return;
    }
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut lat: Vec<u64> = Vec::with_capacity(100_000);
    let mut window = Instant::now();
    loop {
        for _ in 0..256 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let p = (x % n_pages as u64) as usize;
            let (c, o) = (p / pages_per_chunk, (p % pages_per_chunk) * PAGE);
            let t = Instant::now();
            let v = anon.chunks[c][o];
            anon.chunks[c][o] = v.wrapping_add(1);
            lat.push(t.elapsed().as_nanos() as u64);
        }
        // Leave the CPU to the rest of the machine (2 cores here).
        std::thread::sleep(Duration::from_micros(500));
        if window.elapsed() >= Duration::from_millis(100) {
            lat.sort_unstable();
            let q = |p: f64| lat[((lat.len() - 1) as f64 * p) as usize];
            emit(&format!(
                "{{\"event\":\"latency\",\"t\":{:.3},\"p50_ns\":{},\"p99_ns\":{},\"max_ns\":{},\"n\":{}}}",
                start.elapsed().as_secs_f64(),
                q(0.5),
                q(0.99),
                lat[lat.len() - 1],
                lat.len()
            ));
            lat.clear();
            window = Instant::now();
        }
        if until.is_some_and(|u| Instant::now() >= u) {
            return;
        }
    }
}

/// Runs the load described by `args`.
pub fn run(args: &LoadArgs) -> Result<()> {
    let start = Instant::now();
    if let Some(f) = &args.file {
        keep_file_cached(f, args.file_mb)?;
    }
    let mut anon = Anon { chunks: Vec::new() };
    anon.go_to(args.anon_mb, args.rate_mbps);
    emit(&format!(
        "{{\"event\":\"ready\",\"t\":{:.3},\"anon_mb\":{}}}",
        start.elapsed().as_secs_f64(),
        anon.mb()
    ));
    let until = (args.hold_s > 0.0).then(|| Instant::now() + Duration::from_secs_f64(args.hold_s));
    if args.touch {
        touch(&mut anon, start, until);
        return Ok(());
    }
    if let Some(low) = args.oscillate_low_mb {
        let half = Duration::from_secs_f64(args.period_s / 2.0);
        let high = args.anon_mb;
        let rate = if args.rate_mbps > 0 {
            args.rate_mbps
        } else {
            u64::MAX / 2
        };
        loop {
            for target in [low, high] {
                let t = Instant::now();
                anon.go_to(target, rate);
                if let Some(rest) = half.checked_sub(t.elapsed()) {
                    std::thread::sleep(rest);
                }
                if until.is_some_and(|u| Instant::now() >= u) {
                    return Ok(());
                }
            }
        }
    }
    match until {
        Some(u) => std::thread::sleep(u.saturating_duration_since(Instant::now())),
        None => loop {
            std::thread::sleep(Duration::from_secs(3600));
        },
    }
    Ok(())
}

/// Parses a command line (program name first) and runs it.
pub fn run_from<I: IntoIterator<Item = String>>(argv: I) -> Result<()> {
    let cli = Cli::try_parse_from(argv).map_err(|e| anyhow::anyhow!("{e}"))?;
    run(&cli.load)
}
