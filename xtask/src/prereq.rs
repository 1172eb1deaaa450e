//! The kernel toolchain: checked every time, installed only when missing.
//!
//! What is needed (re-checked on Debian 12, kernel 6.18):
//! - the nightly toolchain with `rust-src` (for `-Z build-std=core`);
//! - Debian's `llvm-22-dev` and `libpolly-22-dev`, which `bpf-linker` links to;
//! - `bpf-linker` 0.13 built with `--features llvm-22`;
//! - `iproute2` (`ip netns`) for the tests that run in their own network namespace;
//! - for the end-to-end suite (`cargo xtask e2e`, and the end of `test`):
//!   `wireguard-go` and `wireguard-tools` (`wg`) from Debian, and kubectl
//!   1.32 at `/usr/bin/kubectl`, which we never install (Debian's
//!   `kubernetes-client` is another version): its absence is an error;
//! - for `cargo xtask bench` only: `haproxy` (2.6 on Debian 12), `nginx` with
//!   `libnginx-mod-stream` (1.22) and `socat`, the proxies it compares against,
//!   installed with service start-up blocked (see [`ensure_bench`]), and
//!   `ethtool` (GRO on in the routed topology's veths);
//! - for `cargo xtask check-deploy` (part of `test`): `systemd-analyze` (Debian's
//!   `systemd`), `unshare` (`util-linux`), `mount`, `curl` (the drain
//!   watcher's test runs the script, which uses it), and `cfn-lint` and
//!   `kubernetes-validate` at pinned versions in a virtual environment under
//!   `target/` (Debian 12's Python refuses system-wide pip, PEP 668), made by
//!   Debian's `/usr/bin/python3` with `python3-venv`.
//!
//! On a host where we cannot install (not Debian, not root) we stop and print
//! the exact commands to run instead.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

const DEBIAN_PACKAGES: &[&str] = &["llvm-22-dev", "libpolly-22-dev", "iproute2"];
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPF_LINKER_VERSION: &str = "0.13";

/// Makes sure every prerequisite is present, installing what is missing.
pub fn ensure() -> Result<()> {
    ensure_nightly()?;
    ensure_debian_packages(DEBIAN_PACKAGES, "LLVM 22 development files with Polly, and iproute2")?;
    ensure_bpf_linker()?;
    Ok(())
}

/// The proxies the benchmark compares against (it starts them itself), and
/// ethtool, which turns GRO on in its routed topology's veths.
const BENCH_PACKAGES: &[&str] = &["haproxy", "nginx", "libnginx-mod-stream", "socat", "ethtool"];
/// Debian's hook that `invoke-rc.d` asks before starting a service; exit 101 = "not allowed".
const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";
const POLICY_RC_D_TEXT: &str =
    "#!/bin/sh\n# placed by cargo xtask setup --bench while apt-get runs\nexit 101\n";

/// Makes sure HAProxy, nginx with its stream module, socat and ethtool are installed.
/// Installing haproxy or nginx would start their system daemons (nginx on
/// port 80): while apt runs, a `policy-rc.d` that refuses every start is put
/// in place (unless one exists already) and removed afterwards. Afterwards
/// no `haproxy` or `nginx` process may be running that was not before.
pub fn ensure_bench() -> Result<()> {
    let missing: Vec<&str> =
        BENCH_PACKAGES.iter().copied().filter(|pkg| !debian_package_installed(pkg)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let daemons_before = daemon_pids();
    // Ours only if none was there: an existing hook (Docker images ship one) stays.
    let created = !Path::new(POLICY_RC_D).exists()
        && is_root()
        && std::fs::write(POLICY_RC_D, POLICY_RC_D_TEXT).is_ok()
        && set_executable(POLICY_RC_D);
    let result = ensure_debian_packages(
        &missing,
        "HAProxy 2.6, nginx 1.22 with its stream module, socat, ethtool; or leave peers out with the bench's --only",
    );
    if created && std::fs::read_to_string(POLICY_RC_D).is_ok_and(|text| text == POLICY_RC_D_TEXT) {
        std::fs::remove_file(POLICY_RC_D).with_context(|| format!("removing {POLICY_RC_D}"))?;
    }
    result?;
    let started: Vec<u32> = daemon_pids().into_iter().filter(|pid| !daemons_before.contains(pid)).collect();
    if !started.is_empty() {
        bail!(
            "installing {} started system daemons (PIDs {started:?}): stop them with the service manager \
             (e.g. `systemctl disable --now nginx haproxy`) before benchmarking",
            missing.join(" ")
        );
    }
    Ok(())
}

fn set_executable(path: &str) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).is_ok()
}

/// PIDs of running processes named haproxy or nginx (from /proc/PID/comm).
fn daemon_pids() -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| matches!(comm.trim(), "haproxy" | "nginx"))
        })
        .collect()
}

/// kubectl as these machines have it (1.32); the end-to-end suite runs it.
pub const KUBECTL: &str = "/usr/bin/kubectl";

/// Makes sure the end-to-end suite can run: wireguard-go and wg (installed
/// when missing) and kubectl (never installed here: Debian's
/// `kubernetes-client` would replace the 1.32 client with another version).
pub fn ensure_e2e() -> Result<()> {
    ensure_debian_packages(
        &["wireguard-go", "wireguard-tools"],
        "wireguard-go (userspace WireGuard) and wg (wireguard-tools)",
    )?;
    if !Path::new(KUBECTL).is_file() {
        bail!(
            "{KUBECTL} is missing: the end-to-end suite needs kubectl 1.32 there (the upstream \
             release binary, https://dl.k8s.io/release/v1.32.4/bin/linux/amd64/kubectl); \
             do not install Debian's kubernetes-client instead"
        );
    }
    Ok(())
}

/// cargo-fuzz version `cargo xtask fuzz` installs when it is missing.
const CARGO_FUZZ_VERSION: &str = "0.13";

/// Makes sure the fuzz targets can run: the nightly toolchain and cargo-fuzz
/// (installed from crates.io when missing).
pub fn ensure_fuzz() -> Result<()> {
    ensure_nightly()?;
    if !succeeds(Command::new("cargo").args(["fuzz", "--version"])) {
        eprintln!("setup: installing cargo-fuzz {CARGO_FUZZ_VERSION}");
        run(Command::new("cargo")
            .args(["+stable", "install", "cargo-fuzz", "--locked"])
            .args(["--version", &format!("~{CARGO_FUZZ_VERSION}")]))
        .context("installing cargo-fuzz failed")?;
    }
    Ok(())
}

/// Pinned validators of the deployment files (PyPI). kubernetes-validate
/// carries the Kubernetes JSON schemas; 1.32.0 has those of Kubernetes 1.32.
const CFN_LINT_VERSION: &str = "1.58.0";
const KUBERNETES_VALIDATE_VERSION: &str = "1.32.0";
/// Debian's interpreter, even when another python3 (pyenv) comes first on PATH.
const SYSTEM_PYTHON: &str = "/usr/bin/python3";

/// The validators' virtual environment.
pub struct DeployTools {
    pub python: PathBuf,
    pub cfn_lint: PathBuf,
    pub kubernetes_validate: PathBuf,
}

/// Makes sure `systemd-analyze`, `unshare` and, in the virtual environment
/// `venv`, the pinned cfn-lint and kubernetes-validate are present. The
/// environment is (re)made only when its record of the pins differs.
pub fn ensure_deploy(venv: &Path) -> Result<DeployTools> {
    ensure_debian_packages(
        &["systemd", "util-linux", "mount", "curl", "python3-venv"],
        "systemd-analyze (systemd), unshare (util-linux), mount, curl (the lifecycle script's test), \
         and Python 3 with its venv module",
    )?;
    let pins = format!("cfn-lint=={CFN_LINT_VERSION}\nkubernetes-validate=={KUBERNETES_VALIDATE_VERSION}\n");
    let record = venv.join("splice-proxy-pins.txt");
    if std::fs::read_to_string(&record).ok().as_deref() != Some(pins.as_str()) {
        eprintln!(
            "setup: installing cfn-lint {CFN_LINT_VERSION} and kubernetes-validate \
             {KUBERNETES_VALIDATE_VERSION} into {} (about a minute)",
            venv.display()
        );
        if venv.exists() {
            std::fs::remove_dir_all(venv).with_context(|| format!("removing {}", venv.display()))?;
        }
        run(Command::new(SYSTEM_PYTHON).args(["-m", "venv"]).arg(venv)).with_context(|| {
            format!("could not make a virtual environment; run: {SYSTEM_PYTHON} -m venv {}", venv.display())
        })?;
        run(Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .args(pins.lines()))
        .context("could not install the deploy validators from PyPI")?;
        std::fs::write(&record, &pins).with_context(|| format!("writing {}", record.display()))?;
    }
    let bin = venv.join("bin");
    Ok(DeployTools {
        python: bin.join("python3"),
        cfn_lint: bin.join("cfn-lint"),
        kubernetes_validate: bin.join("kubernetes-validate"),
    })
}

fn ensure_nightly() -> Result<()> {
    if !succeeds(Command::new("rustup").args(["run", "nightly", "rustc", "--version"])) {
        bail!(
            "the nightly Rust toolchain is missing; install it with:\n  \
             rustup toolchain install nightly --profile minimal --component rust-src"
        );
    }
    let installed = output(Command::new("rustup").args(["+nightly", "component", "list", "--installed"]))?;
    // rust-src for `-Z build-std=core`; clippy and rustfmt to lint the kernel crate.
    for component in ["rust-src", "clippy", "rustfmt"] {
        if !installed.lines().any(|line| line.starts_with(component)) {
            eprintln!("setup: adding the nightly {component} component");
            run(Command::new("rustup").args(["+nightly", "component", "add", component]))
                .with_context(|| format!("`rustup +nightly component add {component}` failed"))?;
        }
    }
    Ok(())
}

/// `elsewhere` says what to install on other distributions.
fn ensure_debian_packages(packages: &[&str], elsewhere: &str) -> Result<()> {
    let missing: Vec<&str> = packages.iter().copied().filter(|pkg| !debian_package_installed(pkg)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let install = format!("apt-get update && apt-get install -y {}", missing.join(" "));
    if !Path::new("/etc/debian_version").exists() || !is_root() {
        bail!(
            "missing packages: {}\nthis host is not Debian or we are not root, so install them yourself:\n  \
             {install}\n(on other distributions: {elsewhere})",
            missing.join(", ")
        );
    }
    eprintln!("setup: installing {}", missing.join(" "));
    run(Command::new("apt-get").arg("update").arg("-q"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
    .with_context(|| format!("could not install Debian packages; run: {install}"))
}

fn debian_package_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("install ok installed"))
}

fn ensure_bpf_linker() -> Result<()> {
    if let Some(version) = bpf_linker_version()
        && version.contains(&format!("bpf-linker {BPF_LINKER_VERSION}"))
    {
        return Ok(());
    }
    eprintln!("setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about a minute)");
    run(Command::new("cargo")
        .args(["+stable", "install", "bpf-linker", "--force"])
        .args(["--version", &format!("~{BPF_LINKER_VERSION}")])
        .args(["--no-default-features", "--features", "llvm-22"])
        .env("LLVM_PREFIX", LLVM_PREFIX)
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO_TARGET_DIR"))
    .with_context(|| {
        format!(
            "could not build bpf-linker; run:\n  LLVM_PREFIX={LLVM_PREFIX} cargo install bpf-linker \
             --version ~{BPF_LINKER_VERSION} --no-default-features --features llvm-22"
        )
    })?;
    if bpf_linker_version().is_none() {
        bail!("bpf-linker was installed but is not on PATH; add {} to PATH", cargo_bin_dir().display());
    }
    Ok(())
}

fn bpf_linker_version() -> Option<String> {
    output(Command::new("bpf-linker").arg("--version")).ok()
}

fn cargo_bin_dir() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")))
        .unwrap_or_default()
        .join("bin")
}

pub fn is_root() -> bool {
    output(Command::new("id").arg("-u")).is_ok_and(|uid| uid.trim() == "0")
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|status| status.success())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.stderr(Stdio::null()).output().with_context(|| format!("could not run {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("could not start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}
