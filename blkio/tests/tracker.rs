//! The writeback tracker on a real loop device: buffered writes are charged
//! to the cgroup that dirtied them, whoever writes them back.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "tests fail by panicking"
)]

use blkio::{Device, Tracker, controller::inode_key};
use testbeds::io::{IoCgroup, LoopFs, dd};

const MIB: u64 = 1 << 20;

#[test]
fn buffered_writes_are_attributed_to_their_dirtier() {
    if !testbeds::require_root("buffered_writes_are_attributed_to_their_dirtier") {
        return;
    }
    let fs = LoopFs::new("ext4", 512, false).expect("loop device");
    let dev = Device::parse(&fs.devno()).unwrap();
    let a = IoCgroup::new("qos-io-a").unwrap();
    let tracker = Tracker::load().expect("tracker loads on this kernel");
    let file = fs.mount().join("a.bin");
    let status = a.spawn(&mut dd(&file, 64, false)).unwrap().wait().unwrap();
    assert!(status.success());
    // Written back by sync (root), not by the dirtier.
    assert!(
        std::process::Command::new("sync")
            .status()
            .unwrap()
            .success()
    );

    use std::os::unix::fs::MetadataExt;
    let id = std::fs::metadata(a.io_dir().join(a.name())).unwrap().ino();
    let c = tracker.counters().unwrap();
    let mine = c.get(&(id, dev.kernel_dev())).copied().unwrap_or_default();
    assert!(mine.dirtied >= 64 * MIB, "dirtied {}", mine.dirtied);
    assert!(
        mine.written_back >= 64 * MIB * 99 / 100,
        "written back and attributed {} of {}",
        mine.written_back,
        64 * MIB
    );
    // v1: the kernel charged writeback to the flusher's group, not to A;
    // v2 charges the dirtier itself.
    let h = qos_core::Hierarchy::detect().unwrap();
    if blkio::Backend::detect(&h).unwrap().mode() == blkio::IoMode::V1Assisted {
        assert!(mine.leaked >= mine.written_back * 99 / 100, "{mine:?}");
    } else {
        assert!(mine.leaked * 100 <= mine.written_back, "{mine:?}");
    }
    let d = tracker.devices().unwrap()[&dev.kernel_dev()];
    assert!(d.attributed * 100 >= d.file_write * 99, "{d:?}");
    let ino = std::fs::metadata(&file).unwrap().ino();
    let inodes = tracker.inodes().unwrap();
    let (_, info) = inodes
        .iter()
        .find(|(k, _)| *k == inode_key(dev, ino))
        .expect("the file is tracked");
    assert_eq!(info.owner, id);
    assert_eq!(info.pending, 0, "everything was written back");
}
