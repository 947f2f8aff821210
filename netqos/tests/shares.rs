//! Real traffic through the shaper: shares within tolerance (root).
use std::{
    net::Ipv4Addr,
    sync::{Arc, atomic::{AtomicBool, Ordering}},
    time::Duration,
};

use netqos::{ContainerInterfaces, NetQuota, Shaper, ShaperSettings, policy::Tuning};
use testbeds::{
    CgroupDir, Placement,
    iperf::{Client, ClientOpts, Server, wire_bytes},
    net::EgressBed,
    require_root,
};

fn run_shaper(shaper: Shaper) -> (Arc<AtomicBool>, std::thread::JoinHandle<Shaper>) {
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    let h = std::thread::spawn(move || {
        let mut shaper = shaper;
        while !s2.load(Ordering::Relaxed) {
            shaper.tick().expect("tick");
            std::thread::sleep(netqos::TICK);
        }
        shaper
    });
    (stop, h)
}

#[test]
fn busy_classes_get_their_guarantees() -> anyhow::Result<()> {
    if !require_root("busy_classes_get_their_guarantees") {
        return Ok(());
    }
    let bed = EgressBed::new(3, 0)?;
    let tmp = tempfile::tempdir()?;
    let root = testbeds::cgroup2_root()?;
    let parent = CgroupDir::new("qos-test-")?;
    let h = qos_core::Hierarchy::detect()?;
    let mut shaper = Shaper::start(
        ShaperSettings {
            interface: bed.shaped_if().to_owned(),
            capacity: "1gbit".parse()?,
            default_rate: Some("1mbit".parse()?),
            default_priority: 7,
            container_interfaces: ContainerInterfaces::Mode("none".into()),
            tuning: Tuning::default(),
        },
        &root,
    )?;
    let quotas = [100u64, 300, 599];
    let mut places = Vec::new();
    for (i, q) in quotas.iter().enumerate() {
        let dir = parent.child(&format!("t{i}"))?;
        let cg = h.resolve(&format!("{}/t{i}", parent.name()))?;
        shaper.set(&cg, NetQuota { rate: format!("{q}mbit").parse()?, ceil: None, priority: 0 })?;
        places.push(Placement { cgroup: Some(dir), netns: None });
    }
    let (stop, handle) = run_shaper(shaper);
    let peer = Placement { cgroup: None, netns: Some(bed.peer.path()) };
    let secs = 4.0;
    let mut servers = Vec::new();
    let mut clients = Vec::new();
    for (i, p) in places.iter().enumerate() {
        let port = 5301 + i as u16;
        servers.push(Server::start(&peer, bed.peer_ip, port, tmp.path(), 0.1)?);
        let opts = ClientOpts { seconds: secs, parallel: 1, udp_bps: None, bind: Some(bed.sender_ips[i]) };
        clients.push(Client::start(p, bed.peer_ip, port, &opts, tmp.path())?);
    }
    let mut rates = Vec::new();
    for (s, c) in servers.into_iter().zip(clients) {
        let _ = c.finish(Duration::from_secs(20))?;
        let r = s.finish(Duration::from_secs(20))?;
        // skip the first second
        let (b, t) = r.intervals.iter().filter(|i| i.0 >= 1.0).fold((0u64, 0.0), |(b, t), i| (b + i.2, t + i.1 - i.0));
        rates.push(wire_bytes(b, false) as f64 * 8.0 / t / 1e6);
    }
    stop.store(true, Ordering::Relaxed);
    let shaper = handle.join().expect("shaper thread");
    let status = shaper.status();
    shaper.stop();
    eprintln!("rates (mbit): {rates:?}");
    eprintln!("{}", serde_json::to_string_pretty(&status)?);
    for (r, q) in rates.iter().zip(quotas) {
        assert!(*r >= 0.9 * q as f64, "class at {q} mbit got {r:.1}");
    }
    let total: f64 = rates.iter().sum();
    assert!(total <= 1050.0, "total {total:.1} exceeds the capacity");
    let _ = Ipv4Addr::LOCALHOST;
    Ok(())
}
