//! What a kernel accepts: one entry per eBPF program, loaded (verified) but
//! not attached. Filled by each subsystem; reported by `qosd --probe`.

use serde::Serialize;

/// One program's verdict on the running kernel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ProgramProbe {
    /// The object it comes from (`qos-net`, `qos-io`).
    pub object: &'static str,
    pub program: String,
    /// Program type and attach point, e.g. `tc egress`, `tp_btf/block_bio_queue`.
    pub kind: String,
    pub loaded: bool,
    /// Why not: the syscall error and the end of the verifier's log.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The running kernel's release (`uname -r`).
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// `(major, minor)` of a release string such as `6.1.0-48-amd64`.
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// Lines of a verifier log kept in an error: the verdict is at the end, and a
/// full log of a large program runs to megabytes.
pub const VERIFIER_TAIL_LINES: usize = 40;

/// How a rejected program is reported: the syscall's error and the end of
/// the verifier's log.
pub fn load_failure(io_error: &dyn std::fmt::Display, verifier_log: &str) -> String {
    format!(
        "BPF_PROG_LOAD: {io_error}; verifier:\n{}",
        verifier_tail(verifier_log)
    )
}

/// The last [`VERIFIER_TAIL_LINES`] lines of a verifier log.
pub fn verifier_tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    let skipped = lines.len().saturating_sub(VERIFIER_TAIL_LINES);
    let mut out = String::new();
    if skipped > 0 {
        out.push_str(&format!("[{skipped} earlier lines]\n"));
    }
    out.push_str(&lines[skipped..].join("\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_from_releases() {
        assert_eq!(kernel_version("6.1.0-48-amd64"), Some((6, 1)));
        assert_eq!(kernel_version("6.18.3"), Some((6, 18)));
        assert_eq!(kernel_version("5.15.0-91-generic"), Some((5, 15)));
        assert_eq!(kernel_version("unknown"), None);
    }

    #[test]
    fn a_long_log_keeps_its_end() {
        let log: String = (0..100).map(|i| format!("{i}: insn\n\n")).collect();
        let tail = verifier_tail(&log);
        assert!(tail.starts_with("[60 earlier lines]\n60: insn"), "{tail}");
        assert!(tail.ends_with("99: insn"));
        assert_eq!(
            verifier_tail("R1 invalid mem access\n"),
            "R1 invalid mem access"
        );
    }
}
