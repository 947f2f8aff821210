//! Pressure stall information: reading `memory.pressure` files and waiting
//! on PSI triggers (the kernel wakes a poller when stall time within a window
//! crosses a threshold), so the controller reacts before its next tick.

use std::{
    fs::File,
    io::Write,
    os::{fd::AsFd, unix::fs::OpenOptionsExt},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

/// One pressure file: avg10 of "some" and "full", and the stall totals (µs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Psi {
    pub some_avg10: f64,
    pub full_avg10: f64,
    pub some_total_us: u64,
    pub full_total_us: u64,
}

impl Psi {
    /// Parses the text of a pressure file. None when it has no "some" line.
    pub fn parse(text: &str) -> Option<Self> {
        let mut psi = Self::default();
        let mut seen_some = false;
        for line in text.lines() {
            let mut fields = line.split_whitespace();
            let kind = fields.next()?;
            let mut avg10 = None;
            let mut total = None;
            for f in fields {
                if let Some(v) = f.strip_prefix("avg10=") {
                    avg10 = v.parse::<f64>().ok();
                } else if let Some(v) = f.strip_prefix("total=") {
                    total = v.parse::<u64>().ok();
                }
            }
            match kind {
                "some" => {
                    psi.some_avg10 = avg10?;
                    psi.some_total_us = total?;
                    seen_some = true;
                }
                "full" => {
                    psi.full_avg10 = avg10?;
                    psi.full_total_us = total?;
                }
                _ => {}
            }
        }
        seen_some.then_some(psi)
    }

    pub fn read(path: &Path) -> Option<Self> {
        std::fs::read_to_string(path)
            .ok()
            .and_then(|t| Self::parse(&t))
    }
}

/// A registered PSI trigger: `stall_us` of "some" memory stall within
/// `window_us` wakes [`PsiTrigger::wait`].
#[derive(Debug)]
pub struct PsiTrigger {
    file: File,
    path: PathBuf,
}

impl PsiTrigger {
    pub fn new(path: &Path, stall_us: u64, window_us: u64) -> std::io::Result<Self> {
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)?;
        // The kernel wants the whole spec in one write, NUL included.
        file.write_all(format!("some {stall_us} {window_us}\0").as_bytes())?;
        Ok(Self {
            file,
            path: path.into(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits until the trigger fires or `timeout` passes. True when it fired.
    pub fn wait(&self, timeout: Duration) -> std::io::Result<bool> {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(self.file.as_fd(), PollFlags::POLLPRI)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) => Ok(false),
            Ok(_) => {
                let ev = fds[0].revents().unwrap_or(PollFlags::empty());
                if ev.contains(PollFlags::POLLERR) {
                    return Err(std::io::Error::other(format!(
                        "{}: the pressure file went away",
                        self.path.display()
                    )));
                }
                Ok(ev.contains(PollFlags::POLLPRI))
            }
            Err(nix::errno::Errno::EINTR) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}

/// What wakes the control loop before its timer: a PSI trigger where the
/// kernel takes one, otherwise (v1 hosts) cgroup eventfd notifications on
/// the scope: usage crossing the tight threshold, an OOM, vmpressure.
#[derive(Debug)]
pub enum Waker {
    Psi(PsiTrigger),
    /// (eventfd, what it watches) pairs registered in `cgroup.event_control`.
    V1Events(Vec<(nix::sys::eventfd::EventFd, File, String)>),
}

impl Waker {
    /// v1 notifications on the memory cgroup `dir`: usage crossing
    /// `usage_threshold` bytes, OOM, medium vmpressure. Each one that the
    /// kernel refuses is left out; None when none could be registered.
    pub fn v1_events(dir: &Path, usage_threshold: u64) -> Option<Self> {
        use nix::sys::eventfd::{EfdFlags, EventFd};
        use std::os::fd::AsRawFd;
        let mut out = Vec::new();
        let control = dir.join("cgroup.event_control");
        for (file, args) in [
            ("memory.usage_in_bytes", usage_threshold.to_string()),
            ("memory.oom_control", String::new()),
            ("memory.pressure_level", "medium".to_owned()),
        ] {
            let Ok(efd) = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            else {
                continue;
            };
            let Ok(target) = File::open(dir.join(file)) else {
                continue;
            };
            let spec = format!("{} {} {args}", efd.as_fd().as_raw_fd(), target.as_raw_fd());
            if std::fs::write(&control, spec.trim_end()).is_ok() {
                out.push((efd, target, file.to_owned()));
            }
        }
        (!out.is_empty()).then_some(Self::V1Events(out))
    }

    /// What the waker listens to, for logs and status.
    pub fn describe(&self) -> String {
        match self {
            Self::Psi(t) => format!("PSI trigger on {}", t.path().display()),
            Self::V1Events(v) => format!(
                "cgroup v1 events ({})",
                v.iter()
                    .map(|(_, _, f)| f.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }

    /// Waits until a notification arrives or `timeout` passes. True when
    /// woken by a notification.
    pub fn wait(&self, timeout: Duration) -> std::io::Result<bool> {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        match self {
            Self::Psi(t) => t.wait(timeout),
            Self::V1Events(v) => {
                let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
                let mut fds: Vec<PollFd> = v
                    .iter()
                    .map(|(e, _, _)| PollFd::new(e.as_fd(), PollFlags::POLLIN))
                    .collect();
                let n = match poll(&mut fds, PollTimeout::from(ms)) {
                    Ok(n) => n,
                    Err(nix::errno::Errno::EINTR) => 0,
                    Err(e) => return Err(e.into()),
                };
                if n > 0 {
                    for (e, _, _) in v {
                        // Reset the counter; EAGAIN when this one did not fire.
                        let _ = e.read();
                    }
                }
                Ok(n > 0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pressure_files() {
        let p = Psi::parse(
            "some avg10=1.50 avg60=0.20 avg300=0.00 total=12345\n\
             full avg10=0.75 avg60=0.10 avg300=0.00 total=678\n",
        )
        .expect("psi");
        assert_eq!(p.some_avg10, 1.5);
        assert_eq!(p.full_avg10, 0.75);
        assert_eq!(p.some_total_us, 12345);
        assert_eq!(p.full_total_us, 678);
        // cpu.pressure of old kernels has no "full" line.
        let p = Psi::parse("some avg10=0.00 avg60=0.00 avg300=0.00 total=5\n").expect("some");
        assert_eq!(p.full_total_us, 0);
        assert!(Psi::parse("").is_none());
        assert!(Psi::parse("some avg10=x total=1").is_none());
    }
}
