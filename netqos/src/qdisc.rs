//! The fq qdisc that ingress ACK pacing needs on the shaped interface.
//!
//! A receiver can only slow a TCP sender as far as two segments per round
//! trip by marking or clamping; on short round trips that is faster than
//! most shares. Holding the receiver's ACKs until the flow's rate allows
//! them (an earliest departure time set by the datapath) slows the sender
//! to exactly that rate, whatever the round trip. The kernel honours such
//! times only in the fq qdisc, so qosd puts fq at the interface's root when
//! the root is the kernel's default (handle `0:`): one fq, or one per
//! transmit queue under mq. It never replaces a qdisc someone configured.
//!
//! Ours is told apart by its handle, [`OUR_HANDLE`]; `qosd --cleanup`
//! removes it (the kernel's default comes back), a restart keeps it.

use std::{path::Path, process::Command};

use tracing::{info, warn};

/// Major handle of the root qdisc qosd installs.
pub const OUR_HANDLE: &str = "7105:";
/// Packets one flow may hold in fq (the default, 100, is a few
/// milliseconds of ACKs of a fast flow without GRO).
const FLOW_LIMIT: &str = "1000";

/// The root qdisc of an interface, as `tc qdisc show dev X root` prints it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RootQdisc {
    pub kind: String,
    pub handle: String,
}

impl RootQdisc {
    /// The kernel's default qdisc (nobody configured one).
    pub fn is_default(&self) -> bool {
        self.handle == "0:"
    }

    pub fn is_ours(&self) -> bool {
        self.handle == OUR_HANDLE
    }
}

/// Parses the first line of `tc qdisc show dev X root`
/// (`qdisc <kind> <handle> root ...`).
pub fn parse_root(tc_output: &str) -> Option<RootQdisc> {
    let line = tc_output.lines().find(|l| l.starts_with("qdisc "))?;
    let mut words = line.split_whitespace().skip(1);
    let kind = words.next()?.to_owned();
    let handle = words.next()?.to_owned();
    handle.ends_with(':').then_some(RootQdisc { kind, handle })
}

/// How ACK pacing stands on an interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AckQdisc {
    /// fq (ours) is at the root; `installed`: by this call.
    Ready { installed: bool },
    /// It cannot be: why, in words for the operator.
    Unavailable(String),
    /// Installing it failed for a reason that may pass (the device was
    /// just created, ...): worth another try later.
    Failed(String),
}

impl AckQdisc {
    pub fn is_ready(&self) -> bool {
        matches!(self, Self::Ready { .. })
    }

    /// "on", or "off: <why>".
    pub fn describe(&self) -> String {
        match self {
            Self::Ready { .. } => "on".into(),
            Self::Unavailable(why) | Self::Failed(why) => format!("off: {why}"),
        }
    }
}

fn tc(args: &[&str]) -> Result<String, String> {
    let out = Command::new("tc")
        .args(args)
        .output()
        .map_err(|e| format!("running tc (iproute2): {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "tc {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The root qdisc of `iface`.
pub fn root(iface: &str) -> Result<RootQdisc, String> {
    let out = tc(&["qdisc", "show", "dev", iface, "root"])?;
    parse_root(&out).ok_or_else(|| format!("tc printed no root qdisc for {iface}: {out:?}"))
}

/// Transmit queues of `iface` (1 when unknown).
fn tx_queues(iface: &str) -> usize {
    let dir = Path::new("/sys/class/net").join(iface).join("queues");
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("tx-"))
                .count()
        })
        .unwrap_or(1)
        .max(1)
}

/// Makes sure fq (ours) is the root qdisc of `iface`, installing it over
/// the kernel's default.
pub fn ensure_fq(iface: &str) -> AckQdisc {
    let current = match root(iface) {
        Ok(r) => r,
        Err(e) => return AckQdisc::Failed(e),
    };
    if current.is_ours() {
        return AckQdisc::Ready { installed: false };
    }
    if !current.is_default() {
        return AckQdisc::Unavailable(format!(
            "{iface} has a configured root qdisc ({} {}); ACK pacing needs fq there and qosd \
             does not replace a qdisc it did not install",
            current.kind, current.handle
        ));
    }
    let queues = tx_queues(iface);
    // `add`, not `replace`, at the root: the kernel lets it take the place
    // of the default qdisc but refuses it over a configured one, so a qdisc
    // configured since the check above is never replaced.
    let result = if queues == 1 {
        tc(&[
            "qdisc",
            "add",
            "dev",
            iface,
            "root",
            "handle",
            OUR_HANDLE,
            "fq",
            "flow_limit",
            FLOW_LIMIT,
        ])
        .map(drop)
    } else {
        // One fq per transmit queue keeps the device's queues parallel.
        tc(&[
            "qdisc", "add", "dev", iface, "root", "handle", OUR_HANDLE, "mq",
        ])
        .and_then(|_| {
            (1..=queues).try_for_each(|q| {
                let parent = format!("{}{q:x}", OUR_HANDLE);
                tc(&[
                    "qdisc",
                    "replace",
                    "dev",
                    iface,
                    "parent",
                    &parent,
                    "fq",
                    "flow_limit",
                    FLOW_LIMIT,
                ])
                .map(drop)
            })
        })
    };
    match result {
        Ok(()) => {
            info!(
                iface,
                queues, "fq installed at the root for ingress ACK pacing"
            );
            AckQdisc::Ready { installed: true }
        }
        Err(e) => {
            // Leave the default as it was.
            if root(iface).is_ok_and(|r| r.is_ours()) {
                let _ = tc(&["qdisc", "del", "dev", iface, "root"]);
            }
            if e.contains("kind is unknown") {
                AckQdisc::Unavailable(format!("the kernel has no fq qdisc (sch_fq): {e}"))
            } else if e.contains("running tc") {
                AckQdisc::Unavailable(e)
            } else {
                AckQdisc::Failed(e)
            }
        }
    }
}

/// Removes the root qdisc of `iface` if it is ours (the kernel's default
/// comes back); anything else is left alone.
pub fn remove_ours(iface: &str) {
    match root(iface) {
        Ok(r) if r.is_ours() => match tc(&["qdisc", "del", "dev", iface, "root"]) {
            Ok(_) => info!(iface, "fq for ACK pacing removed"),
            Err(e) => warn!(iface, error = %e, "removing the fq qdisc"),
        },
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_root_lines() {
        let r = parse_root("qdisc noqueue 0: root refcnt 2 \n").unwrap();
        assert_eq!((r.kind.as_str(), r.handle.as_str()), ("noqueue", "0:"));
        assert!(r.is_default() && !r.is_ours());
        let r = parse_root("qdisc fq 7105: root refcnt 2 limit 10000p flow_limit 1000p\n").unwrap();
        assert!(r.is_ours() && !r.is_default());
        let r = parse_root("qdisc htb 1: root refcnt 2 r2q 10 default 0x99\n").unwrap();
        assert_eq!(r.kind, "htb");
        assert!(!r.is_default() && !r.is_ours());
        assert_eq!(parse_root(""), None);
        assert_eq!(parse_root("Error: Cannot find device \"x\"\n"), None);
        assert_eq!(parse_root("qdisc fq\n"), None);
        assert_eq!(parse_root("qdisc fq root\n"), None);
    }
}
