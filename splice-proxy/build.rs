//! Builds the kernel programs (`proxy-ebpf`, through `kernel-build`) and
//! embeds the object, so the `splice-proxy` binary is the only file that
//! ships. `SPLICE_PROXY_EBPF_OBJECT` names an object built elsewhere instead.

use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=SPLICE_PROXY_EBPF_OBJECT");
    let object = match std::env::var_os("SPLICE_PROXY_EBPF_OBJECT") {
        Some(object) => PathBuf::from(object),
        None => {
            let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
            let root = manifest.parent().unwrap_or(Path::new(".."));
            for source in kernel_build::sources(root) {
                println!("cargo:rerun-if-changed={}", source.display());
            }
            match kernel_build::build(root) {
                Ok(object) => object,
                Err(error) => panic!("building the kernel programs: {error}"),
            }
        }
    };
    println!("cargo:rerun-if-changed={}", object.display());
    assert!(
        object.is_file(),
        "the kernel object {} is missing (SPLICE_PROXY_EBPF_OBJECT must name a built proxy-ebpf object)",
        object.display()
    );
    let object = object.canonicalize().expect("canonical path of the kernel object");
    println!("cargo:rustc-env=SPLICE_PROXY_EBPF_OBJECT={}", object.display());
}
