//! nginx stream (Debian's 1.22 with libnginx-mod-stream): started in the
//! foreground with a config, prefix and logs in a fresh temporary directory.

use std::{fs::File, net::SocketAddr, path::Path, process::Stdio};

use anyhow::{Context as _, Result};

use crate::{
    process::{Process, TempDir},
    topology::Topology,
};

/// Debian's dynamic stream module (package libnginx-mod-stream).
const STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";
/// `open_files`: the file limit nginx inherits; each worker may use it all
/// (accepts may all land on one worker; a proxied connection takes two).
pub fn start(
    binary: &Path,
    upstream: SocketAddr,
    open_files: u64,
    topology: &Topology,
) -> Result<(Process, SocketAddr, TempDir)> {
    let addr = topology.proxy_addr()?;
    let dir = TempDir::create()?;
    let config = dir.path.join("nginx.conf");
    let text = format!(
        "# nginx stream, written by splice-proxy's bench\n\
         load_module {STREAM_MODULE};\n\
         daemon off;\n\
         worker_processes auto;\n\
         worker_rlimit_nofile {open_files};\n\
         pid {pid};\n\
         error_log {log} warn;\n\
         events {{ worker_connections {connections}; }}\n\
         stream {{\n    server {{\n        listen {addr} backlog=4096;\n        proxy_pass {upstream};\n        \
         proxy_half_close on;\n        \
         proxy_connect_timeout 10s;\n        proxy_timeout 5m;\n    }}\n}}\n",
        connections = open_files.saturating_sub(512),
        pid = dir.path.join("nginx.pid").display(),
        log = dir.path.join("error.log").display(),
    );
    std::fs::write(&config, text).with_context(|| format!("writing {}", config.display()))?;
    let log_path = dir.path.join("stderr.log");
    let log = File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let child = topology
        .proxy_command(binary)
        .arg("-c")
        .arg(&config)
        .arg("-p")
        .arg(&dir.path)
        // Start-up errors to our directory, not /var/log/nginx.
        .arg("-e")
        .arg(dir.path.join("error.log"))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let mut process = Process { name: "nginx stream".into(), child, log: Some(dir.path.join("error.log")) };
    process.wait_until_accepting(addr)?;
    Ok((process, addr, dir))
}
