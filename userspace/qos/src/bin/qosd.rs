//! qosd: the per-host daemon. A thin shell around the `qos` library: config,
//! the API socket, the control loop, signals.

use std::{
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Instant,
};

use anyhow::{Context, Result, bail};
use clap::Parser;
use qos::{Config, Qos, config::DEFAULT_CONFIG, server::ApiSocket};
use tracing::{error, info, warn};

/// Per-cgroup network, memory and disk IO isolation daemon (one per host,
/// runs as root).
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Config file (TOML). A missing file at the default path means defaults.
    #[arg(long, short, default_value = DEFAULT_CONFIG)]
    config: PathBuf,
    /// API socket (overrides [daemon] socket).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// State directory (overrides [daemon] state_dir).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Validate the config and exit.
    #[arg(long)]
    check_config: bool,
    /// Report what this kernel offers (cgroup layout, features, every eBPF
    /// program loaded but not attached) and the mode each subsystem would
    /// use, then exit: 0 if every program loads. Changes nothing.
    #[arg(long)]
    probe: bool,
    /// Remove everything of ours from the kernel (pinned eBPF programs,
    /// links and maps of any qosd build, IO limits, memory caps) and exit.
    /// The desired state file stays. Refused while a qosd is running.
    #[arg(long, conflicts_with_all = ["probe", "check_config"])]
    cleanup: bool,
    /// Output of --probe.
    #[arg(long, short, value_parser = ["text", "json"], default_value = "text")]
    output: String,
}

fn main() {
    if let Err(e) = run() {
        eprintln!("qosd: {e:#}");
        std::process::exit(1);
    }
}

/// `qosd --cleanup`: adopt what is there (so that the subsystems undo their
/// own settings), remove it all; if the config no longer starts (the
/// interface is gone), remove at least every pinned datapath.
fn cleanup(config: Config) -> Result<()> {
    if std::os::unix::net::UnixStream::connect(&config.daemon.socket).is_ok() {
        bail!(
            "a qosd is running on {}; stop it first",
            config.daemon.socket.display()
        );
    }
    let root = config.daemon.bpf_pin_dir.clone();
    match Qos::start(config) {
        Ok(mut q) => q.cleanup(),
        Err(e) => {
            warn!(error = %e, "cannot start with this config; removing the pinned datapaths only");
            qos::remove_pins(&root);
        }
    }
    info!(pins = %root.display(), "cleaned up");
    Ok(())
}

fn run() -> Result<()> {
    let args = Args::parse();
    if args.probe {
        let report = qos::probe::KernelReport::probe();
        if args.output == "json" {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            print!("{}", report.text());
        }
        if !report.all_loaded() {
            std::process::exit(1);
        }
        return Ok(());
    }
    let explicit = args.config.as_path() != std::path::Path::new(DEFAULT_CONFIG);
    let mut config = Config::load(&args.config, explicit)?;
    if let Some(s) = args.socket {
        config.daemon.socket = s;
    }
    if let Some(d) = args.state_dir {
        config.daemon.state_dir = d;
    }
    if args.check_config {
        println!("{}: ok", args.config.display());
        return Ok(());
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&config.daemon.log))
        .context("log filter")?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        // No colour codes in a log file or the journal, nor where NO_COLOR
        // asks for none.
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stdout())
                && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
        )
        .init();
    if !nix::unistd::geteuid().is_root() {
        bail!("qosd must run as root (it loads eBPF programs and owns cgroup settings)");
    }
    if args.cleanup {
        return cleanup(config);
    }

    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, Arc::clone(&stop))
            .context("installing signal handlers")?;
    }

    let socket_path = config.daemon.socket.clone();
    let socket = ApiSocket::bind(&socket_path)?;
    let metrics_server = match config.daemon.metrics_listen {
        Some(addr) => Some(qos::metrics::MetricsServer::bind(addr).map_err(anyhow::Error::msg)?),
        None => None,
    };
    let qos = Arc::new(Mutex::new(Qos::start(config).context("starting")?));
    info!(socket = %socket_path.display(), pid = std::process::id(), "qosd ready");

    let ticker = {
        let qos = Arc::clone(&qos);
        let stop = Arc::clone(&stop);
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                let mut next = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    {
                        let mut q = qos.lock().unwrap_or_else(|p| p.into_inner());
                        let started = Instant::now();
                        if let Err(e) = q.tick() {
                            warn!(error = %e, "control step");
                            q.degrade("control_step");
                        }
                        q.record_step(started.elapsed());
                    }
                    next += netqos::TICK;
                    let now = Instant::now();
                    if next > now {
                        std::thread::sleep(next - now);
                    } else {
                        // Behind (a step took longer than a tick: thousands
                        // of quotas on a small host): still let waiting API
                        // calls have the lock before the next step.
                        next = now;
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                }
            })?
    };
    // Memory control on its own clock and thread: a synchronous reclaim
    // must not delay the network loop.
    let memory = {
        let (controller, waker, interval) = {
            let mut q = qos.lock().unwrap_or_else(|p| p.into_inner());
            let waker = q.mem_waker();
            (q.mem_controller(), waker, q.mem_interval())
        };
        match controller {
            Some(emc) => {
                let stop = Arc::clone(&stop);
                Some(
                    std::thread::Builder::new()
                        .name("memory".into())
                        .spawn(move || {
                            emc::run_loop(&emc, waker.as_ref(), interval, &stop);
                        })?,
                )
            }
            None => None,
        }
    };
    // Disk IO control on its own clock and thread too: a step reads the
    // tracker's maps and pauses writers, which must not wait for the others.
    let io = {
        let (controller, interval) = {
            let q = qos.lock().unwrap_or_else(|p| p.into_inner());
            (q.io_controller(), q.io_interval())
        };
        match controller {
            Some(io) => {
                let stop = Arc::clone(&stop);
                Some(
                    std::thread::Builder::new()
                        .name("io".into())
                        .spawn(move || {
                            blkio::controller::run_loop(&io, interval, &stop);
                        })?,
                )
            }
            None => None,
        }
    };
    let metrics = match metrics_server {
        Some(server) => {
            info!(addr = %server.addr(), "metrics endpoint: GET /metrics");
            let qos = Arc::clone(&qos);
            let stop = Arc::clone(&stop);
            Some(
                std::thread::Builder::new()
                    .name("metrics".into())
                    .spawn(move || {
                        server.serve(
                            || qos.lock().unwrap_or_else(|p| p.into_inner()).snapshot(),
                            &stop,
                        );
                    })?,
            )
        }
        None => None,
    };
    socket.serve(&qos, &stop);
    info!("stopping");
    if let Some(m) = metrics
        && m.join().is_err()
    {
        error!("metrics thread panicked");
    }
    if ticker.join().is_err() {
        error!("control thread panicked");
    }
    if let Some(m) = memory
        && m.join().is_err()
    {
        error!("memory thread panicked");
    }
    if let Some(t) = io
        && t.join().is_err()
    {
        error!("io thread panicked");
    }
    drop(socket);
    qos.lock().unwrap_or_else(|p| p.into_inner()).shutdown();
    info!("stopped");
    Ok(())
}
