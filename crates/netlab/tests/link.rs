//! The emulated link end to end: needs root and working `ip netns`; elsewhere it says why it skips.

use std::path::Path;

use ep_netlab::{Helper, Link, Profile};

const PREFIX: &str = "eptest";

/// Why this machine cannot run the test, if it cannot.
fn skip_reason() -> Option<String> {
    ep_netlab::unavailable_reason()
}

fn helper() -> Helper {
    Helper::for_binary(env!("CARGO_BIN_EXE_ep-netlab"))
}

fn ns_exists(ns: &str) -> bool {
    Path::new("/run/netns").join(ns).exists()
}

#[test]
fn shaped_link_delays_rates_and_tears_down() {
    if let Some(why) = skip_reason() {
        eprintln!("skipping the emulated-link test: {why}");
        return;
    }
    // A custom link: 50 Mbit/s, 40 ms RTT, no loss.
    let link = Link::up_with(PREFIX, &Profile::parse_custom("50,40,0").unwrap(), helper()).unwrap();
    assert!(ns_exists(link.cloud_ns()) && ns_exists(link.edge_ns()));
    let a = link.measure().unwrap();
    eprintln!("50,40,0: {a:?}");
    assert!((30.0..=60.0).contains(&a.rtt_ms), "rtt {a:?}");
    assert!((30.0..=55.0).contains(&a.down_mbit), "down {a:?}");
    assert!((30.0..=55.0).contains(&a.up_mbit), "up {a:?}");
    let (cloud, edge) = (link.cloud_ns().to_string(), link.edge_ns().to_string());
    link.down().unwrap();
    assert!(
        !ns_exists(&cloud) && !ns_exists(&edge),
        "namespaces left behind"
    );

    // A named profile, brought up twice: the second `up` replaces the first's leftovers.
    let p = Profile::named("5g_urban").unwrap();
    let first = Link::up_with(PREFIX, &p, helper()).unwrap();
    std::mem::forget(first); // as if its process had died without tearing down
    let link = Link::up_with(PREFIX, &p, helper()).unwrap();
    let a = link
        .measure_for(10, std::time::Duration::from_secs(1))
        .unwrap();
    eprintln!("5g_urban: {a:?}");
    assert!((15.0..=35.0).contains(&a.rtt_ms), "rtt {a:?}");
    assert!(a.down_mbit > 30.0 && a.down_mbit < 110.0, "down {a:?}");
    // The control links reach both hosts from the root namespace.
    let cloud_ctl = link.cloud_ctl_ip();
    let listener = link
        .command_in(link.cloud_ns(), Path::new("true"))
        .status()
        .unwrap();
    assert!(listener.success());
    assert!(std::net::TcpStream::connect_timeout(
        &(cloud_ctl, 9).into(),
        std::time::Duration::from_secs(2)
    )
    .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused));
    drop(link);
    assert!(
        !ns_exists(&cloud) && !ns_exists(&edge),
        "namespaces left behind after drop"
    );
    ep_netlab::teardown(PREFIX).unwrap();
}
