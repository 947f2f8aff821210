//! Loads the datapath on a throwaway veth (root).
use netqos::{ContainerInterfaces, NetQuota, Shaper, ShaperSettings, policy::Tuning};
use testbeds::{CgroupDir, Netns, Veth, require_root, unique};

#[test]
fn datapath_loads_and_attaches() -> anyhow::Result<()> {
    if !require_root("datapath_loads_and_attaches") {
        return Ok(());
    }
    let ns = Netns::new("qsmk")?;
    let veth = Veth::new(&unique("qsm"), "peer0", &ns)?;
    let root = testbeds::cgroup2_root()?;
    let settings = ShaperSettings {
        interface: veth.host().to_owned(),
        capacity: "1gbit".parse()?,
        default_rate: Some("10mbit".parse()?),
        default_priority: 7,
        container_interfaces: ContainerInterfaces::Mode("none".into()),
        tuning: Tuning::default(),
    };
    let mut shaper = Shaper::start(settings, &root)?;
    let cg = CgroupDir::new("qos-test-")?;
    let h = qos_core::Hierarchy::detect()?;
    let r = h.resolve(&cg.name())?;
    shaper.set(&r, NetQuota { rate: "100mbit".parse()?, ceil: None, priority: 0 })?;
    shaper.tick()?;
    let st = shaper.status();
    assert_eq!(st.classes.len(), 2);
    shaper.stop();
    Ok(())
}
