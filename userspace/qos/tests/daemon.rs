//! qosd and qosctl as an operator uses them: a real daemon on a throwaway
//! veth, its socket API, persistence, and the error for each bad input.
//! Needs root (under CI a missing privilege fails the test).
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "test code: a failure panics"
)]

use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Duration,
};

use anyhow::{Context, Result};
use testbeds::{
    CgroupDir, KillOnDrop, Netns, Veth, mem::MemCgroup, require_root, unique, wait_for,
};

const QOSD: &str = env!("CARGO_BIN_EXE_qosd");
const QOSCTL: &str = env!("CARGO_BIN_EXE_qosctl");

/// A qosd on its own veth with its own socket and state directory.
struct Daemon {
    child: Option<KillOnDrop>,
    dir: tempfile::TempDir,
    socket: PathBuf,
    config: PathBuf,
    _veth: Veth,
    _ns: Netns,
}

impl Daemon {
    fn new(capacity: &str) -> Result<Self> {
        Self::with(capacity, "")
    }

    /// With more config appended (e.g. a `[mem]` table).
    fn with(capacity: &str, extra: &str) -> Result<Self> {
        let ns = Netns::new("qdmn")?;
        let veth = Veth::new(&unique("qdv"), "p0", &ns)?;
        let dir = tempfile::tempdir()?;
        let socket = dir.path().join("qosd.sock");
        let config = dir.path().join("qosd.toml");
        std::fs::write(
            &config,
            format!(
                "[daemon]\nsocket = \"{}\"\nstate_dir = \"{}\"\nlog = \"info\"\n[net]\ninterface = \"{}\"\n\
                 egress_capacity = \"{capacity}\"\ndefault_rate = \"10mbit\"\ncontainer_interfaces = \"none\"\n{extra}",
                socket.display(),
                dir.path().join("state").display(),
                veth.host()
            ),
        )?;
        let mut d = Self {
            child: None,
            dir,
            socket,
            config,
            _veth: veth,
            _ns: ns,
        };
        d.start()?;
        Ok(d)
    }

    fn start(&mut self) -> Result<()> {
        let log = std::fs::File::create(self.dir.path().join("qosd.log"))?;
        let child = Command::new(QOSD)
            .arg("--config")
            .arg(&self.config)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning qosd")?;
        self.child = Some(KillOnDrop(child));
        let ok = wait_for(Duration::from_secs(10), || {
            self.ctl(&["status"])
                .map(|o| o.status.success())
                .unwrap_or(false)
        });
        anyhow::ensure!(ok, "qosd did not come up: {}", self.log());
        Ok(())
    }

    /// SIGTERM and wait: a clean stop.
    fn stop(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.0.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            )?;
            let exited = wait_for(Duration::from_secs(10), || {
                matches!(c.0.try_wait(), Ok(Some(_)))
            });
            anyhow::ensure!(exited, "qosd did not stop on SIGTERM");
            let status = c.0.try_wait()?.context("status")?;
            anyhow::ensure!(
                status.success(),
                "qosd exited with {status}: {}",
                self.log()
            );
        }
        Ok(())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("qosd.log")).unwrap_or_default()
    }

    fn ctl(&self, args: &[&str]) -> Result<Output> {
        ctl(&self.socket, args)
    }

    /// qosctl that must succeed; its stdout.
    fn ok(&self, args: &[&str]) -> Result<String> {
        let o = self.ctl(args)?;
        anyhow::ensure!(
            o.status.success(),
            "qosctl {args:?} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    }

    /// qosctl that must fail with `code`, saying `needle`.
    fn fails(&self, args: &[&str], code: i32, needle: &str) -> Result<()> {
        let o = self.ctl(args)?;
        let err = String::from_utf8_lossy(&o.stderr);
        anyhow::ensure!(
            o.status.code() == Some(code),
            "qosctl {args:?}: exit {:?} (want {code}): {err}",
            o.status.code()
        );
        anyhow::ensure!(
            err.contains(needle),
            "qosctl {args:?}: {err:?} does not say {needle:?}"
        );
        Ok(())
    }

    fn show(&self) -> Result<serde_json::Value> {
        Ok(serde_json::from_str(
            &self.ok(&["net", "show", "-o", "json"])?,
        )?)
    }
}

fn ctl(socket: &Path, args: &[&str]) -> Result<Output> {
    Command::new(QOSCTL)
        .arg("--socket")
        .arg(socket)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running qosctl")
}

fn classes(v: &serde_json::Value) -> Vec<String> {
    v["classes"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|c| c["cgroup"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn qosctl_without_a_daemon_says_so() -> Result<()> {
    let o = ctl(Path::new("/nonexistent/qosd.sock"), &["status"])?;
    assert_eq!(o.status.code(), Some(5));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("qosd is not running"), "{err}");
    Ok(())
}

#[test]
fn quotas_set_show_unset_and_every_bad_input() -> Result<()> {
    if !require_root("quotas_set_show_unset_and_every_bad_input") {
        return Ok(());
    }
    let d = Daemon::new("1gbit")?;
    let cg = CgroupDir::new("qos-test-")?;
    cg.child("a")?;
    cg.child("b")?;
    let a = cg.child_name("a");
    let b_abs = cg.path().join("b").display().to_string();

    let out = d.ok(&[
        "net",
        "set",
        &a,
        "--rate",
        "100mbit",
        "--ceil",
        "500mbit",
        "--priority",
        "2",
    ])?;
    assert!(
        out.contains("egress 100mbit ceil 500mbit priority 2"),
        "{out}"
    );
    // Absolute paths name the same tree; bytes-per-second units are tc's.
    let out = d.ok(&["net", "set", &b_abs, "--rate", "10mbps"])?;
    assert!(
        out.contains(&format!("{}: egress 80mbit", cg.child_name("b"))),
        "{out}"
    );

    let v = d.show()?;
    let names = classes(&v);
    assert!(
        names.contains(&a) && names.contains(&cg.child_name("b")),
        "{names:?}"
    );
    let table = d.ok(&["net", "show"])?;
    assert!(table.contains("CGROUP") && table.contains(&a), "{table}");
    let status = d.ok(&["status", "-o", "json"])?;
    let s: serde_json::Value = serde_json::from_str(&status)?;
    assert_eq!(s["net"]["classes"], 2);
    assert_eq!(
        s["cgroup_mode"],
        qos_core::Hierarchy::detect()?.mode().to_string()
    );

    // Bad input: each gets its own message and exit status.
    d.fails(&["net", "set", &a, "--rate", "fast"], 2, "not a rate")?;
    d.fails(&["net", "set", &a, "--rate", "0"], 2, "zero")?;
    d.fails(
        &["net", "set", &a, "--rate", "10mbit", "--priority", "9"],
        2,
        "9 is not in 0..=7",
    )?;
    d.fails(
        &["net", "set", &a, "--rate", "100mbit", "--ceil", "10mbit"],
        2,
        "below the guaranteed egress rate",
    )?;
    d.fails(
        &["net", "set", &a, "--rate", "2gbit"],
        2,
        "exceeds the egress capacity",
    )?;
    d.fails(
        &["net", "set", &cg.child_name("missing"), "--rate", "1mbit"],
        3,
        "does not exist",
    )?;
    d.fails(
        &["net", "set", "/etc", "--rate", "1mbit"],
        2,
        "outside the cgroup mounts",
    )?;
    d.fails(&["net", "set", "../x", "--rate", "1mbit"], 2, "'..'")?;
    d.fails(
        &["net", "set", &b_abs, "--rate", "900mbit"],
        4,
        "admission refused: guarantees would total 1010mbit",
    )?;
    d.fails(
        &["net", "unset", &cg.child_name("missing")],
        3,
        "has no network quota",
    )?;
    // A refused change left the quota as it was.
    let v = d.show()?;
    let bq = v["classes"].as_array().and_then(|a| {
        a.iter()
            .find(|c| c["cgroup"] == cg.child_name("b"))
            .cloned()
    });
    assert_eq!(
        bq.map(|c| c["rate"].clone()),
        Some(serde_json::json!("80mbit"))
    );

    d.ok(&["net", "unset", &a])?;
    assert!(!classes(&d.show()?).contains(&a));
    Ok(())
}

#[test]
fn oversized_and_malformed_requests_are_refused() -> Result<()> {
    if !require_root("oversized_and_malformed_requests_are_refused") {
        return Ok(());
    }
    use std::io::{BufRead, BufReader, Write};
    let d = Daemon::new("1gbit")?;
    let mut s = std::os::unix::net::UnixStream::connect(&d.socket)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"{\"op\":\"reboot\"}\n")?;
    let mut r = BufReader::new(s.try_clone()?);
    let mut line = String::new();
    r.read_line(&mut line)?;
    assert!(
        line.contains("\"invalid\"") && line.contains("malformed request"),
        "{line}"
    );
    let big = vec![b'x'; qos::protocol::MAX_REQUEST + 10];
    let _ = s.write_all(&big);
    line.clear();
    r.read_line(&mut line)?;
    assert!(line.contains("larger than"), "{line}");
    // The daemon still serves others.
    d.ok(&["status"])?;
    Ok(())
}

#[test]
fn only_root_may_use_the_api() -> Result<()> {
    if !require_root("only_root_may_use_the_api") {
        return Ok(());
    }
    use std::os::unix::process::CommandExt;
    let d = Daemon::new("1gbit")?;
    // The socket's directory is the test's temp dir: let others traverse it.
    std::fs::set_permissions(
        d.dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    let o = Command::new(QOSCTL)
        .arg("--socket")
        .arg(&d.socket)
        .arg("status")
        .uid(65534)
        .gid(65534)
        .output()?;
    assert_eq!(o.status.code(), Some(5));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("permission denied") && err.contains("root only"),
        "{err}"
    );
    Ok(())
}

#[test]
fn memory_quotas_set_show_unset_persist_and_every_bad_input() -> Result<()> {
    if !require_root("memory_quotas_set_show_unset_persist_and_every_bad_input") {
        return Ok(());
    }
    let scope = MemCgroup::new("qos-mem-")?;
    scope.write(
        scope.name(),
        "memory.limit_in_bytes",
        &(512u64 << 20).to_string(),
    )?;
    let a = scope.child("a")?;
    let mut d = Daemon::with(
        "1gbit",
        &format!(
            "[mem]\nenabled = true\nscope = \"{}\"\nreserve = \"16M\"\ninterval_ms = 100\n",
            scope.name()
        ),
    )?;
    let mem_show = |d: &Daemon| -> Result<serde_json::Value> {
        Ok(serde_json::from_str(
            &d.ok(&["mem", "show", "-o", "json"])?,
        )?)
    };
    let v = mem_show(&d)?;
    assert_eq!(v["scope"], scope.name());
    assert_eq!(v["capacity"], 512u64 << 20);
    assert_eq!(v["level"], "normal");
    assert_eq!(v["scope_oom_held"], true);
    let out = d.ok(&[
        "mem",
        "set",
        &a,
        "--guarantee",
        "64M",
        "--limit",
        "256M",
        "--priority",
        "3",
    ])?;
    assert_eq!(
        out.trim(),
        format!("{a}: guarantee 64MiB limit 256MiB priority 3")
    );
    assert_eq!(
        scope.read(&a, "memory.soft_limit_in_bytes")?.trim(),
        (64u64 << 20).to_string()
    );
    assert_eq!(
        scope.read(&a, "memory.limit_in_bytes")?.trim(),
        (256u64 << 20).to_string()
    );
    let v = mem_show(&d)?;
    let row = &v["cgroups"][0];
    assert_eq!(
        (row["name"].as_str(), row["limit"].as_u64()),
        (Some(a.as_str()), Some(256 << 20))
    );
    let table = d.ok(&["mem", "show"])?;
    assert!(table.contains("GUARANTEE") && table.contains(&a), "{table}");
    // The memory loop runs on its own and says what wakes it.
    let steps = v["steps"].as_u64().unwrap_or(0);
    assert!(
        wait_for(Duration::from_secs(3), || mem_show(&d)
            .map(|v| v["steps"].as_u64().unwrap_or(0) > steps + 3)
            .unwrap_or(false)),
        "the memory loop does not step"
    );
    let s: serde_json::Value = serde_json::from_str(&d.ok(&["status", "-o", "json"])?)?;
    assert_eq!(s["mem"]["backend"], "v1");
    assert!(
        s["mem"]["woken_by"].as_str().is_some_and(|w| !w.is_empty()),
        "{s}"
    );

    // Bad input: exit status and a message naming the problem; nothing
    // changes.
    d.fails(&["mem", "set", &a, "--guarantee", "0"], 2, "zero")?;
    d.fails(&["mem", "set", &a, "--guarantee", "lots"], 2, "not a size")?;
    d.fails(
        &["mem", "set", &a, "--guarantee", "128M", "--limit", "64M"],
        2,
        "below the guarantee",
    )?;
    d.fails(
        &["mem", "set", &a, "--guarantee", "1M", "--priority", "9"],
        2,
        "9",
    )?;
    d.fails(
        &[
            "mem",
            "set",
            &format!("{}/nope", scope.name()),
            "--guarantee",
            "1M",
        ],
        3,
        "does not exist",
    )?;
    d.fails(
        &["mem", "set", &a, "--guarantee", "600M"],
        4,
        "does not fit",
    )?;
    d.fails(&["mem", "set", "/etc", "--guarantee", "1M"], 2, "outside")?;
    d.fails(&["mem", "set", "../x", "--guarantee", "1M"], 2, "'..'")?;
    d.fails(
        &["mem", "unset", &format!("{}/nope", scope.name())],
        3,
        "no memory quota",
    )?;
    assert_eq!(
        scope.read(&a, "memory.limit_in_bytes")?.trim(),
        (256u64 << 20).to_string()
    );

    // Persisted across a restart.
    d.stop()?;
    d.start()?;
    let v = mem_show(&d)?;
    assert_eq!(v["cgroups"][0]["guarantee"], 64u64 << 20, "{v}");
    d.ok(&["mem", "unset", &a])?;
    assert!(
        scope.read(&a, "memory.soft_limit_in_bytes")?.trim().len() > 12,
        "guarantee not removed"
    );
    assert!(
        scope.read(&a, "memory.limit_in_bytes")?.trim().len() > 12,
        "limit not removed"
    );
    assert!(
        mem_show(&d)?["cgroups"]
            .as_array()
            .is_some_and(Vec::is_empty)
    );
    d.stop()?;
    // A clean stop gives the scope its OOM killer back.
    assert!(
        scope
            .read(scope.name(), "memory.oom_control")?
            .contains("oom_kill_disable 0")
    );
    Ok(())
}

#[test]
fn memory_commands_without_mem_enabled_say_so() -> Result<()> {
    if !require_root("memory_commands_without_mem_enabled_say_so") {
        return Ok(());
    }
    let d = Daemon::new("1gbit")?;
    d.fails(&["mem", "show"], 5, "[mem] enabled = true")?;
    d.fails(&["mem", "set", "x", "--guarantee", "1M"], 5, "not enabled")?;
    Ok(())
}

#[test]
fn state_survives_a_restart_and_follows_cgroups() -> Result<()> {
    if !require_root("state_survives_a_restart_and_follows_cgroups") {
        return Ok(());
    }
    let mut d = Daemon::new("1gbit")?;
    let cg = CgroupDir::new("qos-test-")?;
    cg.child("a")?;
    let a = cg.child_name("a");
    d.ok(&["net", "set", &a, "--rate", "123mbit", "--priority", "3"])?;
    d.stop()?;
    assert!(
        d.log().contains("shaping off"),
        "no clean stop:\n{}",
        d.log()
    );
    d.start()?;
    let v = d.show()?;
    let c = v["classes"]
        .as_array()
        .and_then(|x| x.iter().find(|c| c["cgroup"] == a.as_str()).cloned())
        .context("quota lost")?;
    assert_eq!(
        (c["rate"].as_str(), c["priority"].as_u64()),
        (Some("123mbit"), Some(3))
    );

    // The cgroup goes away: its class leaves the datapath within a second
    // or two, and the quota waits for it.
    std::fs::remove_dir(cg.path().join("a"))?;
    assert!(
        wait_for(Duration::from_secs(3), || d
            .show()
            .map(|v| !classes(&v).contains(&a))
            .unwrap_or(false)),
        "class of a vanished cgroup still shown"
    );
    let s: serde_json::Value = serde_json::from_str(&d.ok(&["status", "-o", "json"])?)?;
    assert!(
        s["waiting"]
            .as_array()
            .is_some_and(|w| w.iter().any(|x| x == a.as_str())),
        "{s}"
    );
    // ... and is applied again when it comes back.
    cg.child("a")?;
    assert!(
        wait_for(Duration::from_secs(3), || d
            .show()
            .map(|v| classes(&v).contains(&a))
            .unwrap_or(false)),
        "quota not re-applied to the re-created cgroup"
    );
    // unset works on a waiting quota too, and is persisted.
    std::fs::remove_dir(cg.path().join("a"))?;
    assert!(
        wait_for(Duration::from_secs(3), || {
            d.show().map(|v| !classes(&v).contains(&a)).unwrap_or(false)
        }),
        "class of a vanished cgroup still shown"
    );
    // By absolute path: the cgroup is gone, the name still resolves.
    let abs = cg.path().join("a").display().to_string();
    d.ok(&["net", "unset", &abs])?;
    d.stop()?;
    let state = std::fs::read_to_string(d.dir.path().join("state/state.json"))?;
    assert!(!state.contains(&a), "{state}");
    Ok(())
}
