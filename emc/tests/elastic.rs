//! Root integration tests: real cgroups (the v1 memory hierarchy on this
//! host), a real allocator, real pressure inside a scope cgroup whose limit
//! stands for the host. Short and CI-sized.
//!
//! The allocator is this test binary run again with `EMC_TEST_MEMHOG` set
//! (see `memhog_helper`), so the tests need no other binary.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "test code: a failure panics"
)]

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use emc::{Emc, EmcSettings, EventKind, Level, MemQuota};
use qos_core::{Hierarchy, Size};
use testbeds::{KillOnDrop, mem::MemCgroup, require_root, wait_for};

const MB: u64 = 1 << 20;

/// Not a test: the allocator, when this binary is started by `memhog`
/// (ignored in normal runs, so it does not count as a passing test).
#[test]
#[ignore = "the allocator the other tests start; not a test of its own"]
fn memhog_helper() {
    if let Ok(spec) = std::env::var("EMC_TEST_MEMHOG") {
        let argv =
            std::iter::once("memhog".to_owned()).chain(spec.split_whitespace().map(str::to_owned));
        let code = match testbeds::memload::run_from(argv) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("memhog: {e:#}");
                1
            }
        };
        std::process::exit(code);
    }
}

fn memhog(cg: &MemCgroup, name: &str, spec: &str) -> KillOnDrop {
    let exe = std::env::current_exe().expect("test binary");
    let mut cmd = Command::new(exe);
    cmd.args([
        "--exact",
        "memhog_helper",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("EMC_TEST_MEMHOG", spec)
    .stdin(Stdio::null())
    .stdout(Stdio::null());
    KillOnDrop(cg.spawn(name, &mut cmd).expect("spawn memhog"))
}

fn size(mb: u64) -> Size {
    Size::from_bytes(mb * MB).expect("size")
}

fn quota(g: u64, prio: u32) -> MemQuota {
    MemQuota {
        guarantee: size(g),
        limit: None,
        priority: prio,
    }
}

/// A scope cgroup of `limit_mb` standing for the host, and a controller
/// over it.
fn scope(prefix: &str, limit_mb: u64) -> (MemCgroup, Emc) {
    let cg = MemCgroup::new(prefix).expect("scope cgroup");
    cg.set_limit(cg.name(), limit_mb * MB).expect("scope limit");
    let settings = EmcSettings {
        scope: Some(cg.name().to_owned()),
        reserve: size(16),
        interval: Duration::from_millis(100),
        ..Default::default()
    };
    let h = Hierarchy::detect().expect("hierarchy");
    let emc = Emc::start(&h, settings).expect("emc");
    (cg, emc)
}

fn oom_kills(cg: &MemCgroup, name: &str) -> u64 {
    cg.oom_kills(name).expect("oom kills")
}

fn usage(cg: &MemCgroup, name: &str) -> u64 {
    cg.usage(name).expect("usage")
}

/// Steps the controller every interval until `done` or the timeout.
fn run_until(emc: &mut Emc, timeout: Duration, mut done: impl FnMut(&mut Emc) -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        emc.step().expect("step");
        if done(emc) {
            return true;
        }
        std::thread::sleep(emc.settings().interval);
    }
    false
}

fn exited_ok(child: &mut KillOnDrop) -> Option<bool> {
    child.0.try_wait().expect("wait").map(|s| s.success())
}

#[test]
fn a_burst_beyond_the_guarantee_survives_while_the_host_has_memory() {
    if !require_root("a_burst_beyond_the_guarantee_survives_while_the_host_has_memory") {
        return;
    }
    let (cg, mut emc) = scope("qos-emc-burst", 768);
    let a = cg.child("a").expect("child");
    emc.set(&a, quota(64, 3)).expect("quota");
    // 3× the guarantee, held for a second.
    let mut hog = memhog(&cg, &a, "--anon-mb 192 --rate-mbps 400 --hold-s 1");
    let mut peak = 0;
    let finished = run_until(&mut emc, Duration::from_secs(20), |_| {
        peak = peak.max(usage(&cg, &a));
        exited_ok(&mut hog).is_some()
    });
    assert!(finished, "the burst did not finish");
    assert_eq!(exited_ok(&mut hog), Some(true), "the burst was killed");
    assert!(
        peak >= 150 * MB,
        "peak {} MiB: the burst never happened",
        peak / MB
    );
    assert_eq!(oom_kills(&cg, &a), 0);
    let kills = emc
        .events_since(0)
        .into_iter()
        .filter(|e| e.kind == EventKind::Kill)
        .count();
    assert_eq!(kills, 0);
    emc.stop();
}

#[test]
fn reclaim_takes_from_the_lowest_priority_first_and_never_below_a_guarantee() {
    if !require_root("reclaim_takes_from_the_lowest_priority_first_and_never_below_a_guarantee") {
        return;
    }
    let (cg, mut emc) = scope("qos-emc-order", 768);
    let dir = tempfile::tempdir_in("/var/tmp").expect("tmp");
    let names: Vec<String> = ["svc", "low", "mid"]
        .iter()
        .map(|n| cg.child(n).expect("child"))
        .collect();
    let (svc, low, mid) = (&names[0], &names[1], &names[2]);
    emc.set(svc, quota(450, 0)).expect("svc");
    emc.set(low, quota(48, 7)).expect("low");
    emc.set(mid, quota(48, 3)).expect("mid");
    // low and mid: page cache (reclaimable) well above their guarantees.
    let f = |n: &str| dir.path().join(n).display().to_string();
    let _low = memhog(
        &cg,
        low,
        &format!("--file {} --file-mb 200 --anon-mb 16", f("low")),
    );
    let _mid = memhog(
        &cg,
        mid,
        &format!("--file {} --file-mb 200 --anon-mb 16", f("mid")),
    );
    assert!(wait_for(Duration::from_secs(30), || usage(&cg, low)
        > 200 * MB
        && usage(&cg, mid) > 200 * MB));
    // The service grows towards its guarantee and squeezes the scope more
    // than low alone can give back.
    let _svc = memhog(&cg, svc, "--anon-mb 440 --rate-mbps 100");
    let guarantees = [(svc, 450), (low, 48), (mid, 48)];
    let mut min_limit_over_guarantee = true;
    let reclaimed_both = run_until(&mut emc, Duration::from_secs(30), |emc| {
        for (n, g) in guarantees {
            let cap = cg.cap(n).expect("cap").unwrap_or(u64::MAX);
            min_limit_over_guarantee &= cap >= g * MB;
        }
        let ev = emc.events_since(0);
        let got = |n: &str| {
            ev.iter()
                .any(|e| e.kind == EventKind::Reclaim && e.cgroup.as_deref() == Some(n))
        };
        // cgroup2 counts mid's inactive page cache as free and protects
        // svc's memory.min itself: once low has given back, svc can fit
        // without taking from mid (v1 needs both).
        got(low) && (got(mid) || cg.is_v2()) && usage(&cg, svc) >= 430 * MB
    });
    let ev = emc.events_since(0);
    let first = |n: &str| {
        ev.iter().position(|e| {
            matches!(e.kind, EventKind::Reclaim | EventKind::ReclaimBlocked)
                && e.cgroup.as_deref() == Some(n)
        })
    };
    let summary: Vec<String> = ev
        .iter()
        .map(|e| format!("{:?} {:?} {}", e.kind, e.cgroup, e.detail))
        .collect();
    assert!(
        reclaimed_both,
        "both low and mid should have been reclaimed (mid {} MiB): {summary:#?}",
        usage(&cg, mid) / MB
    );
    assert!(
        first(low).is_some() && (first(mid).is_none() || first(low) < first(mid)),
        "low (priority 7) must be reclaimed before mid (3): {summary:#?}"
    );
    assert_eq!(
        first(svc),
        None,
        "the service within its guarantee was reclaimed: {summary:#?}"
    );
    assert!(min_limit_over_guarantee, "a cap went below a guarantee");
    assert!(
        !ev.iter().any(|e| e.kind == EventKind::Kill),
        "no kill outside an emergency: {summary:#?}"
    );
    assert!(
        ev.iter()
            .any(|e| e.kind == EventKind::Level && e.level >= Level::Tight)
    );
    emc.stop();
}

#[test]
fn a_cgroup_is_killed_only_in_an_emergency_and_by_policy() {
    if !require_root("a_cgroup_is_killed_only_in_an_emergency_and_by_policy") {
        return;
    }
    let (cg, mut emc) = scope("qos-emc-kill", 512);
    let a = cg.child("a").expect("a");
    let b = cg.child("b").expect("b");
    emc.set(&a, quota(64, 6)).expect("a");
    emc.set(&b, quota(64, 1)).expect("b");
    // The controller holds the scope's OOM killer: together they want 640
    // MiB of 512, so they end up waiting, not killed (v1: under_oom; v2:
    // throttled at the scope's memory.high).
    let mut hog_a = memhog(&cg, &a, "--anon-mb 340");
    let mut hog_b = memhog(&cg, &b, "--anon-mb 300");
    let under_oom = || cg.held_at_cap(cg.name()).expect("scope state");
    assert!(
        wait_for(Duration::from_secs(30), under_oom),
        "the scope never ran out"
    );
    assert_eq!(
        oom_kills(&cg, cg.name()),
        0,
        "the kernel killed while the controller held its OOM killer"
    );
    assert!(exited_ok(&mut hog_a).is_none() && exited_ok(&mut hog_b).is_none());
    let waker = emc.waker();
    assert!(
        waker.is_some(),
        "no PSI trigger on the scope's pressure file"
    );
    // Now the controller runs: emergency, kill the lower priority.
    let done = run_until(&mut emc, Duration::from_secs(20), |emc| {
        emc.events_since(0)
            .iter()
            .any(|e| e.kind == EventKind::Kill)
    });
    let ev = emc.events_since(0);
    let summary: Vec<String> = ev
        .iter()
        .map(|e| format!("{:?} {:?} {}", e.kind, e.cgroup, e.detail))
        .collect();
    assert!(done, "no kill: {summary:#?}");
    let kills: Vec<_> = ev.iter().filter(|e| e.kind == EventKind::Kill).collect();
    assert_eq!(kills.len(), 1, "{summary:#?}");
    assert_eq!(kills[0].cgroup.as_deref(), Some(a.as_str()));
    assert_eq!(kills[0].level, Level::Emergency);
    assert!(kills[0].detail.contains("emergency"), "{}", kills[0].detail);
    assert!(
        wait_for(Duration::from_secs(5), || exited_ok(&mut hog_a).is_some()),
        "a survived"
    );
    // b gets its memory (its cap is released once the host is normal
    // again) and lives on.
    let recovered = run_until(&mut emc, Duration::from_secs(15), |e| {
        usage(&cg, &b) >= 290 * MB && e.level() == Level::Normal
    });
    let summary: Vec<String> = emc
        .events_since(0)
        .iter()
        .map(|e| format!("{:?} {:?} {}", e.kind, e.cgroup, e.detail))
        .collect();
    assert!(
        recovered,
        "b did not get its memory back ({} MiB, cap {:?}), or the host did not return to \
         normal (level {}): {summary:#?}",
        usage(&cg, &b) / MB,
        cg.cap(&b).ok().flatten().map(|c| c / MB),
        emc.level()
    );
    assert!(exited_ok(&mut hog_b).is_none(), "b died");
    assert_eq!(
        oom_kills(&cg, cg.name()) + oom_kills(&cg, &a) + oom_kills(&cg, &b),
        0
    );
    emc.stop();
    assert!(cg.oom_killer_released(cg.name()).expect("scope state"));
}
