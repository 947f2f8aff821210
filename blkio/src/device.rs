//! Block devices named as users name them: `/dev/loop3` or `7:3`.

use std::{fmt, os::unix::fs::FileTypeExt, path::Path, str::FromStr};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::BlkioError;

/// A block device by number. Displays and serialises as `major:minor`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Device {
    pub major: u32,
    pub minor: u32,
}

impl Device {
    /// Parses `major:minor` or a `/dev` path without touching the system
    /// beyond a `stat` of the path.
    pub fn parse(input: &str) -> Result<Self, BlkioError> {
        let s = input.trim();
        let bad = |reason: String| BlkioError::Device {
            device: input.into(),
            reason,
        };
        if let Some((ma, mi)) = s.split_once(':') {
            let num = |p: &str, what: &str| {
                p.parse::<u32>()
                    .map_err(|_| bad(format!("{what} '{p}' is not a number")))
            };
            let major = num(ma, "major")?;
            let minor = num(mi, "minor")?;
            if major >= 1 << 12 || minor >= 1 << 20 {
                return Err(bad("major or minor out of range".into()));
            }
            return Ok(Self { major, minor });
        }
        if !s.starts_with('/') {
            return Err(bad(
                "use a path such as /dev/loop3 or major:minor such as 7:3".into(),
            ));
        }
        let meta = std::fs::metadata(s).map_err(|e| bad(e.to_string()))?;
        if !meta.file_type().is_block_device() {
            return Err(bad("not a block device".into()));
        }
        use std::os::unix::fs::MetadataExt;
        let rdev = meta.rdev();
        Ok(Self {
            major: libc::major(rdev),
            minor: libc::minor(rdev),
        })
    }

    /// Parses and checks that the device exists on this host.
    pub fn resolve(input: &str) -> Result<Self, BlkioError> {
        let dev = Self::parse(input)?;
        if !dev.sysfs().exists() {
            return Err(BlkioError::Device {
                device: input.trim().into(),
                reason: format!("no block device {dev} on this host"),
            });
        }
        Ok(dev)
    }

    fn sysfs(&self) -> std::path::PathBuf {
        Path::new("/sys/dev/block").join(self.to_string())
    }

    /// Kernel name (`loop3`), when the device exists.
    pub fn name(&self) -> Option<String> {
        let uevent = std::fs::read_to_string(self.sysfs().join("uevent")).ok()?;
        uevent
            .lines()
            .find_map(|l| l.strip_prefix("DEVNAME="))
            .map(str::to_owned)
    }

    /// The IO scheduler in use (`bfq`, `mq-deadline`, `none`), when known.
    /// Partitions report their disk's.
    pub fn scheduler(&self) -> Option<String> {
        let base = self.sysfs();
        let file = ["queue/scheduler", "../queue/scheduler"]
            .iter()
            .map(|p| base.join(p))
            .find(|p| p.exists())?;
        let text = std::fs::read_to_string(file).ok()?;
        selected_scheduler(&text)
    }

    /// Milliseconds the device has had IO in flight (`io_ticks`, the 10th
    /// field of its `stat`), when known.
    pub fn busy_ms(&self) -> Option<u64> {
        let text = std::fs::read_to_string(self.sysfs().join("stat")).ok()?;
        io_ticks(&text)
    }

    /// Kernel `dev_t` encoding (what the eBPF tracker reports).
    pub fn kernel_dev(&self) -> u32 {
        qos_common::io::kernel_dev(self.major, self.minor)
    }

    pub fn from_kernel_dev(dev: u32) -> Self {
        let (major, minor) = qos_common::io::split_kernel_dev(dev);
        Self { major, minor }
    }
}

/// The `io_ticks` field of a block device's `stat` file.
pub fn io_ticks(stat: &str) -> Option<u64> {
    stat.split_whitespace().nth(9)?.parse().ok()
}

/// `mq-deadline kyber [bfq] none` → `bfq`.
pub fn selected_scheduler(text: &str) -> Option<String> {
    text.split_whitespace()
        .find_map(|w| w.strip_prefix('[').and_then(|w| w.strip_suffix(']')))
        .map(str::to_owned)
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.major, self.minor)
    }
}

impl FromStr for Device {
    type Err = BlkioError;

    fn from_str(s: &str) -> Result<Self, BlkioError> {
        Self::parse(s)
    }
}

impl Serialize for Device {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Device {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn io_ticks_is_the_tenth_stat_field() {
        let stat = "    2910        8    72226      138     9262     2840 17985805    42279        0     2412    42602       53        0 44040336        0      628      183";
        assert_eq!(io_ticks(stat), Some(2412));
        assert_eq!(io_ticks("1 2 3"), None);
        assert_eq!(io_ticks("1 2 3 4 5 6 7 8 9 x"), None);
    }

    #[test]
    fn parses_numbers_and_refuses_nonsense() {
        assert_eq!(Device::parse("7:3").unwrap(), Device { major: 7, minor: 3 });
        assert_eq!(Device::parse(" 259:0 ").unwrap().to_string(), "259:0");
        for (bad, says) in [
            ("7:x", "minor 'x'"),
            ("a:3", "major 'a'"),
            ("loop3", "use a path"),
            ("/dev/definitely-not-here", "No such file"),
            ("/dev/null", "not a block device"),
            ("99999:1", "out of range"),
        ] {
            let e = Device::parse(bad).unwrap_err().to_string();
            assert!(e.contains(bad.trim()) && e.contains(says), "{bad}: {e}");
        }
        assert!(
            Device::resolve("4095:1048575")
                .unwrap_err()
                .to_string()
                .contains("no block device")
        );
        let d = Device { major: 7, minor: 3 };
        assert_eq!(Device::from_kernel_dev(d.kernel_dev()), d);
    }

    #[test]
    fn reads_the_selected_scheduler() {
        assert_eq!(
            selected_scheduler("mq-deadline kyber [bfq] none").as_deref(),
            Some("bfq")
        );
        assert_eq!(
            selected_scheduler("[none] mq-deadline").as_deref(),
            Some("none")
        );
        assert_eq!(selected_scheduler("none"), None);
    }
}
