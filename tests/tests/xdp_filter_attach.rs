//! How the XDP source filter attaches and detaches: natively on veth,
//! generically on loopback, gone after a drop, a failed start-up and a
//! SIGKILLed proxy. Runs as root in its own network namespace.

use std::{process::Command, time::Duration};

use anyhow::{Result, ensure};
use nix::sys::signal::Signal;
use splice_proxy::xdp_filter::{AllowLists, SourceFilter, XdpAttachMode};
use testkit::{netns::NetNs, process::ProxyProcess};

/// `list` allowed to port 6443.
fn lists(list: &[&str]) -> AllowLists {
    let prefixes = list.iter().map(|p| p.parse().unwrap_or_else(|e| panic!("{p}: {e}"))).collect();
    AllowLists::from([(6443, prefixes)])
}

/// Creates the veth pair `xf-a`/`xf-b` in the current namespace.
fn veth_pair() -> Result<()> {
    let status =
        Command::new("ip").args(["link", "add", "xf-a", "type", "veth", "peer", "name", "xf-b"]).status()?;
    ensure!(status.success(), "creating a veth pair: {status}");
    Ok(())
}

/// `ip -d link show dev` of `interface` in the current namespace.
fn link_show(interface: &str) -> Result<String> {
    let out = Command::new("ip").args(["-d", "link", "show", "dev", interface]).output()?;
    ensure!(out.status.success(), "ip link show {interface}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn attaches_natively_to_veth_generically_to_loopback_and_detaches_on_drop() -> Result<()> {
    let _netns = NetNs::enter()?;
    veth_pair()?;
    let allowed = lists(&["192.0.2.0/24"]);

    let mut on_veth = SourceFilter::load(&allowed)?;
    let attached = on_veth.attach("xf-a")?;
    assert_eq!(attached.mode, XdpAttachMode::Native, "{attached:?}");
    let shown = link_show("xf-a")?;
    // `ip` names the mode after the MTU: `xdp` (native) or `xdpgeneric`.
    ensure!(shown.contains(" xdp ") && shown.contains("name source_filter"), "not native on xf-a: {shown}");

    let mut on_loopback = SourceFilter::load(&allowed)?;
    let attached = on_loopback.attach("lo")?;
    assert_eq!(attached.mode, XdpAttachMode::Generic, "{attached:?}");
    ensure!(attached.why.contains("native mode refused"), "{attached:?}");
    let shown = link_show("lo")?;
    ensure!(
        shown.contains(" xdpgeneric ") && shown.contains("name source_filter"),
        "not generic on lo: {shown}"
    );

    drop((on_veth, on_loopback));
    for interface in ["xf-a", "lo"] {
        let shown = link_show(interface)?;
        ensure!(!shown.contains("prog/xdp") && !shown.contains(" xdp"), "{interface} still has XDP: {shown}");
    }
    ensure!(SourceFilter::load(&allowed)?.attach("no-such-if").is_err(), "attached to a missing interface");
    Ok(())
}

#[test]
fn a_failed_start_or_a_killed_proxy_leaves_no_program_attached() -> Result<()> {
    let _netns = NetNs::enter()?;
    veth_pair()?;
    let filter = [
        "--xdp-interface",
        "xf-a",
        "--allow-source",
        "192.0.2.0/24",
        "--upstream",
        "127.0.0.2:443",
        "--no-sni-check",
    ];

    // Attached before binding; the bind fails; the filter goes with the process.
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = taken.local_addr()?.to_string();
    let out = Command::new(testkit::process::binary()?).args(filter).args(["--listen", &addr]).output()?;
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{log}");
    ensure!(
        log.contains("XDP source filter attached") && log.contains("XDP source filter detached"),
        "{log}"
    );
    let shown = link_show("xf-a")?;
    ensure!(!shown.contains("prog/xdp"), "a failed start left XDP on xf-a: {shown}");

    // A BPF link dies with its process, even one killed with SIGKILL.
    let mut proxy = ProxyProcess::start(&filter)?;
    ensure!(link_show("xf-a")?.contains("name source_filter"), "not attached while running");
    proxy.signal(Signal::SIGKILL)?;
    tokio::runtime::Runtime::new()?.block_on(proxy.wait_exit(Duration::from_secs(10)))?;
    let shown = link_show("xf-a")?;
    ensure!(!shown.contains("prog/xdp"), "a killed proxy left XDP on xf-a: {shown}");
    Ok(())
}
