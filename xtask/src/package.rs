//! `cargo xtask package`: the tarball an EC2 instance installs
//! (deploy/cloudformation/splice-proxy.yaml extracts it at `/`): the release
//! binary and, from deploy/systemd, the units and the drain watcher script.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result};

use crate::prereq::run;

/// Where each packaged file comes from (relative to the workspace root) and
/// where it goes (relative to `/`), with its mode.
const CONTENTS: [(&str, &str, u32); 4] = [
    ("target/release/splice-proxy", "usr/local/bin/splice-proxy", 0o755),
    ("deploy/systemd/splice-proxy-lifecycle", "usr/local/bin/splice-proxy-lifecycle", 0o755),
    ("deploy/systemd/splice-proxy.service", "etc/systemd/system/splice-proxy.service", 0o644),
    (
        "deploy/systemd/splice-proxy-lifecycle.service",
        "etc/systemd/system/splice-proxy-lifecycle.service",
        0o644,
    ),
];

/// Builds the tarball from an already built release binary; returns its path.
pub fn package(root: &Path) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let out = root.join("target/package");
    let stage = out.join("root");
    if stage.exists() {
        std::fs::remove_dir_all(&stage)?;
    }
    for (from, to, mode) in CONTENTS {
        let dest = stage.join(to);
        std::fs::create_dir_all(dest.parent().unwrap_or(&stage))?;
        std::fs::copy(root.join(from), &dest).with_context(|| format!("copying {from}"))?;
        std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(mode))?;
    }
    let name = format!("splice-proxy-{}-{}-linux.tar.gz", env!("CARGO_PKG_VERSION"), std::env::consts::ARCH);
    let tarball = out.join(&name);
    // Only the files, not their directories: extracting at / leaves the
    // modes of /usr/local/bin and /etc/systemd/system alone.
    run(Command::new("tar")
        .args(["--create", "--gzip", "--owner=0", "--group=0", "--numeric-owner", "--file"])
        .arg(&tarball)
        .arg("--directory")
        .arg(&stage)
        .args(CONTENTS.map(|(_, to, _)| to)))?;
    run(Command::new("sha256sum").arg(&tarball))?;
    eprintln!(
        "package: {} (upload it to S3; the stack's PackageS3Key and PackageSha256 name it)",
        tarball.display()
    );
    Ok(tarball)
}
