//! Runs the current thread in a fresh network namespace (with `lo` up) and
//! removes it again on drop, even when the test fails.

use std::{
    fs::File,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, Result, bail};
use nix::sched::{CloneFlags, setns};

/// Fails with a clear message unless we are root: privileged tests do not skip.
pub fn require_root(what: &str) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("{what} needs root (CAP_BPF, CAP_NET_ADMIN); run the tests as root, as CI does");
    }
    Ok(())
}

/// The calling thread is inside the namespace while this lives.
pub struct NetNs {
    name: String,
    original: File,
}

impl NetNs {
    pub fn enter() -> Result<Self> {
        require_root("a network namespace")?;
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!("splice-test-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        ip(&["netns", "add", &name])?;
        let ns = Self { name, original: File::open("/proc/thread-self/ns/net")? };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        let target = File::open(format!("/run/netns/{}", ns.name))?;
        setns(&target, CloneFlags::CLONE_NEWNET).context("setns into the test namespace")?;
        Ok(ns)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = setns(&self.original, CloneFlags::CLONE_NEWNET);
        let _ = ip(&["netns", "del", &self.name]);
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let status = Command::new("ip").args(args).status().context("running `ip` (install iproute2)")?;
    if !status.success() {
        bail!("`ip {}` failed: {status}", args.join(" "));
    }
    Ok(())
}
