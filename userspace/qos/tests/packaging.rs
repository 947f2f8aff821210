//! The shipped systemd unit: systemd itself checks it (syntax, directives,
//! the binaries it names), with the paths pointed at the built binaries.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "test code: a failure panics"
)]

use std::process::Command;

const UNIT: &str = include_str!("../../../packaging/qosd.service");
const QOSD: &str = env!("CARGO_BIN_EXE_qosd");

#[test]
fn systemd_accepts_the_unit() {
    let analyze = ["/usr/bin/systemd-analyze", "/bin/systemd-analyze"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists());
    let Some(analyze) = analyze else {
        assert!(
            std::env::var_os("CI").is_none(),
            "systemd-analyze is missing (apt-get install systemd)"
        );
        eprintln!("skipping: systemd-analyze is missing");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("qosd.service");
    std::fs::write(&unit, UNIT.replace("/usr/local/bin/qosd", QOSD)).unwrap();
    let out = Command::new(analyze)
        .args(["verify", "--man=no"])
        .arg(&unit)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    // Without a running systemd, verify still parses the unit; complaints
    // about the unit itself name its file.
    let about_unit: Vec<&str> = err.lines().filter(|l| l.contains("qosd.service")).collect();
    assert!(about_unit.is_empty(), "{err}");
    for key in [
        "ExecStart=",
        "Restart=always",
        "CapabilityBoundingSet=",
        "ReadWritePaths=/sys/fs/cgroup /sys/fs/bpf",
        "--check-config",
    ] {
        assert!(UNIT.contains(key), "unit lacks {key}");
    }
}
