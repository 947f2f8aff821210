//! A qosd process for scripts: its own socket, state directory and bpffs
//! pin directory; stop, SIGKILL, restart; dropping it kills it and runs
//! `qosd --cleanup`, so no pinned program outlives the run.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail};

use crate::{KillOnDrop, unique, wait_for};

#[derive(Debug)]
pub struct Qosd {
    bin_dir: PathBuf,
    dir: tempfile::TempDir,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub pins: PathBuf,
    child: Option<KillOnDrop>,
    /// Restarts so far (each writes its own log).
    starts: u32,
}

impl Qosd {
    /// Writes a config with `daemon_extra` in `[daemon]` and `rest` after
    /// it (the `[net]`, `[mem]`, `[io]` tables), and starts qosd.
    pub fn start(bin_dir: &Path, log: &str, daemon_extra: &str, rest: &str) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("qosd-").tempdir()?;
        let socket = dir.path().join("qosd.sock");
        let pins = PathBuf::from("/sys/fs/bpf").join(unique("qos-run-"));
        let config = dir.path().join("qosd.toml");
        std::fs::write(
            &config,
            format!(
                "[daemon]\nsocket = \"{}\"\nstate_dir = \"{}\"\nbpf_pin_dir = \"{}\"\nlog = \"{log}\"\n{daemon_extra}\n{rest}",
                socket.display(),
                dir.path().join("state").display(),
                pins.display(),
            ),
        )?;
        let mut q = Self {
            bin_dir: bin_dir.to_owned(),
            dir,
            config,
            socket,
            pins,
            child: None,
            starts: 0,
        };
        q.restart()?;
        Ok(q)
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Starts qosd (again) and waits until it answers.
    pub fn restart(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("qosd is already running");
        }
        self.starts += 1;
        let log = std::fs::File::create(self.log_path())?;
        let child = Command::new(self.bin_dir.join("qosd"))
            .arg("--config")
            .arg(&self.config)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting qosd")?;
        self.child = Some(KillOnDrop(child));
        if !wait_for(Duration::from_secs(15), || {
            self.ctl(&["status"]).is_ok_and(|o| o.status.success())
        }) {
            bail!("qosd did not come up:\n{}", self.log());
        }
        Ok(())
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join(format!("qosd-{}.log", self.starts))
    }

    /// The current run's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.0.id())
    }

    /// SIGKILL: no chance to clean anything up.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            c.0.kill()?;
            c.0.wait()?;
        }
        Ok(())
    }

    /// SIGTERM and wait for the exit.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.0.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            )?;
            if !wait_for(Duration::from_secs(15), || {
                matches!(c.0.try_wait(), Ok(Some(_)))
            }) {
                bail!("qosd did not stop on SIGTERM");
            }
        }
        Ok(())
    }

    pub fn ctl(&self, args: &[&str]) -> Result<Output> {
        Command::new(self.bin_dir.join("qosctl"))
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("running qosctl")
    }

    /// qosctl that must succeed; its stdout.
    pub fn ok(&self, args: &[&str]) -> Result<String> {
        let o = self.ctl(args)?;
        if !o.status.success() {
            bail!(
                "qosctl {args:?}: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    }

    /// `qosctl ... -o json` parsed.
    pub fn json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        Ok(serde_json::from_str(&self.ok(&a)?)?)
    }

    /// Kills qosd and removes everything it left (`qosd --cleanup`).
    pub fn cleanup(&mut self) -> Result<()> {
        self.kill()?;
        let o = Command::new(self.bin_dir.join("qosd"))
            .arg("--config")
            .arg(&self.config)
            .arg("--cleanup")
            .output()
            .context("qosd --cleanup")?;
        if !o.status.success() {
            bail!("qosd --cleanup: {}", String::from_utf8_lossy(&o.stderr));
        }
        Ok(())
    }
}

impl Drop for Qosd {
    fn drop(&mut self) {
        let _ = self.cleanup();
    }
}
