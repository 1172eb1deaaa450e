//! Embeds the kernel object built by `cargo xtask build-ebpf`, so the
//! `splice-proxy` binary is the only file that ships.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=SPLICE_PROXY_EBPF_OBJECT");
    let object = std::env::var_os("SPLICE_PROXY_EBPF_OBJECT").map_or_else(
        || {
            let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
            manifest.join("../target/bpfel-unknown-none/release/proxy-ebpf")
        },
        PathBuf::from,
    );
    println!("cargo:rerun-if-changed={}", object.display());
    if !object.is_file() {
        panic!(
            "the kernel object {} is missing: run `cargo xtask build-ebpf` first \
             (or set SPLICE_PROXY_EBPF_OBJECT to a built proxy-ebpf object)",
            object.display()
        );
    }
    let object = object.canonicalize().expect("canonical path of the kernel object");
    println!("cargo:rustc-env=SPLICE_PROXY_EBPF_OBJECT={}", object.display());
}
