//! qosd and qosctl as an operator uses them: a real daemon on a throwaway
//! veth (and, for disk IO, a loop device), its socket API, persistence, and
//! the error for each bad input.
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
    CgroupDir, KillOnDrop, Netns, Veth,
    io::{IoCgroup, LoopFs},
    mem::MemCgroup,
    require_root, unique, wait_for,
};

const QOSD: &str = env!("CARGO_BIN_EXE_qosd");
const QOSCTL: &str = env!("CARGO_BIN_EXE_qosctl");

/// A qosd on its own veth with its own socket, state directory and bpffs
/// pin directory; dropping it runs `qosd --cleanup`.
struct Daemon {
    child: Option<KillOnDrop>,
    dir: tempfile::TempDir,
    socket: PathBuf,
    config: PathBuf,
    pins: PathBuf,
    veth: Veth,
    _ns: Netns,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        drop(self.child.take());
        // Pinned links on the cgroup2 root would outlive the test.
        let _ = Command::new(QOSD)
            .arg("--config")
            .arg(&self.config)
            .arg("--cleanup")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

impl Daemon {
    fn new(capacity: &str) -> Result<Self> {
        Self::with(capacity, "")
    }

    /// With more config appended (e.g. a `[mem]` table).
    fn with(capacity: &str, extra: &str) -> Result<Self> {
        Self::with_daemon(capacity, "", extra)
    }

    /// With more `[daemon]` keys too.
    fn with_daemon(capacity: &str, daemon: &str, extra: &str) -> Result<Self> {
        let ns = Netns::new("qdmn")?;
        let veth = Veth::new(&unique("qdv"), "p0", &ns)?;
        let dir = tempfile::tempdir()?;
        let socket = dir.path().join("qosd.sock");
        let config = dir.path().join("qosd.toml");
        let pins = PathBuf::from("/sys/fs/bpf").join(unique("qos-test-"));
        std::fs::write(
            &config,
            format!(
                "[daemon]\nsocket = \"{}\"\nstate_dir = \"{}\"\nbpf_pin_dir = \"{}\"\nlog = \"info\"\n{daemon}\n\
                 [net]\ninterface = \"{}\"\n\
                 egress_capacity = \"{capacity}\"\ndefault_rate = \"10mbit\"\ncontainer_interfaces = \"none\"\n{extra}",
                socket.display(),
                dir.path().join("state").display(),
                pins.display(),
                veth.host()
            ),
        )?;
        let mut d = Self {
            child: None,
            dir,
            socket,
            config,
            pins,
            veth,
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

    /// SIGKILL and reap: no chance to clean anything up.
    fn kill(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            c.0.kill()?;
            c.0.wait()?;
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
fn mutated_requests_on_the_socket_never_break_the_daemon() -> Result<()> {
    use std::io::{BufRead, BufReader, Write};

    use proptest::{
        strategy::{Strategy, ValueTree},
        test_runner::TestRunner,
    };
    if !require_root("mutated_requests_on_the_socket_never_break_the_daemon") {
        return Ok(());
    }
    const SEEDS: &[&str] = &[
        r#"{"op":"status"}"#,
        r#"{"op":"metrics"}"#,
        r#"{"op":"net_set","cgroup":"qos-fuzz-none/a","rate":"100mbit","ceil":"1gbit","priority":2}"#,
        r#"{"op":"net_unset","cgroup":"qos-fuzz-none/a"}"#,
        r#"{"op":"mem_set","cgroup":"qos-fuzz-none","guarantee":"1GiB"}"#,
        r#"{"op":"io_set","cgroup":"qos-fuzz-none","device":"7:0","write_bps":"1MiB"}"#,
        r#"{"op":"net_show"}"#,
    ];
    let d = Daemon::new("1gbit")?;
    let before = std::fs::read_to_string(d.dir.path().join("state/state.json"))?;
    let strategy = testbeds::fuzz::mutated(SEEDS);
    let mut runner = TestRunner::deterministic();
    let connect = || -> Result<_> {
        let s = std::os::unix::net::UnixStream::connect(&d.socket)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let r = BufReader::new(s.try_clone()?);
        Ok((s, r))
    };
    let (mut s, mut r) = connect()?;
    let mut answered = 0;
    for _ in 0..3000 {
        let mut line = strategy
            .new_tree(&mut runner)
            .map_err(anyhow::Error::msg)?
            .current();
        // One request per line: a newline inside would make two.
        line.retain(|b| *b != b'\n');
        line.push(b'\n');
        let mut reply = String::new();
        let ok = s.write_all(&line).is_ok() && r.read_line(&mut reply).is_ok_and(|n| n > 0);
        if ok {
            let v: serde_json::Value = serde_json::from_str(&reply)
                .with_context(|| format!("reply is not JSON: {reply:?}"))?;
            assert!(
                v.get("ok").is_some() || v["error"]["message"].is_string(),
                "{v}"
            );
            answered += 1;
        } else {
            // The daemon may hang up (an oversized request); start over.
            (s, r) = connect()?;
        }
    }
    assert!(answered > 2500, "only {answered} of 3000 answered");
    d.ok(&["status"])?;
    let after = std::fs::read_to_string(d.dir.path().join("state/state.json"))?;
    assert_eq!(before, after, "the state changed");
    assert!(classes(&d.show()?).iter().all(|c| c == "(default)"));
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
    scope.set_limit(scope.name(), 512 << 20)?;
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
    assert_eq!(scope.guarantee(&a)?, Some(64 << 20));
    assert_eq!(scope.limit(&a)?, Some(256 << 20));
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
    assert_eq!(s["mem"]["backend"], if scope.is_v2() { "v2" } else { "v1" });
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
    assert_eq!(scope.limit(&a)?, Some(256 << 20));

    // Persisted across a restart.
    d.stop()?;
    d.start()?;
    let v = mem_show(&d)?;
    assert_eq!(v["cgroups"][0]["guarantee"], 64u64 << 20, "{v}");
    d.ok(&["mem", "unset", &a])?;
    assert_eq!(scope.guarantee(&a)?, None, "guarantee not removed");
    assert_eq!(scope.limit(&a)?, None, "limit not removed");
    assert!(
        mem_show(&d)?["cgroups"]
            .as_array()
            .is_some_and(Vec::is_empty)
    );
    d.stop()?;
    // A clean stop gives the scope its OOM killer back.
    assert!(scope.oom_killer_released(scope.name())?);
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
        d.log().contains("left attached for the next qosd"),
        "no clean stop:\n{}",
        d.log()
    );
    d.start()?;
    assert!(
        d.log().contains("adopting the pinned network datapath"),
        "{}",
        d.log()
    );
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

#[test]
fn sigkill_leaves_the_datapath_enforcing_and_a_restart_adopts_it() -> Result<()> {
    use std::os::unix::fs::MetadataExt;

    use netqos::{Direction, datapath::PinnedNet};
    if !require_root("sigkill_leaves_the_datapath_enforcing_and_a_restart_adopts_it") {
        return Ok(());
    }
    let mut d = Daemon::new("1gbit")?;
    let cg = CgroupDir::new("qos-test-")?;
    let name = cg.name();
    d.ok(&["net", "set", &name, "--rate", "200mbit"])?;
    let id = std::fs::metadata(cg.path())?.ino();
    d.kill()?;

    // No daemon now: the datapath is still attached and still classifies
    // the cgroup into a class with its guarantee.
    let pinned = PinnedNet::find(&d.pins).context("nothing pinned after SIGKILL")?;
    let links = pinned.links();
    let names: Vec<&str> = links.iter().map(|l| l.name.as_str()).collect();
    assert!(names.contains(&"pacer"), "{links:?}");
    let ifindex = nix::net::if_::if_nametoindex(d.veth.host())?;
    let egress = format!("egress:{ifindex}");
    assert!(
        names.contains(&egress.as_str())
            || pinned
                .tc_filters()
                .iter()
                .any(|f| f.what == "egress" && f.ifindex == ifindex),
        "egress program not kept: {links:?} {:?}",
        pinned.tc_filters()
    );
    let slot = pinned
        .cgroup_slot(Direction::Egress, id)?
        .context("cgroup not classified while qosd is down")?;
    assert_eq!(
        pinned.class_config(Direction::Egress, slot)?.guarantee,
        200_000_000 / 8
    );

    // The restart adopts it all: same slot, same links (never detached).
    d.start()?;
    assert!(
        d.log().contains("adopting the pinned network datapath"),
        "{}",
        d.log()
    );
    let again = PinnedNet::find(&d.pins).context("pins gone after the restart")?;
    assert_eq!(again.cgroup_slot(Direction::Egress, id)?, Some(slot));
    let after: Vec<u32> = again.links().iter().map(|l| l.link_id).collect();
    for l in &links {
        assert!(after.contains(&l.link_id), "link {} was replaced", l.name);
    }
    let v = d.show()?;
    assert!(classes(&v).contains(&name), "{v}");

    // --cleanup: refused while qosd runs; afterwards nothing of ours is left.
    let config = d.config.clone();
    let cleanup = || {
        Command::new(QOSD)
            .arg("--config")
            .arg(&config)
            .arg("--cleanup")
            .output()
    };
    let o = cleanup()?;
    assert!(
        !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("is running"),
        "{o:?}"
    );
    d.stop()?;
    let o = cleanup()?;
    assert!(o.status.success(), "{o:?}");
    assert!(!d.pins.exists(), "{} left", d.pins.display());
    for l in &links {
        assert!(
            !netqos::datapath::link_exists(l.link_id),
            "{} still attached",
            l.name
        );
    }
    Ok(())
}

#[test]
fn vanished_cgroups_are_forgotten_when_recreated_ones_are_not_followed() -> Result<()> {
    if !require_root("vanished_cgroups_are_forgotten_when_recreated_ones_are_not_followed") {
        return Ok(());
    }
    let d = Daemon::with_daemon("1gbit", "follow_recreated_cgroups = false", "")?;
    let cg = CgroupDir::new("qos-test-")?;
    cg.child("a")?;
    let a = cg.child_name("a");
    d.ok(&["net", "set", &a, "--rate", "50mbit"])?;
    std::fs::remove_dir(cg.path().join("a"))?;
    let state_has_a = || {
        std::fs::read_to_string(d.dir.path().join("state/state.json"))
            .map(|s| s.contains(&a))
            .unwrap_or(true)
    };
    assert!(
        wait_for(Duration::from_secs(3), || !state_has_a()),
        "quota of a vanished cgroup kept in the state"
    );
    assert!(!classes(&d.show()?).contains(&a));
    // Re-created: not followed, nothing applied.
    cg.child("a")?;
    let s: serde_json::Value = serde_json::from_str(&d.ok(&["status", "-o", "json"])?)?;
    assert!(s["waiting"].as_array().is_some_and(Vec::is_empty), "{s}");
    d.fails(&["net", "unset", &a], 3, "has no network quota")?;
    Ok(())
}

#[test]
fn a_datapath_pinned_by_another_build_is_replaced() -> Result<()> {
    use netqos::datapath::{PinnedNet, link_exists};
    if !require_root("a_datapath_pinned_by_another_build_is_replaced") {
        return Ok(());
    }
    let mut d = Daemon::new("1gbit")?;
    let cg = CgroupDir::new("qos-test-")?;
    let name = cg.name();
    d.ok(&["net", "set", &name, "--rate", "100mbit"])?;
    d.kill()?;
    // What another build would have left: the same layout under another
    // object hash.
    let mine = PinnedNet::find(&d.pins).context("nothing pinned")?;
    let old_links = mine.links();
    let other = d.pins.join("net-00000000deadbeef");
    std::fs::rename(mine.dir(), &other)?;
    assert!(PinnedNet::find(&d.pins).is_none());

    d.start()?;
    let new = PinnedNet::find(&d.pins).context("the new build pinned nothing")?;
    assert!(
        !other.exists(),
        "the other build's datapath was not retired"
    );
    for l in &old_links {
        assert!(
            !link_exists(l.link_id),
            "{} of the other build still attached",
            l.name
        );
    }
    let names: Vec<String> = new.links().into_iter().map(|l| l.name).collect();
    assert!(names.iter().any(|n| n == "pacer"), "{names:?}");
    // The quota came from the state file, into the new maps.
    assert!(classes(&d.show()?).contains(&name));
    assert!(
        d.log()
            .contains("replacing the pinned datapath of another qosd build"),
        "{}",
        d.log()
    );
    Ok(())
}

#[test]
fn a_recreated_shaped_interface_is_followed_and_its_absence_counted() -> Result<()> {
    use netqos::datapath::PinnedNet;
    if !require_root("a_recreated_shaped_interface_is_followed_and_its_absence_counted") {
        return Ok(());
    }
    let d = Daemon::new("1gbit")?;
    let iface = d.veth.host().to_owned();
    let attached_to = |ifindex: u32| {
        PinnedNet::find(&d.pins).is_some_and(|p| {
            p.links()
                .iter()
                .any(|l| l.name == format!("egress:{ifindex}"))
                || p.tc_filters()
                    .iter()
                    .any(|f| f.what == "egress" && f.ifindex == ifindex)
        })
    };
    let old = nix::net::if_::if_nametoindex(iface.as_str())?;
    assert!(attached_to(old));
    testbeds::run("ip", &["link", "del", &iface])?;
    let degradation = |kind: &str| -> u64 {
        raw(&d.socket, "{\"op\":\"metrics\"}")
            .ok()
            .and_then(|r| serde_json::from_str::<serde_json::Value>(&r).ok())
            .and_then(|v| v["ok"]["metrics"]["daemon"]["degradations"][kind].as_u64())
            .unwrap_or(0)
    };
    assert!(
        wait_for(Duration::from_secs(5), || degradation(
            "net_interface_missing"
        ) == 1),
        "a missing interface was not counted: {}",
        d.log()
    );
    // Back under the same name (a new ifindex): the datapath follows.
    let peer = unique("qdp");
    testbeds::run(
        "ip",
        &["link", "add", &iface, "type", "veth", "peer", "name", &peer],
    )?;
    let new = nix::net::if_::if_nametoindex(iface.as_str())?;
    assert_ne!(new, old);
    assert!(
        wait_for(Duration::from_secs(5), || attached_to(new)),
        "egress not attached to the re-created interface: {}",
        d.log()
    );
    assert!(!attached_to(old));
    assert_eq!(degradation("net_interface_missing"), 1, "counted once");
    d.ok(&["status"])?;
    Ok(())
}

#[test]
fn a_full_class_table_is_refused_with_a_message_naming_the_limit() -> Result<()> {
    use qos::{
        client::Client,
        protocol::{Reply, Request},
    };
    if !require_root("a_full_class_table_is_refused_with_a_message_naming_the_limit") {
        return Ok(());
    }
    // The table is 4095 quotas by default; a smaller one fills the same way.
    let d = Daemon::with("1000gbit", "max_quotas = 16")?;
    let parent = CgroupDir::new("qos-test-")?;
    let mut client = Client::connect(&d.socket)?;
    let set = |client: &mut Client, i: usize| -> Result<Result<Reply, qos::client::ClientError>> {
        parent.child(&format!("c{i}"))?;
        Ok(client.call(&Request::NetSet {
            cgroup: parent.child_name(&format!("c{i}")),
            rate: Some("1mbit".parse()?),
            ceil: None,
            priority: 0,
            ingress_rate: None,
            ingress_ceil: None,
        }))
    };
    let slots = 16;
    for i in 0..slots {
        set(&mut client, i)?.with_context(|| format!("class {i} of {slots}"))?;
    }
    let e = set(&mut client, slots)?.expect_err("one class too many");
    assert!(
        e.to_string()
            .contains("all 16 quota slots of this direction are in use ([net] max_quotas)"),
        "{e}"
    );
    assert_eq!(e.exit_code(), 4, "{e}");
    // Nothing half-applied; the daemon serves on; a freed slot is used
    // again (after its quarantine).
    let v = d.show()?;
    assert_eq!(classes(&v).len(), slots + 1);
    d.ok(&["net", "unset", &parent.child_name("c0")])?;
    assert!(
        wait_for(Duration::from_secs(5), || set(&mut client, slots + 1)
            .is_ok_and(|r| r.is_ok())),
        "a freed slot was not reused"
    );
    Ok(())
}

/// A TCP port free right now on loopback.
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn http_get(addr: &str, path: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(addr)?;
    c.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())?;
    let mut out = String::new();
    c.read_to_string(&mut out)?;
    Ok(out)
}

#[test]
fn metrics_endpoint_and_top_show_every_configured_cgroup() -> Result<()> {
    if !require_root("metrics_endpoint_and_top_show_every_configured_cgroup") {
        return Ok(());
    }
    let addr = format!("127.0.0.1:{}", free_port()?);
    let d = Daemon::with_daemon("1gbit", &format!("metrics_listen = \"{addr}\""), "")?;
    let cg = CgroupDir::new("qos-test-")?;
    let name = cg.name();
    d.ok(&["net", "set", &name, "--rate", "100mbit"])?;
    let text = http_get(&addr, "/metrics")?;
    assert!(text.starts_with("HTTP/1.0 200"), "{text}");
    for needle in [
        format!("qos_net_egress_guarantee_bps{{cgroup=\"{name}\"}} 100000000"),
        format!("qos_net_egress_bytes_total{{cgroup=\"{name}\"}} "),
        "qos_daemon_requests_total ".to_owned(),
        "qos_daemon_resident_bytes ".to_owned(),
        "# EOF".to_owned(),
    ] {
        assert!(text.contains(&needle), "no {needle:?} in\n{text}");
    }
    assert!(http_get(&addr, "/other")?.starts_with("HTTP/1.0 404"));

    let top: serde_json::Value =
        serde_json::from_str(&d.ok(&["top", "--once", "--interval", "0.2", "-o", "json"])?)?;
    let row = top
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["cgroup"] == name.as_str()))
        .with_context(|| format!("{name} not in top: {top}"))?;
    assert!(
        row["egress_bps"].as_f64().is_some_and(|v| v >= 0.0),
        "{row}"
    );
    assert!(row["ingress_bps"].is_null(), "{row}");
    d.fails(&["top", "--interval", "0"], 2, "out of range")?;

    // Not on loopback: refused unless allowed.
    let cfg = d.dir.path().join("remote.toml");
    std::fs::write(&cfg, "[daemon]\nmetrics_listen = \"0.0.0.0:9477\"\n")?;
    let o = Command::new(QOSD)
        .arg("--config")
        .arg(&cfg)
        .arg("--check-config")
        .output()?;
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("not a loopback"),
        "{err}"
    );
    Ok(())
}

#[test]
fn concurrent_qosctl_calls_leave_a_consistent_state() -> Result<()> {
    if !require_root("concurrent_qosctl_calls_leave_a_consistent_state") {
        return Ok(());
    }
    let d = Daemon::new("10gbit")?;
    let cg = CgroupDir::new("qos-test-")?;
    let names: Vec<String> = (0..8)
        .map(|i| {
            cg.child(&format!("c{i}"))?;
            Ok(cg.child_name(&format!("c{i}")))
        })
        .collect::<Result<_>>()?;
    // 8 processes at once, each setting, changing and unsetting its cgroup
    // several times; odd ones end with a quota, even ones without.
    let mut children = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let script = format!(
            "for r in 1 2 3 4 5; do {q} --socket {s} net set {name} --rate ${{r}}0mbit >/dev/null || exit 1; \
             {q} --socket {s} net unset {name} >/dev/null || exit 1; done; {last}",
            q = QOSCTL,
            s = d.socket.display(),
            last = if i % 2 == 1 {
                format!(
                    "{QOSCTL} --socket {} net set {name} --rate 7mbit >/dev/null",
                    d.socket.display()
                )
            } else {
                "true".to_owned()
            }
        );
        children.push(KillOnDrop(
            Command::new("sh").arg("-c").arg(script).spawn()?,
        ));
    }
    for mut c in children {
        let st = c.0.wait()?;
        assert!(st.success(), "a qosctl loop failed: {st}");
    }
    let v = d.show()?;
    let shown = classes(&v);
    let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        d.dir.path().join("state/state.json"),
    )?)?;
    for (i, name) in names.iter().enumerate() {
        let in_state = state["net"].get(name).is_some();
        assert_eq!(shown.contains(name), i % 2 == 1, "{name} in net show: {v}");
        assert_eq!(in_state, i % 2 == 1, "{name} in the state file: {state}");
    }
    Ok(())
}

/// One raw request line on the socket; the reply line.
fn raw(socket: &Path, request: &str) -> Result<String> {
    use std::io::{BufRead, BufReader, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(request.as_bytes())?;
    s.write_all(b"\n")?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    Ok(line)
}

/// Whether IO is controlled through v1 blkio here (else cgroup2 io.max).
fn io_v1() -> Result<bool> {
    Ok(qos_core::Hierarchy::detect()?.v1_mount("blkio").is_some())
}

/// The kernel's rule for `devno` in a cgroup's io directory: the value of
/// `key` (v1: the whole value of the `blkio.throttle.<key>` file's line;
/// v2: `wbps`/`riops`/... of io.max). None when the device has no rule.
fn kernel_limit(dir: &Path, devno: &str, v1_file: &str, v2_key: &str) -> Result<Option<u64>> {
    let (file, v1) = if io_v1()? {
        (dir.join(format!("blkio.throttle.{v1_file}")), true)
    } else {
        (dir.join("io.max"), false)
    };
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    let Some(line) = text
        .lines()
        .find(|l| l.split_whitespace().next() == Some(devno))
    else {
        return Ok(None);
    };
    let value = if v1 {
        line.split_whitespace().nth(1)
    } else {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{v2_key}=")))
    };
    Ok(match value {
        None | Some("max") | Some("0") => None,
        Some(v) => Some(v.parse()?),
    })
}

fn write_bps_rule(dir: &Path, devno: &str) -> Result<Option<u64>> {
    kernel_limit(dir, devno, "write_bps_device", "wbps")
}

#[test]
fn io_limits_set_show_unset_persist_and_every_bad_input() -> Result<()> {
    if !require_root("io_limits_set_show_unset_persist_and_every_bad_input") {
        return Ok(());
    }
    let fs = LoopFs::new("ext4", 256, false)?;
    let devno = fs.devno();
    let a_cg = IoCgroup::new("qos-io-a")?;
    let b_cg = IoCgroup::new("qos-io-b")?;
    let c_cg = IoCgroup::new("qos-io-c")?;
    let (a, b, c) = (a_cg.name(), b_cg.name(), c_cg.name());
    let dir = |name: &str| a_cg.io_dir().join(name);
    // b is limited by the config file, its device named by path.
    let mut d = Daemon::with(
        "1gbit",
        &format!(
            "[io]\nenabled = true\ninterval_ms = 50\n[[io.limit]]\ncgroup = \"{b}\"\n\
             device = \"{}\"\nread_iops = 100\n",
            fs.device()
        ),
    )?;
    let io_show = |d: &Daemon| -> Result<serde_json::Value> {
        Ok(serde_json::from_str(&d.ok(&["io", "show", "-o", "json"])?)?)
    };
    let group = |v: &serde_json::Value, name: &str| -> Option<serde_json::Value> {
        v["groups"]
            .as_array()?
            .iter()
            .find(|g| g["cgroup"] == name)
            .cloned()
    };
    let mode = if io_v1()? { "v1-assisted" } else { "v2-kernel" };

    // Applied from the config at start.
    let v = io_show(&d)?;
    assert_eq!(v["mode"], mode, "{v}");
    let gb = group(&v, b).context("config limit not applied")?;
    assert_eq!(
        (gb["device"].as_str(), gb["limits"]["read_iops"].as_u64()),
        (Some(devno.as_str()), Some(100)),
        "{gb}"
    );
    assert_eq!(
        kernel_limit(&dir(b), &devno, "read_iops_device", "riops")?,
        Some(100)
    );

    // Set by device path.
    let out = d.ok(&[
        "io",
        "set",
        a,
        "--device",
        fs.device(),
        "--write-bps",
        "10MiB",
        "--read-iops",
        "300",
    ])?;
    assert_eq!(
        out.trim(),
        format!("{a} on {devno}: write 10MiB/s, read 300 iops")
    );
    assert_eq!(write_bps_rule(&dir(a), &devno)?, Some(10 << 20));
    assert_eq!(
        kernel_limit(&dir(a), &devno, "read_iops_device", "riops")?,
        Some(300)
    );
    let v = io_show(&d)?;
    let ga = group(&v, a).context("no group for a")?;
    assert_eq!(ga["device"], devno.as_str());
    assert_eq!(ga["limits"]["write_bps"], "10MiB");
    assert_eq!(ga["limits"]["read_iops"], 300);
    assert_eq!(ga["effective_write_bps"], 10u64 << 20);
    assert_eq!(ga["state"], "running");
    if mode == "v1-assisted" {
        assert!(
            v["tracker"]["kernel"]
                .as_str()
                .is_some_and(|k| !k.is_empty()),
            "{v}"
        );
    }
    let table = d.ok(&["io", "show"])?;
    for needle in [
        "IO mode: ",
        "tracker",
        "CGROUP",
        "WRITTEN BACK",
        a,
        &devno,
        "write 10MiB/s, read 300 iops",
        "running",
    ] {
        assert!(table.contains(needle), "{needle:?} not in\n{table}");
    }
    let s: serde_json::Value = serde_json::from_str(&d.ok(&["status", "-o", "json"])?)?;
    assert_eq!(s["io"]["limits"], 2, "{s}");
    assert!(
        s["io"]["mode"]
            .as_str()
            .is_some_and(|m| m.starts_with(mode)),
        "{s}"
    );
    assert!(d.ok(&["status"])?.contains("io: "));

    // Set again by number: replaces the limits on that device.
    let out = d.ok(&[
        "io",
        "set",
        a,
        "--device",
        &devno,
        "--write-bps",
        "20M/s",
        "--weight",
        "500",
    ])?;
    assert_eq!(
        out.trim(),
        format!("{a} on {devno}: write 20MiB/s, weight 500")
    );
    assert_eq!(write_bps_rule(&dir(a), &devno)?, Some(20 << 20));
    assert_eq!(
        kernel_limit(&dir(a), &devno, "read_iops_device", "riops")?,
        None,
        "the old read limit stayed"
    );

    // Bad input: exit status and a message naming the problem; nothing
    // changes.
    let set = |cgroup: &str, device: &str, more: &[&str]| -> Vec<String> {
        ["io", "set", cgroup, "--device", device]
            .iter()
            .chain(more)
            .map(|s| s.to_string())
            .collect()
    };
    for (args, code, needle) in [
        (set(a, "/dev/nope", &["--write-bps", "1M"]), 2, "/dev/nope"),
        (
            set(a, "7:x", &["--write-bps", "1M"]),
            2,
            "minor 'x' is not a number",
        ),
        (set(a, "loop0", &["--write-bps", "1M"]), 2, "use a path"),
        (
            set(a, "/dev/null", &["--write-bps", "1M"]),
            2,
            "not a block device",
        ),
        (
            set(a, "4095:1048575", &["--write-bps", "1M"]),
            2,
            "no block device 4095:1048575",
        ),
        (set(a, &devno, &["--weight", "0"]), 2, "1..=1000"),
        (set(a, &devno, &["--weight", "1001"]), 2, "1..=1000"),
        (set(a, &devno, &["--write-bps", "0"]), 2, "zero"),
        (
            set(a, &devno, &["--read-bps", "fast"]),
            2,
            "invalid byte rate 'fast'",
        ),
        (set(a, &devno, &["--write-iops", "0"]), 2, "1..=100000000"),
        (set(a, &devno, &[]), 2, "no limit given"),
        (
            set(&format!("{a}/nope"), &devno, &["--write-bps", "1M"]),
            3,
            "does not exist",
        ),
        (set("/etc", &devno, &["--write-bps", "1M"]), 2, "outside"),
        (set("../x", &devno, &["--write-bps", "1M"]), 2, "'..'"),
        (
            ["io", "unset", &format!("{a}/nope")]
                .map(String::from)
                .to_vec(),
            3,
            "no IO limits set",
        ),
        (
            ["io", "unset", a, "--device", "4095:1"]
                .map(String::from)
                .to_vec(),
            3,
            "no IO limits set for cgroup",
        ),
        (
            ["io", "unset", a, "--device", "7:x"]
                .map(String::from)
                .to_vec(),
            2,
            "minor 'x'",
        ),
        (
            ["io", "set", a, "--write-bps", "1M"]
                .map(String::from)
                .to_vec(),
            2,
            "--device",
        ),
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        d.fails(&args, code, needle)?;
    }
    // What qosctl refuses itself, the daemon refuses too.
    for (request, needle) in [
        (
            format!(r#"{{"op":"io_set","cgroup":"{c}","device":"{devno}","weight":0}}"#),
            "weight 0 is outside 1..=1000",
        ),
        (
            format!(r#"{{"op":"io_set","cgroup":"{c}","device":"{devno}","weight":1001}}"#),
            "weight 1001 is outside 1..=1000",
        ),
        (
            format!(r#"{{"op":"io_set","cgroup":"{c}","device":"{devno}","write_iops":0}}"#),
            "write_iops must be between 1",
        ),
        (
            format!(r#"{{"op":"io_set","cgroup":"{c}","device":"{devno}","write_bps":"0"}}"#),
            "zero",
        ),
        (
            format!(r#"{{"op":"io_set","cgroup":"{c}","device":"{devno}"}}"#),
            "no limit given",
        ),
    ] {
        let reply = raw(&d.socket, &request)?;
        assert!(
            reply.contains("\"invalid\"") && reply.contains(needle),
            "{request}: {reply}"
        );
    }
    assert_eq!(write_bps_rule(&dir(c), &devno)?, None);
    assert_eq!(write_bps_rule(&dir(a), &devno)?, Some(20 << 20));
    let v = io_show(&d)?;
    assert_eq!(v["groups"].as_array().map(Vec::len), Some(2), "{v}");
    let ga = group(&v, a).context("a lost its limits")?;
    assert_eq!(
        (
            ga["limits"]["write_bps"].as_str(),
            ga["limits"]["weight"].as_u64()
        ),
        (Some("20MiB"), Some(500)),
        "{ga}"
    );

    // A cgroup that goes away keeps its limits waiting; they come back
    // with it.
    let w = format!("{a}/w");
    std::fs::create_dir(dir(&w))?;
    d.ok(&["io", "set", &w, "--device", &devno, "--write-bps", "1MiB"])?;
    assert_eq!(write_bps_rule(&dir(&w), &devno)?, Some(1 << 20));
    std::fs::remove_dir(dir(&w))?;
    let waiting = format!("{w} on {devno} (io)");
    let waits = |d: &Daemon| {
        d.ok(&["status", "-o", "json"])
            .ok()
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
            .is_some_and(|s| {
                s["waiting"]
                    .as_array()
                    .is_some_and(|w| w.iter().any(|x| x == waiting.as_str()))
            })
    };
    assert!(
        wait_for(Duration::from_secs(3), || waits(&d)),
        "limits of a vanished cgroup do not wait: {}",
        d.ok(&["status"])?
    );
    std::fs::create_dir(dir(&w))?;
    assert!(
        wait_for(Duration::from_secs(3), || write_bps_rule(&dir(&w), &devno)
            .is_ok_and(|r| r == Some(1 << 20))),
        "limits not re-applied to the re-created cgroup"
    );
    assert!(!waits(&d));

    // Persisted across a restart; a clean stop leaves them enforcing in the
    // kernel while no qosd runs.
    d.stop()?;
    // (a's rule is the lower of its rate and its weight's current share.)
    assert!(
        write_bps_rule(&dir(a), &devno)?.is_some_and(|r| r <= 20 << 20),
        "dropped on stop"
    );
    assert_eq!(write_bps_rule(&dir(&w), &devno)?, Some(1 << 20));
    // A cgroup missing at start: its limits wait for it.
    std::fs::remove_dir(dir(&w))?;
    d.start()?;
    assert_eq!(write_bps_rule(&dir(a), &devno)?, Some(20 << 20));
    let v = io_show(&d)?;
    let ga = group(&v, a).context("limits lost across a restart")?;
    assert_eq!(ga["limits"]["weight"], 500, "{v}");
    assert!(group(&v, &w).is_none(), "{v}");
    assert!(waits(&d), "{}", d.ok(&["status"])?);
    assert!(d.log().contains("cgroup does not exist yet"), "{}", d.log());
    std::fs::create_dir(dir(&w))?;
    assert!(
        wait_for(Duration::from_secs(3), || write_bps_rule(&dir(&w), &devno)
            .is_ok_and(|r| r == Some(1 << 20))),
        "waiting limits not applied when the cgroup appeared"
    );
    d.ok(&["io", "unset", &w])?;
    assert_eq!(write_bps_rule(&dir(&w), &devno)?, None);
    std::fs::remove_dir(dir(&w))?;

    // Unset one device, then everything of b.
    let out = d.ok(&["io", "unset", a, "--device", fs.device()])?;
    assert_eq!(
        out.trim(),
        format!("{a} on {}: IO limits removed", fs.device())
    );
    assert_eq!(write_bps_rule(&dir(a), &devno)?, None);
    assert_eq!(
        std::fs::read_to_string(dir(a).join(if io_v1()? {
            "blkio.throttle.write_bps_device"
        } else {
            "io.max"
        }))?
        .trim(),
        ""
    );
    let out = d.ok(&["io", "unset", b])?;
    assert_eq!(out.trim(), format!("{b}: IO limits removed"));
    assert_eq!(
        kernel_limit(&dir(b), &devno, "read_iops_device", "riops")?,
        None
    );
    assert!(io_show(&d)?["groups"].as_array().is_some_and(Vec::is_empty));
    d.fails(&["io", "unset", a], 3, "no IO limits set")?;
    d.ok(&[
        "io",
        "set",
        b,
        "--device",
        fs.device(),
        "--write-bps",
        "3MiB",
    ])?;
    d.stop()?;
    let state = std::fs::read_to_string(d.dir.path().join("state/state.json"))?;
    assert!(!state.contains(a) && !state.contains(&w), "{state}");
    // The writeback tracker stays attached (pinned) while qosd is down.
    let io_links: Vec<String> = std::fs::read_dir(&d.pins)?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("io-"))
        .flat_map(|e| {
            std::fs::read_dir(e.path().join("links"))
                .into_iter()
                .flatten()
                .flatten()
        })
        .map(|l| l.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        io_links.contains(&"qos_io_dirty".to_owned())
            && io_links.contains(&"qos_io_bio".to_owned()),
        "{io_links:?}"
    );
    // --cleanup takes what qosd left in the kernel out; the desired state
    // stays for the next start.
    assert_eq!(write_bps_rule(&dir(b), &devno)?, Some(3 << 20));
    let o = Command::new(QOSD)
        .arg("--config")
        .arg(&d.config)
        .arg("--cleanup")
        .output()?;
    assert!(o.status.success(), "{o:?}");
    assert_eq!(write_bps_rule(&dir(b), &devno)?, None, "left by --cleanup");
    assert!(!d.pins.exists(), "pins left by --cleanup");
    let state = std::fs::read_to_string(d.dir.path().join("state/state.json"))?;
    assert!(state.contains(b), "{state}");
    Ok(())
}

#[test]
fn io_commands_without_io_enabled_say_so() -> Result<()> {
    if !require_root("io_commands_without_io_enabled_say_so") {
        return Ok(());
    }
    let d = Daemon::new("1gbit")?;
    d.fails(&["io", "show"], 5, "[io] enabled = true")?;
    d.fails(
        &["io", "set", "x", "--device", "7:0", "--write-bps", "1M"],
        5,
        "disk IO control is not enabled",
    )?;
    d.fails(&["io", "unset", "x"], 5, "not enabled")?;
    let s: serde_json::Value = serde_json::from_str(&d.ok(&["status", "-o", "json"])?)?;
    assert!(s.get("io").is_none(), "{s}");
    assert!(d.ok(&["status"])?.contains("io: not enabled"));
    Ok(())
}
