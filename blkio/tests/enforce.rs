//! Enforcement on this host's kernel: a buffered writer in a limited cgroup
//! is held at its limit at the block layer, and the kernel charges the
//! writeback to it (v1: through the flush helper); removing the limit
//! removes every trace.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "tests fail by panicking"
)]

use std::time::{Duration, Instant};

use blkio::{Device, IoControl, IoLimits, IoMode, controller::IoSettings};
use testbeds::io::{IoCgroup, LoopFs, dd};

const MIB: u64 = 1 << 20;

#[test]
fn buffered_write_limit_holds_and_is_charged_to_the_writer() {
    if !testbeds::require_root("buffered_write_limit_holds_and_is_charged_to_the_writer") {
        return;
    }
    let fs = LoopFs::new("ext4", 512, true).expect("loop device");
    let dev = Device::parse(&fs.devno()).unwrap();
    let a = IoCgroup::new("qos-ioe-").unwrap();
    let h = qos_core::Hierarchy::detect().unwrap();
    let mut io = IoControl::start(&h, IoSettings::default()).expect("IO control starts");
    let limit = 8 * MIB;
    io.set(
        a.name(),
        dev,
        IoLimits {
            write_bps: Some(blkio::ByteRate::from_bytes_per_sec(limit).unwrap()),
            ..IoLimits::default()
        },
    )
    .unwrap();
    if io.mode() == IoMode::V1Assisted {
        assert_eq!(
            a.read("blkio.throttle.write_bps_device").unwrap().trim(),
            format!("{dev} {limit}")
        );
    }
    // A writer far faster than the limit (page cache speed without control).
    let mut writer = testbeds::KillOnDrop(
        a.spawn(&mut dd(&fs.mount().join("a.bin"), 400, false))
            .unwrap(),
    );
    let measure = |io: &mut IoControl| {
        let c = io.counters_by_name();
        c.get(&(a.name().to_owned(), dev))
            .map_or((0, 0), |c| (c.written_back + c.direct, c.leaked))
    };
    // The daemon's loop, for a while (the sleep paces the control steps),
    // sampling the block-layer bytes after each step.
    let drive = |io: &mut IoControl, seconds: u64| {
        let start = Instant::now();
        let mut samples = Vec::new();
        while start.elapsed() < Duration::from_secs(seconds) {
            io.step().unwrap();
            samples.push((start.elapsed().as_secs_f64(), measure(io).0));
            std::thread::sleep(io.interval());
        }
        samples
    };
    // Warm up until writeback reaches the device (on cgroup2 the kernel
    // starts it only at the dirty thresholds), then measure 5 s of control
    // steps. The rate is taken between the first and last arrivals: on
    // cgroup2 throttled writeback arrives in chunks of up to 8 MiB, one a
    // second here.
    let until = Instant::now() + Duration::from_secs(60);
    while measure(&mut io).0 == 0 && Instant::now() < until {
        drive(&mut io, 1);
    }
    drive(&mut io, 1);
    let (w0, l0) = measure(&mut io);
    let samples = drive(&mut io, 5);
    let (w1, l1) = measure(&mut io);
    let rate = testbeds::io::paced_rate(&samples).expect("samples over 5 s");
    assert!(
        rate > 0.8 * limit as f64 && rate < 1.2 * limit as f64,
        "block-layer write rate {:.2} MiB/s, limit {} MiB/s",
        rate / MIB as f64,
        limit / MIB
    );
    assert!(
        (l1 - l0) * 100 <= (w1 - w0) * 5,
        "leaked {} of {} bytes",
        l1 - l0,
        w1 - w0
    );
    let status = io.status();
    let g = &status.groups[0];
    assert_eq!(g.cgroup, a.name());
    assert!(g.dirtied_bytes > 0 && g.charged_write_bytes > 0, "{g:?}");
    // The writer is paused at times, never killed: still running, or done
    // (on cgroup2 its 400 MB may all fit under the dirty limit).
    if let Some(status) = writer.0.try_wait().unwrap() {
        assert!(status.success(), "writer ended with {status}");
    }

    io.remove(a.name(), Some(dev)).unwrap();
    if io.mode() == IoMode::V1Assisted {
        assert_eq!(
            a.read("blkio.throttle.write_bps_device").unwrap().trim(),
            ""
        );
        let freezer = h.v1_mount("freezer").expect("v1 freezer mounted");
        let state = std::fs::read_to_string(freezer.join(a.name()).join("freezer.state")).unwrap();
        assert_eq!(state.trim(), "THAWED");
    }
    assert!(io.configured().is_empty());
    assert!(matches!(
        io.remove(a.name(), Some(dev)),
        Err(blkio::BlkioError::NotConfigured { .. })
    ));
}

#[test]
fn bad_input_is_refused_and_leaves_nothing() {
    if !testbeds::require_root("bad_input_is_refused_and_leaves_nothing") {
        return;
    }
    let fs = LoopFs::new("ext4", 256, false).expect("loop device");
    let dev = Device::parse(&fs.devno()).unwrap();
    let a = IoCgroup::new("qos-iob-").unwrap();
    let h = qos_core::Hierarchy::detect().unwrap();
    let mut io = IoControl::start(&h, IoSettings::default()).unwrap();
    let w = |weight| IoLimits {
        weight: Some(weight),
        ..IoLimits::default()
    };
    for (name, dev, limits, says) in [
        (a.name(), dev, w(0), "outside 1..=1000"),
        (a.name(), dev, w(1001), "outside 1..=1000"),
        (a.name(), dev, IoLimits::default(), "no limit given"),
        ("qos-no-such-cgroup", dev, w(10), "does not exist"),
        (
            a.name(),
            Device {
                major: 4095,
                minor: 7,
            },
            w(10),
            "no block device",
        ),
    ] {
        let e = io.set(name, dev, limits).unwrap_err().to_string();
        assert!(e.contains(says), "{e}");
    }
    assert!(io.configured().is_empty());
    if io.mode() == IoMode::V1Assisted {
        assert_eq!(
            a.read("blkio.throttle.write_bps_device").unwrap().trim(),
            ""
        );
    }
}
