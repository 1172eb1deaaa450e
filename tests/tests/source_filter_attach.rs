//! How the XDP source filter attaches and detaches: natively on veth,
//! generically on loopback, gone after a drop, a failed start-up and a
//! SIGKILLed proxy; one proxy with listeners on two interfaces attaches its
//! one program to both, keeps them on a SIGHUP that moves a listener, and
//! detaches it from both (at exit, and when the second interface refuses it). Runs as root in its own network namespace.

use std::{io::Write as _, process::Command, time::Duration};

use anyhow::{Context as _, Result, ensure};
use nix::sys::signal::Signal;
use serde_json::Value;
use splice_proxy::source_filter::{AllowLists, SourceFilter, XdpAttachMode};
use splice_proxy_tests::{
    netns::NetNs,
    process::{ProxyProcess, message},
};

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
    let out = Command::new(splice_proxy_tests::process::binary()?)
        .args(filter)
        .args(["--listen", &addr])
        .output()?;
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

/// The XDP mode (`xdp`, `xdpgeneric`) and program id on `interface` in the
/// current namespace, if a program is attached (`ip -j -d link`).
fn xdp_program(interface: &str) -> Result<Option<(&'static str, u64)>> {
    let out = Command::new("ip").args(["-j", "-d", "link", "show", "dev", interface]).output()?;
    ensure!(out.status.success(), "ip link show {interface}: {}", String::from_utf8_lossy(&out.stderr));
    let links: Value = serde_json::from_slice(&out.stdout).context("`ip -j` output")?;
    let Some(xdp) = links[0].get("xdp") else { return Ok(None) };
    let mode = match xdp["mode"].as_u64() {
        Some(1) => "xdp",
        Some(2) => "xdpgeneric",
        _ => anyhow::bail!("unexpected XDP mode on {interface}: {xdp}"),
    };
    let id = xdp["prog"]["id"].as_u64().with_context(|| format!("no program id in {xdp}"))?;
    Ok(Some((mode, id)))
}

/// A config file with two port-0 listeners: the first on the top-level
/// interface `top`, the second on its own `second`, each with a list.
fn two_interfaces(top: &str, second: &str) -> Result<tempfile::NamedTempFile> {
    let mut file = tempfile::NamedTempFile::new()?;
    write!(
        file,
        "xdp_interface = \"{top}\"\n\
         [[listeners]]\nlisten = \"127.0.0.1:0\"\nallowed_source_cidrs = [\"127.0.0.0/8\"]\n\
         [[listeners]]\nlisten = \"127.0.0.1:0\"\nxdp_interface = \"{second}\"\n\
         allowed_source_cidrs = [\"192.0.2.0/24\"]\n"
    )?;
    Ok(file)
}

/// The `interface` field of every log event with message `msg`, sorted.
fn interfaces_logged(events: &[Value], msg: &str) -> Vec<String> {
    let mut found: Vec<String> = events
        .iter()
        .filter(|e| message(e) == msg)
        .filter_map(|e| e["interface"].as_str().map(str::to_owned))
        .collect();
    found.sort();
    found
}

const UPSTREAM: [&str; 3] = ["--upstream", "127.0.0.2:443", "--no-sni-check"];

#[test]
fn one_proxy_attaches_to_every_listener_s_interface_and_detaches_from_all() -> Result<()> {
    let _netns = NetNs::enter()?;
    veth_pair()?;
    let config = two_interfaces("lo", "xf-a")?;
    let path = config.path().to_str().context("temp path")?;
    let mut proxy = ProxyProcess::start(&[&["--config", path][..], &UPSTREAM[..]].concat())?;

    // One program, two links: generic on loopback, native on the veth end.
    let on_lo = xdp_program("lo")?.context("nothing attached to lo")?;
    let on_veth = xdp_program("xf-a")?.context("nothing attached to xf-a")?;
    assert_eq!((on_lo.0, on_veth.0), ("xdpgeneric", "xdp"));
    assert_eq!(on_lo.1, on_veth.1, "two programs loaded, not one attached twice");
    assert_eq!(xdp_program("xf-b")?, None, "xf-b is no listener's interface");
    let events = proxy.events();
    let modes: Vec<(String, String)> = events
        .iter()
        .filter(|e| message(e) == "XDP source filter attached")
        .map(|e| {
            (e["interface"].as_str().unwrap_or("?").to_owned(), e["mode"].as_str().unwrap_or("?").to_owned())
        })
        .collect();
    assert_eq!(modes, [("lo".to_owned(), "generic".to_owned()), ("xf-a".to_owned(), "native".to_owned())]);

    // SIGHUP with the second listener moved to xf-b: the interfaces are fixed
    // until a restart (named in the log), the filter stays where it is.
    let moved = two_interfaces("lo", "xf-b")?;
    std::fs::copy(moved.path(), config.path())?;
    let runtime = tokio::runtime::Runtime::new()?;
    proxy.signal(Signal::SIGHUP)?;
    let warning = runtime.block_on(proxy.wait_message(
        "SIGHUP: changing this setting needs a restart; it keeps its running value",
        Duration::from_secs(10),
    ))?;
    assert_eq!(
        (warning["key"].as_str(), warning["running"].as_str(), warning["file"].as_str()),
        (Some("xdp_interface"), Some(r#"Some({"lo", "xf-a"})"#), Some(r#"Some({"lo", "xf-b"})"#)),
        "{warning}"
    );
    runtime.block_on(proxy.wait_message("SIGHUP: configuration reloaded", Duration::from_secs(10)))?;
    assert_eq!(xdp_program("lo")?, Some(on_lo));
    assert_eq!(xdp_program("xf-a")?, Some(on_veth));
    assert_eq!(xdp_program("xf-b")?, None, "a reload attached the filter to xf-b");

    proxy.signal(Signal::SIGTERM)?;
    let status = runtime.block_on(proxy.wait_exit(Duration::from_secs(20)))?;
    assert!(status.success(), "{status}: {:?}", proxy.events());
    assert_eq!(interfaces_logged(&proxy.events(), "XDP source filter detached"), ["lo", "xf-a"]);
    for interface in ["lo", "xf-a"] {
        assert_eq!(xdp_program(interface)?, None, "{interface} still has XDP after the proxy exited");
    }
    Ok(())
}

#[test]
fn an_interface_that_refuses_the_filter_fails_start_up_and_detaches_the_others() -> Result<()> {
    let _netns = NetNs::enter()?;
    veth_pair()?;
    // Another program holds xf-b (natively), so neither mode can attach there.
    let mut holder = SourceFilter::load(&lists(&["198.51.100.0/24"]))?;
    holder.attach("xf-b")?;
    let held = xdp_program("xf-b")?.context("the test's filter is not on xf-b")?;

    // Interfaces attach in name order: xf-a first, then xf-b fails.
    let config = two_interfaces("xf-a", "xf-b")?;
    let path = config.path().to_str().context("temp path")?;
    let out = Command::new(splice_proxy_tests::process::binary()?)
        .args(["--config", path, "--log-format", "json", "--admin-listen", "127.0.0.1:0"])
        .args(UPSTREAM)
        .output()?;
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{log}");
    let events: Vec<Value> = log.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    assert_eq!(interfaces_logged(&events, "XDP source filter attached"), ["xf-a"], "{log}");
    assert_eq!(interfaces_logged(&events, "XDP source filter detached"), ["xf-a"], "{log}");
    let failed = events.iter().find(|e| message(e) == "start-up failed").context("no start-up error")?;
    let error = failed["error"].as_str().unwrap_or_default();
    ensure!(error.contains("attaching the XDP source filter to xf-b failed"), "{error}");
    assert_eq!(xdp_program("xf-a")?, None, "a failed start left XDP on xf-a");
    assert_eq!(xdp_program("xf-b")?, Some(held), "the other program on xf-b was touched");
    Ok(())
}
