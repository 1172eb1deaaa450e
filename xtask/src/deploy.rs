//! `cargo xtask check-deploy` (also part of `test`): the files under deploy/
//! checked by the tools that will read them, each failure naming the file and
//! the validator:
//! - systemd units: `systemd-analyze verify`, in a private mount namespace
//!   whose /usr/local/bin holds (links to) the built binary and the scripts
//!   next to the units (verify checks that each command exists); a warning
//!   fails too;
//! - Kubernetes manifests: `kubernetes-validate --strict` against the
//!   Kubernetes 1.32 schemas, and kustomization.yaml lists each of them;
//! - CloudFormation templates: `cfn-lint` (warnings fail too);
//! - every embedded configuration (ConfigMap, user data): `splice-proxy
//!   check-config` with the built binary.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::prereq::{self, DeployTools};

/// Schemas kubernetes-validate checks the manifests against (kubectl 1.32).
const KUBERNETES_VERSION: &str = "1.32.0";

pub fn check(root: &Path, binary: &Path) -> Result<()> {
    if !binary.is_file() {
        bail!("{} is missing: build it first (cargo build --bin splice-proxy)", binary.display());
    }
    let tools = prereq::ensure_deploy(&root.join("target/deploy-venv"))?;
    let deploy = root.join("deploy");
    let scratch = root.join("target/deploy-check");
    if scratch.exists() {
        std::fs::remove_dir_all(&scratch).with_context(|| format!("removing {}", scratch.display()))?;
    }
    check_systemd(&deploy.join("systemd"), binary, &scratch.join("bin"))?;
    check_kubernetes(&deploy.join("kubernetes"), &tools)?;
    check_cloudformation(&deploy.join("cloudformation"), &tools)?;
    check_configs(root, binary, &tools, &scratch.join("configs"))?;
    eprintln!("check-deploy: every file under {} passed", deploy.display());
    Ok(())
}

fn check_systemd(dir: &Path, binary: &Path, bin: &Path) -> Result<()> {
    if !prereq::is_root() {
        bail!(
            "checking the systemd units needs root: systemd-analyze verify runs in a private mount \
             namespace (unshare --mount) with the binary at /usr/local/bin"
        );
    }
    std::fs::create_dir_all(bin)?;
    let binary = std::path::absolute(binary)?;
    std::os::unix::fs::symlink(&binary, bin.join("splice-proxy"))?;
    let mut units = Vec::new();
    for path in files(dir, "")? {
        if path.extension().is_some_and(|ext| ext == "service") {
            units.push(path);
        } else if path.metadata()?.permissions().mode() & 0o111 != 0 {
            std::os::unix::fs::symlink(&path, bin.join(path.file_name().unwrap_or_default()))?;
        }
    }
    if units.is_empty() {
        bail!("no systemd unit in {}", dir.display());
    }
    for unit in units {
        let mut verify = Command::new("unshare");
        verify
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(r#"mount --bind "$1" /usr/local/bin && exec systemd-analyze verify "$2""#)
            .arg("sh")
            .arg(bin)
            .arg(&unit);
        // verify exits 0 on unknown keys and bad values: any output is a failure.
        validate(&mut verify, &unit, "systemd-analyze verify", true)?;
    }
    Ok(())
}

fn check_kubernetes(dir: &Path, tools: &DeployTools) -> Result<()> {
    let kustomization = dir.join("kustomization.yaml");
    let listed = std::fs::read_to_string(&kustomization)
        .with_context(|| format!("reading {}", kustomization.display()))?;
    let manifests: Vec<PathBuf> = files(dir, "yaml")?.into_iter().filter(|p| *p != kustomization).collect();
    for manifest in &manifests {
        let name = manifest.file_name().unwrap_or_default().to_string_lossy();
        if !listed.lines().any(|line| line.trim() == format!("- {name}")) {
            bail!("{}: `resources` does not list {name}", kustomization.display());
        }
    }
    let mut validate_cmd = Command::new(&tools.kubernetes_validate);
    validate_cmd.args(["--kubernetes-version", KUBERNETES_VERSION, "--strict", "--quiet"]).args(&manifests);
    validate(&mut validate_cmd, dir, &format!("kubernetes-validate (Kubernetes {KUBERNETES_VERSION})"), false)
}

fn check_cloudformation(dir: &Path, tools: &DeployTools) -> Result<()> {
    for template in files(dir, "yaml")? {
        validate(Command::new(&tools.cfn_lint).arg(&template), &template, "cfn-lint", false)?;
    }
    Ok(())
}

fn check_configs(root: &Path, binary: &Path, tools: &DeployTools, out: &Path) -> Result<()> {
    let script = root.join("xtask/src/deploy_configs.py");
    let listing = output(Command::new(&tools.python).arg(&script).arg(root.join("deploy")).arg(out))?;
    for line in listing.lines() {
        let (file, source) = line.split_once('\t').with_context(|| format!("{script:?} printed {line:?}"))?;
        let mut check = Command::new(binary);
        check.args(["check-config", "--config", file]);
        validate(&mut check, Path::new(source), "splice-proxy check-config", false)?;
    }
    Ok(())
}

/// Runs a validator on `what`; fails with its output when it fails (or, with
/// `quiet_means_ok`, when it prints anything).
fn validate(cmd: &mut Command, what: &Path, validator: &str, quiet_means_ok: bool) -> Result<()> {
    let out = cmd.output().with_context(|| format!("could not run {validator} ({cmd:?})"))?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if !out.status.success() || (quiet_means_ok && !text.trim().is_empty()) {
        bail!("{}: {validator} failed ({}):\n{}", what.display(), out.status, text.trim_end());
    }
    eprintln!("check-deploy: {}: {validator} passed", what.display());
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("could not run {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed ({}):\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The files directly in `dir` whose name ends in `.ext` (any with ""), sorted.
fn files(dir: &Path, ext: &str) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_file() && (ext.is_empty() || path.extension().is_some_and(|e| e == ext)) {
            found.push(path);
        }
    }
    found.sort();
    Ok(found)
}
