//! The capabilities the deployment files grant, read from the files, and a
//! `setpriv` prefix that runs a command as an unprivileged user holding
//! exactly a given set (as the systemd unit and the DaemonSet run the proxy).

use std::{collections::BTreeSet, path::Path};

use anyhow::{Context as _, Result};

pub const UNIT: &str = "deploy/systemd/splice-proxy.service";
pub const DAEMONSET: &str = "deploy/kubernetes/daemonset.yaml";
/// An unprivileged user (Debian's `nobody`), as the unit's dynamic user is.
pub const UNPRIVILEGED: &str = "65534";

pub fn repo_file(path: &str) -> Result<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    std::fs::read_to_string(root.join(path)).with_context(|| format!("reading {path}"))
}

/// The capabilities a unit setting lists, without the `CAP_` prefix.
pub fn unit_capabilities(unit: &str, key: &str) -> Result<BTreeSet<String>> {
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .with_context(|| format!("{UNIT} has no {key}="))?;
    line.split_whitespace()
        .map(|cap| cap.strip_prefix("CAP_").map(str::to_owned).with_context(|| format!("{key}: {cap}")))
        .collect()
}

/// The DaemonSet's `add: [...]` capabilities.
pub fn daemonset_capabilities(manifest: &str) -> Result<BTreeSet<String>> {
    let list = manifest
        .lines()
        .find_map(|l| l.trim().strip_prefix("add: ["))
        .with_context(|| format!("{DAEMONSET} adds no capabilities"))?;
    Ok(list.trim_end_matches(']').split(',').map(|c| c.trim().trim_matches('"').to_owned()).collect())
}

/// `setpriv` giving the unprivileged user exactly `caps` (names without `CAP_`).
pub fn as_unprivileged_with(caps: &BTreeSet<String>) -> Vec<String> {
    let set: String = caps.iter().map(|c| format!(",+{}", c.to_lowercase())).collect();
    let set = format!("-all{set}");
    vec![
        "setpriv".into(),
        format!("--reuid={UNPRIVILEGED}"),
        format!("--regid={UNPRIVILEGED}"),
        "--clear-groups".into(),
        "--no-new-privs".into(),
        format!("--inh-caps={set}"),
        format!("--ambient-caps={set}"),
        format!("--bounding-set={set}"),
        "--".into(),
    ]
}
