//! Request/response latency probe (see `testbeds::rr`): `serve` answers
//! requests, `client` measures round trips and writes their figures as JSON.

use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener},
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use testbeds::rr::{self, RrStats};

#[derive(Parser, Debug)]
#[command(about = "Small request/response round trips under load")]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Answer every request of `--request` bytes with `--response` bytes.
    Serve {
        #[arg(long)]
        bind: Ipv4Addr,
        #[arg(long)]
        port: u16,
        #[arg(long, default_value_t = 64)]
        request: usize,
        #[arg(long, default_value_t = 256)]
        response: usize,
    },
    /// Send a request every `--interval-ms` for `--seconds`; write the
    /// round-trip figures to `--out`.
    Client {
        #[arg(long)]
        server: SocketAddr,
        /// Local address to send from.
        #[arg(long)]
        bind: Option<Ipv4Addr>,
        #[arg(long)]
        seconds: f64,
        #[arg(long, default_value_t = 10)]
        interval_ms: u64,
        #[arg(long, default_value_t = 64)]
        request: usize,
        #[arg(long, default_value_t = 256)]
        response: usize,
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rr-probe: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> Result<()> {
    match Args::parse().cmd {
        Cmd::Serve {
            bind,
            port,
            request,
            response,
        } => {
            let l = TcpListener::bind((bind, port))
                .with_context(|| format!("listening on {bind}:{port}"))?;
            rr::serve(l, request, response)
        }
        Cmd::Client {
            server,
            bind,
            seconds,
            interval_ms,
            request,
            response,
            out,
        } => {
            let rtts = rr::run_client(
                server,
                bind,
                Duration::from_secs_f64(seconds),
                Duration::from_millis(interval_ms),
                request,
                response,
            )?;
            let stats = RrStats::from_samples(&rtts, request, response)
                .context("no round trip completed")?;
            std::fs::write(&out, serde_json::to_string(&stats)?)
                .with_context(|| format!("writing {}", out.display()))
        }
    }
}
