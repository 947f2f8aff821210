//! Network interfaces of the host namespace: lookup and discovery of the
//! container-facing veths the tagger goes on.

use std::{collections::BTreeMap, path::Path};

use crate::NetError;

/// ifindex of an interface, with an error naming it when it does not exist.
pub fn ifindex(name: &str) -> Result<u32, NetError> {
    if name.is_empty() || name.len() > 15 || name.contains('/') {
        return Err(NetError::NoInterface(name.to_owned()));
    }
    nix::net::if_::if_nametoindex(name).map_err(|_| NetError::NoInterface(name.to_owned()))
}

/// Interfaces of the current network namespace: ifindex → name.
pub fn list(sys_class_net: &Path) -> BTreeMap<u32, String> {
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(sys_class_net) else {
        return out;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Ok(idx) = std::fs::read_to_string(e.path().join("ifindex")) else {
            continue;
        };
        if let Ok(idx) = idx.trim().parse::<u32>() {
            out.insert(idx, name);
        }
    }
    out
}

/// Name of the interface with this ifindex, if it still exists.
pub fn name_of(ifindex: u32) -> Option<String> {
    list(Path::new("/sys/class/net")).remove(&ifindex)
}

/// Driver name of an interface (ethtool GDRVINFO), e.g. "veth".
pub fn driver(name: &str) -> Option<String> {
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        version: [u8; 32],
        fw_version: [u8; 32],
        bus_info: [u8; 32],
        erom_version: [u8; 32],
        reserved2: [u8; 12],
        n_priv_flags: u32,
        n_stats: u32,
        testinfo_len: u32,
        eedump_len: u32,
        regdump_len: u32,
    }
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        data: *mut DrvInfo,
        _pad: [u8; 16],
    }
    const ETHTOOL_GDRVINFO: u32 = 3;
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    if name.len() >= 16 {
        return None;
    }
    // SAFETY: plain C structs, zero is valid.
    let mut info: DrvInfo = unsafe { std::mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    let mut req = IfReq {
        name: [0; 16],
        data: &mut info,
        _pad: [0; 16],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: a datagram socket only used for the ioctl, closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: `req` and `info` outlive the call; the kernel writes at most
    // sizeof(DrvInfo) bytes into `info`.
    let rc = unsafe { libc::ioctl(fd, SIOCETHTOOL, &mut req) };
    // SAFETY: closing the socket we opened.
    unsafe { libc::close(fd) };
    if rc != 0 {
        return None;
    }
    let end = info
        .driver
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(info.driver.len());
    Some(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

/// Which interfaces get the container tagger.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum ContainerInterfaces {
    /// "auto": every veth except the shaped interface; "none": no tagger.
    Mode(String),
    /// Interface name patterns; `*` matches any run of characters.
    Patterns(Vec<String>),
}

impl Default for ContainerInterfaces {
    fn default() -> Self {
        Self::Mode("auto".into())
    }
}

impl ContainerInterfaces {
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Self::Mode(m) if m == "auto" || m == "none" => Ok(()),
            Self::Mode(m) => Err(format!(
                "container_interfaces = \"{m}\": use \"auto\", \"none\" or a list of name patterns"
            )),
            Self::Patterns(p) if p.iter().any(|s| s.is_empty()) => {
                Err("container_interfaces: empty pattern".into())
            }
            Self::Patterns(_) => Ok(()),
        }
    }

    /// The interfaces (of `all`) the tagger belongs on.
    pub fn select(
        &self,
        all: &BTreeMap<u32, String>,
        shaped: &str,
        driver: impl Fn(&str) -> Option<String>,
    ) -> BTreeMap<u32, String> {
        all.iter()
            .filter(|(_, name)| name.as_str() != shaped && name.as_str() != "lo")
            .filter(|(_, name)| match self {
                Self::Mode(m) if m == "auto" => driver(name).as_deref() == Some("veth"),
                Self::Mode(_) => false,
                Self::Patterns(p) => p.iter().any(|pat| glob_match(pat, name)),
            })
            .map(|(i, n)| (*i, n.clone()))
            .collect()
    }
}

/// `*`-only glob matching.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == name;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !name.starts_with(first)
        || !name[first.len()..].ends_with(last)
        || name.len() < first.len() + last.len()
    {
        return false;
    }
    let mut rest = &name[first.len()..name.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(pos) => rest = &rest[pos + mid.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("veth*", "veth123"));
        assert!(glob_match("*", "anything"));
        assert!(glob_match("cali*x", "cali12x"));
        assert!(glob_match("a*b*c", "aXXbYYc"));
        assert!(!glob_match("a*b*c", "aXXcYYb"));
        assert!(!glob_match("veth*", "eth0"));
        assert!(!glob_match("ab*ba", "aba"));
        assert!(glob_match("eth0", "eth0"));
        assert!(!glob_match("eth0", "eth01"));
    }

    #[test]
    fn selection() {
        let all: BTreeMap<u32, String> = [
            (1, "lo"),
            (2, "eth0"),
            (3, "veth1"),
            (4, "veth2"),
            (5, "cali9"),
        ]
        .map(|(i, n)| (i, n.to_string()))
        .into();
        let drv = |n: &str| {
            Some(
                if n.starts_with("veth") {
                    "veth"
                } else {
                    "virtio_net"
                }
                .to_string(),
            )
        };
        let auto = ContainerInterfaces::default().select(&all, "veth2", drv);
        assert_eq!(auto.values().cloned().collect::<Vec<_>>(), vec!["veth1"]);
        let none = ContainerInterfaces::Mode("none".into()).select(&all, "eth0", drv);
        assert!(none.is_empty());
        let pats = ContainerInterfaces::Patterns(vec!["cali*".into(), "veth1".into()])
            .select(&all, "eth0", drv);
        assert_eq!(
            pats.values().cloned().collect::<Vec<_>>(),
            vec!["veth1", "cali9"]
        );
        assert!(ContainerInterfaces::Mode("some".into()).validate().is_err());
        assert!(
            ContainerInterfaces::Patterns(vec!["".into()])
                .validate()
                .is_err()
        );
    }

    #[test]
    fn loopback_is_found_and_junk_is_refused() {
        assert_eq!(ifindex("lo").ok(), Some(1));
        for bad in ["", "no-such-if-0", "a/b", "0123456789abcdefg"] {
            let e = ifindex(bad).expect_err(bad).to_string();
            assert!(e.contains("does not exist"), "{e}");
        }
        assert!(
            list(Path::new("/sys/class/net"))
                .values()
                .any(|n| n == "lo")
        );
    }
}
