//! Helpers shared by the root integration tests.
#![allow(clippy::expect_used, reason = "test code: a failure panics")]

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use netqos::Shaper;

/// Runs the shaper's control loop on a thread until the returned flag is set.
pub fn control_loop(shaper: Shaper) -> (Arc<AtomicBool>, std::thread::JoinHandle<Shaper>) {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let h = std::thread::spawn(move || {
        let mut shaper = shaper;
        while !flag.load(Ordering::Relaxed) {
            shaper.tick().expect("control step");
            std::thread::sleep(netqos::TICK);
        }
        shaper
    });
    (stop, h)
}
