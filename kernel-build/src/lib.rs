//! Builds the kernel crate (`proxy-ebpf`) for `bpfel-unknown-none`: nightly
//! cargo with `-Z build-std=core`, linked by `bpf-linker`. One recipe for
//! `cargo xtask build-ebpf` and for splice-proxy's build script, which
//! builds the object itself so a plain `cargo build` or `cargo check` on a
//! fresh clone works once the toolchain is there (`cargo xtask setup`).
//!
//! Written here rather than with `aya-build`: that crate builds into each
//! build script's `OUT_DIR`, so the kernel crate would be built once per
//! profile and per `check`/`build`; here every build shares one target
//! directory, apart from the workspace's own, so the nested cargo never
//! needs a lock its parent cargo holds.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// The BPF target the kernel crate is built for.
pub const TARGET: &str = "bpfel-unknown-none";
/// The kernel crate's directory, under the workspace root.
pub const CRATE_DIR: &str = "proxy-ebpf";

/// Why the kernel object could not be built.
#[derive(Debug, thiserror::Error)]
pub enum KernelBuildError {
    #[error("cannot run `rustup run nightly cargo` in {dir}: {source}")]
    Spawn { dir: PathBuf, source: std::io::Error },
    #[error(
        "`cargo {subcommand}` of the kernel crate failed ({status}); it needs the nightly toolchain \
         with rust-src and bpf-linker (`cargo xtask setup` installs them):\n{stderr}"
    )]
    Failed { subcommand: String, status: std::process::ExitStatus, stderr: String },
    #[error("the kernel build finished but {0} is missing")]
    Missing(PathBuf),
}

/// Where the kernel crate's builds go (not the workspace's `target/debug`
/// or `target/release`, see the crate documentation).
#[must_use]
pub fn target_dir(root: &Path) -> PathBuf {
    root.join("target/kernel")
}

/// The built kernel object (an ELF file of BPF programs and maps).
#[must_use]
pub fn object_path(root: &Path) -> PathBuf {
    target_dir(root).join(TARGET).join("release").join(CRATE_DIR)
}

/// What the object is built from: a change to any of them means a rebuild.
#[must_use]
pub fn sources(root: &Path) -> Vec<PathBuf> {
    [
        "proxy-ebpf/src",
        "proxy-ebpf/Cargo.toml",
        "proxy-ebpf/Cargo.lock",
        "proxy-common/src",
        "proxy-common/Cargo.toml",
    ]
    .iter()
    .map(|path| root.join(path))
    .collect()
}

/// `rustup run nightly cargo <subcommand> --release` for the BPF target in
/// the kernel crate, without the outer cargo's environment (its toolchain,
/// flags and target directory would otherwise leak into the nested build).
#[must_use]
pub fn cargo(root: &Path, subcommand: &str) -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo", subcommand, "--release"])
        .args(["--target", TARGET, "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(target_dir(root))
        .current_dir(root.join(CRATE_DIR));
    clear_outer_cargo_env(&mut cmd);
    cmd
}

/// Removes what an outer cargo (a build script's, or `cargo run`'s) set for
/// itself, so a nested nightly cargo picks its own toolchain, flags and
/// target directory.
pub fn clear_outer_cargo_env(cmd: &mut Command) {
    for var in [
        "RUSTUP_TOOLCHAIN",
        "CARGO",
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_MAKEFLAGS",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_MANIFEST_DIR",
        "CARGO_MANIFEST_PATH",
        "CARGO_PKG_NAME",
        "PROFILE",
        "TARGET",
        "HOST",
        "OUT_DIR",
        "OPT_LEVEL",
        "DEBUG",
        "NUM_JOBS",
    ] {
        cmd.env_remove(var);
    }
}

/// Builds the kernel object (incrementally: quick when nothing changed) and
/// returns its path. Output is captured and returned only on failure.
pub fn build(root: &Path) -> Result<PathBuf, KernelBuildError> {
    let output = cargo(root, "build")
        .output()
        .map_err(|source| KernelBuildError::Spawn { dir: root.join(CRATE_DIR), source })?;
    if !output.status.success() {
        return Err(KernelBuildError::Failed {
            subcommand: "build".into(),
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        });
    }
    let object = object_path(root);
    if object.is_file() { Ok(object) } else { Err(KernelBuildError::Missing(object)) }
}
