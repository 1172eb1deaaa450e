//! Project tasks: `cargo xtask setup | build-ebpf | test | e2e | check-deploy |
//! package | demo | bench | fuzz`.
//!
//! Every task that needs the kernel toolchain first makes sure it is present
//! (see [`prereq`]), so a fresh Debian 12 host needs no other set-up step.

mod deploy;
mod package;
mod prereq;

use prereq::run;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "splice-proxy project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the build needs when it is missing (Debian packages
    /// llvm-22-dev and libpolly-22-dev, bpf-linker for LLVM 22, the nightly
    /// rust-src). Idempotent; does nothing when all is present.
    Setup {
        /// Also install what `bench` needs: the Debian packages haproxy, nginx,
        /// libnginx-mod-stream, socat and ethtool (no service is started).
        #[arg(long)]
        bench: bool,
        /// Also install what `e2e` needs: wireguard-go and wireguard-tools
        /// (kubectl 1.32 must already be at /usr/bin/kubectl).
        #[arg(long)]
        e2e: bool,
    },
    /// Build the kernel object (nightly, -Z build-std=core, bpf-linker) that
    /// splice-proxy embeds. Runs `setup` first.
    BuildEbpf,
    /// Run every check and test: setup, build-ebpf, cargo fmt --check,
    /// clippy -D warnings, check-deploy, the whole test suite, then the
    /// end-to-end suite (short version).
    Test {
        /// Extra arguments passed to `cargo test` (for example a test name filter).
        #[arg(trailing_var_arg = true)]
        cargo_test_args: Vec<String>,
    },
    /// Run the end-to-end suite (tests/tests/e2e.rs, as root): kubectl
    /// through WireGuard, a PROXY v2 forwarder and two proxies with the
    /// deployed configuration, to fake API servers on rotating ENIs; the
    /// scenarios basic, eni_rotation, scale_in, faults, load, bad_input.
    /// Installs wireguard-go and wireguard-tools when missing.
    E2e {
        /// The longer soak: the load scenario runs 300 s instead of 20 s.
        #[arg(long)]
        long: bool,
        /// The data plane the proxies run (the deployed configuration's
        /// otherwise: auto, packet); `cargo xtask test` runs the suite on the
        /// default and on `splice`.
        #[arg(long, value_name = "PLANE")]
        dataplane: Option<String>,
        /// Scenario names to run (test name filters); all when none.
        scenarios: Vec<String>,
    },
    /// Check the deployment files under deploy/: systemd-analyze verify
    /// (as root), kubernetes-validate, cfn-lint, and splice-proxy
    /// check-config on every embedded configuration. Installs the validators
    /// when missing (Debian packages; PyPI into target/deploy-venv).
    CheckDeploy,
    /// Build the release tarball an EC2 instance installs (binary, systemd
    /// units, drain watcher) into target/package/, and print its SHA-256.
    Package,
    /// Run the local demo: DNS server, two TLS "API servers" on 127.0.0.2 and
    /// 127.0.0.3, the proxy, and a client, while the DNS answer rotates.
    Demo,
    /// Run the benchmark (bench/README.md): throughput, CPU, latency,
    /// connection rate and idle memory of splice-proxy in each data plane,
    /// HAProxy in four configurations, nginx stream and socat, over loopback
    /// and routed through network namespaces. Installs haproxy, nginx,
    /// libnginx-mod-stream, socat and ethtool when missing (no service
    /// started), builds the kernel object and the release binaries first.
    /// Needs root (BPF, network namespaces).
    Bench {
        /// Arguments passed to the bench, after `--` (see `cargo xtask bench -- --help`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        bench_args: Vec<String>,
    },
    /// Run each fuzz target of fuzz/ (cargo-fuzz, nightly) for a bounded
    /// time: the PROXY header and ClientHello parsers. Installs cargo-fuzz
    /// when missing. A crash stops the run; its input is saved under
    /// fuzz/artifacts/<target>/ (turn it into a unit test).
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u32,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    match cli.task {
        Task::Setup { bench, e2e } => {
            prereq::ensure()?;
            if bench {
                prereq::ensure_bench()?;
            }
            if e2e { prereq::ensure_e2e() } else { Ok(()) }
        }
        Task::BuildEbpf => build_ebpf(&root),
        Task::Test { cargo_test_args } => test(&root, &cargo_test_args),
        Task::E2e { long, dataplane, scenarios } => {
            // splice-proxy's build embeds the kernel object (`test` has just built it).
            if !ebpf_object(&root).is_file() {
                build_ebpf(&root)?;
            }
            run(cargo(&root).args(["build", "--bin", "splice-proxy"]))?;
            e2e(&root, long, &scenarios, dataplane.as_deref())
        }
        Task::CheckDeploy => check_deploy(&root),
        Task::Package => {
            build_ebpf(&root)?;
            run(cargo(&root).args(["build", "--release", "--bin", "splice-proxy"]))?;
            package::package(&root).map(drop)
        }
        Task::Demo => demo(&root),
        Task::Bench { bench_args } => bench(&root, &bench_args),
        Task::Fuzz { seconds } => fuzz(&root, seconds),
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

/// Where `cargo xtask build-ebpf` leaves the kernel object (and where
/// splice-proxy's build script builds it too).
fn ebpf_object(root: &Path) -> PathBuf {
    kernel_build::object_path(root)
}

fn build_ebpf(root: &Path) -> Result<()> {
    prereq::ensure()?;
    run(&mut kernel_build::cargo(root, "build"))?;
    let object = ebpf_object(root);
    if !object.is_file() {
        bail!("the kernel build finished but {} is missing", object.display());
    }
    eprintln!("kernel object: {}", object.display());
    Ok(())
}

/// rustfmt and clippy on the kernel crate, which the workspace excludes
/// (it builds for the BPF target with nightly).
fn lint_ebpf(root: &Path) -> Result<()> {
    let mut fmt = Command::new("rustup");
    fmt.args(["run", "nightly", "cargo", "fmt", "--", "--check"])
        .current_dir(root.join(kernel_build::CRATE_DIR));
    kernel_build::clear_outer_cargo_env(&mut fmt);
    run(&mut fmt)?;
    run(kernel_build::cargo(root, "clippy").args(["--", "-D", "warnings"]))
}

fn test(root: &Path, cargo_test_args: &[String]) -> Result<()> {
    build_ebpf(root)?;
    lint_ebpf(root)?;
    prereq::ensure_e2e()?;
    run(cargo(root).args(["fmt", "--all", "--", "--check"]))?;
    run(cargo(root).args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--features",
        E2E_FEATURE,
        "--",
        "-D",
        "warnings",
    ]))?;
    // The integration tests start the real binary, so build it first.
    run(cargo(root).args(["build", "--workspace", "--bins"]))?;
    deploy::check(root, &root.join("target/debug/splice-proxy"))?;
    run(cargo(root).args(["test", "--workspace", "--no-fail-fast"]).args(cargo_test_args))?;
    // Last, once everything it builds on has passed: the short version, on
    // the deployed plane (auto: packet) and on splice (auto's fallback, and
    // the plane of every connection packet does not join).
    e2e(root, false, &[], None)?;
    e2e(root, false, &[], Some("splice"))
}

/// The tests crate's feature that enables the end-to-end test target
/// (left out of `cargo test --workspace` so that it runs last, on its own).
const E2E_FEATURE: &str = "splice-proxy-tests/e2e";

/// Runs the end-to-end suite against the built debug `splice-proxy`.
/// `dataplane`: the plane the proxies run instead of the deployed one.
fn e2e(root: &Path, long: bool, scenarios: &[String], dataplane: Option<&str>) -> Result<()> {
    prereq::ensure_e2e()?;
    let mut cmd = cargo(root);
    cmd.args(["test", "-p", "splice-proxy-tests", "--features", E2E_FEATURE, "--test", "e2e", "--"]);
    cmd.args(scenarios).env("SPLICE_PROXY_E2E_LONG", if long { "1" } else { "0" });
    if let Some(plane) = dataplane {
        eprintln!("end-to-end suite on the {plane} data plane");
        cmd.env("SPLICE_PROXY_E2E_DATAPLANE", plane);
    }
    run(&mut cmd)
}

fn check_deploy(root: &Path) -> Result<()> {
    // splice-proxy's build embeds the kernel object.
    if !ebpf_object(root).is_file() {
        build_ebpf(root)?;
    }
    run(cargo(root).args(["build", "--bin", "splice-proxy"]))?;
    deploy::check(root, &root.join("target/debug/splice-proxy"))
}

fn demo(root: &Path) -> Result<()> {
    build_ebpf(root)?;
    run(cargo(root).args(["build", "--workspace", "--bins", "--release"]))?;
    run(Command::new(root.join("target/release/demo"))
        .arg("--proxy-bin")
        .arg(root.join("target/release/splice-proxy")))
}

fn bench(root: &Path, bench_args: &[String]) -> Result<()> {
    prereq::ensure_bench()?;
    build_ebpf(root)?;
    run(cargo(root).args(["build", "--release", "--workspace", "--bins"]))?;
    // Given first, so that a --proxy-bin among `bench_args` wins.
    run(Command::new(root.join("target/release/bench"))
        .arg("--proxy-bin")
        .arg(root.join("target/release/splice-proxy"))
        .args(bench_args))
}

/// The fuzz targets (`fuzz/fuzz_targets/*.rs`) with the longest input each
/// gets: past its parser's size bound (1,024 and 20,480 bytes).
const FUZZ_TARGETS: [(&str, u32); 2] = [("proxy_header", 2048), ("client_hello", 24_576)];

fn fuzz(root: &Path, seconds: u32) -> Result<()> {
    prereq::ensure_fuzz()?;
    // The targets link splice-proxy, whose build embeds the kernel object.
    if !ebpf_object(root).is_file() {
        build_ebpf(root)?;
    }
    for (target, max_len) in FUZZ_TARGETS {
        // New inputs go to corpus/ (not kept in git); seeds/ is read only.
        let corpus = root.join("fuzz/corpus").join(target);
        std::fs::create_dir_all(&corpus)?;
        let mut cmd = Command::new("rustup");
        cmd.args(["run", "nightly", "cargo", "fuzz", "run", target])
            .arg(&corpus)
            .arg(root.join("fuzz/seeds").join(target))
            .args(["--", &format!("-max_total_time={seconds}"), &format!("-max_len={max_len}")])
            .current_dir(root);
        kernel_build::clear_outer_cargo_env(&mut cmd);
        run(&mut cmd)?;
    }
    Ok(())
}

fn cargo(root: &Path) -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root);
    cmd
}
