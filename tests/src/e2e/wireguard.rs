//! The WireGuard tunnel between `control` and `proxyacct`: Debian's
//! `wireguard-go` (userspace, one process per end, each in its namespace)
//! configured with `wg`. The processes are ended by their PIDs on drop.

use std::{
    io::Write as _,
    os::unix::fs::PermissionsExt as _,
    path::Path,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use nix::{sys::signal::Signal, unistd::Pid};

use super::topology::{ACCT_UNDERLAY, CONTROL_TUNNEL, CONTROL_UNDERLAY, ENDPOINT, Topology};
use crate::netns::ip;

const PORT: &str = "51820";

/// One wireguard-go process and the interface it made.
struct End {
    child: Child,
    netns: String,
    interface: String,
}

/// Both ends of the tunnel.
pub struct Tunnel {
    ends: Vec<End>,
}

impl Tunnel {
    /// Brings the tunnel up: control 10.99.0.1 ↔ proxyacct 10.99.0.2 over the
    /// veth underlay. `dir` holds the private keys.
    pub fn start(topology: &Topology, dir: &Path) -> Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        // Interface names are global in /var/run/wireguard/<name>.sock, so
        // they carry our PID; at most 15 characters.
        let names = [format!("spwc{}x{n}", std::process::id()), format!("spwa{}x{n}", std::process::id())];
        let mut tunnel = Self { ends: Vec::new() };
        for (netns, interface) in [(&topology.control, &names[0]), (&topology.acct, &names[1])] {
            let child = Command::new("ip")
                .args(["netns", "exec", netns, "wireguard-go", "-f", interface])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting wireguard-go (cargo xtask setup --e2e installs it)")?;
            tunnel.ends.push(End { child, netns: netns.clone(), interface: interface.clone() });
        }
        let keys: Vec<(String, String)> = (0..2).map(|_| keypair()).collect::<Result<_>>()?;
        let ends = [
            (CONTROL_TUNNEL, ACCT_UNDERLAY, ENDPOINT, &keys[0], &keys[1]),
            (ENDPOINT, CONTROL_UNDERLAY, CONTROL_TUNNEL, &keys[1], &keys[0]),
        ];
        for (end, (address, peer_underlay, peer_tunnel, own, peer)) in tunnel.ends.iter().zip(ends) {
            wait_for_interface(end)?;
            let key_file = dir.join(format!("{}.key", end.interface));
            std::fs::write(&key_file, &own.0)?;
            std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600))?;
            let status = Command::new("ip")
                .args(["netns", "exec", &end.netns, "wg", "set", &end.interface, "private-key"])
                .arg(&key_file)
                .args(["listen-port", PORT, "peer", &peer.1, "endpoint", &format!("{peer_underlay}:{PORT}")])
                .args(["allowed-ips", &format!("{peer_tunnel}/32")])
                .status()
                .context("running wg (wireguard-tools)")?;
            ensure!(status.success(), "wg set {} failed: {status}", end.interface);
            ip(&["-n", &end.netns, "addr", "add", &format!("{address}/24"), "dev", &end.interface])?;
            ip(&["-n", &end.netns, "link", "set", &end.interface, "up"])?;
        }
        Ok(tunnel)
    }

    /// `wg show` of both ends (for a failure report).
    #[must_use]
    pub fn show(&self) -> String {
        let mut out = String::new();
        for end in &self.ends {
            let shown =
                Command::new("ip").args(["netns", "exec", &end.netns, "wg", "show", &end.interface]).output();
            match shown {
                Ok(o) => out.push_str(&String::from_utf8_lossy(&o.stdout)),
                Err(e) => out.push_str(&format!("wg show {}: {e}\n", end.interface)),
            }
        }
        out
    }
}

fn wait_for_interface(end: &End) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let shown = Command::new("ip")
            .args(["-n", &end.netns, "link", "show", "dev", &end.interface])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?;
        if shown.success() && Path::new(&format!("/var/run/wireguard/{}.sock", end.interface)).exists() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("wireguard-go made no interface {} in {} within 10 s", end.interface, end.netns);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A private key and its public key (`wg genkey`, `wg pubkey`).
fn keypair() -> Result<(String, String)> {
    let private = Command::new("wg").arg("genkey").output().context("running wg genkey (wireguard-tools)")?;
    ensure!(private.status.success(), "wg genkey failed");
    let mut pubkey = Command::new("wg").arg("pubkey").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn()?;
    pubkey.stdin.take().context("stdin")?.write_all(&private.stdout)?;
    let public = pubkey.wait_with_output()?;
    ensure!(public.status.success(), "wg pubkey failed");
    let text = |b: &[u8]| String::from_utf8_lossy(b).trim().to_owned();
    Ok((text(&private.stdout), text(&public.stdout)))
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        for end in &mut self.ends {
            if matches!(end.child.try_wait(), Ok(None)) {
                let pid = Pid::from_raw(i32::try_from(end.child.id()).unwrap_or(i32::MAX));
                let _ = nix::sys::signal::kill(pid, Signal::SIGTERM);
                let deadline = Instant::now() + Duration::from_secs(3);
                while matches!(end.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = end.child.kill();
                let _ = end.child.wait();
            }
            let _ = std::fs::remove_file(format!("/var/run/wireguard/{}.sock", end.interface));
        }
    }
}
