//! HAProxy: found on PATH or in /usr/sbin, started in the foreground with a
//! config the bench writes to a fresh temporary directory.

use std::{
    fs::File,
    net::SocketAddr,
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result};

use crate::{
    process::{Process, TempDir, find_program},
    topology::Topology,
};

/// Pipes HAProxy may hold for splicing (64 streams need 128).
const HAPROXY_PIPES: u64 = 1024;

/// Lines for HAProxy's global section, and for its defaults section.
pub type HaproxyTuning = (&'static [&'static str], &'static [&'static str]);

/// How HAProxy finds the upstream: given as an address (the cost floor of a
/// proxy that resolves nothing), or the way HAProxy users follow an address
/// that changes (EKS rotating its ENIs): `tcp-request content do-resolve`
/// on each connection through a `resolvers` section, whose `hold valid`
/// is how long an answer is reused, then `set-dst` to a server at 0.0.0.0.
#[derive(Clone, Copy, Debug)]
pub enum HaproxyUpstream {
    Address(SocketAddr),
    Resolved { name: &'static str, port: u16, dns: SocketAddr, hold_valid: Duration },
}

/// The HAProxy binary the bench starts, with its version.
pub struct Haproxy {
    binary: PathBuf,
    version: String,
}

impl Haproxy {
    pub fn find(name: &str) -> Result<Self> {
        let binary = find_program(name).with_context(|| {
            format!(
                "HAProxy (`{name}`) was not found on PATH nor in /usr/sbin: run `cargo xtask setup --bench` \
                 or `apt-get install haproxy`, pass --haproxy-bin PATH, or leave HAProxy out with --only"
            )
        })?;
        let out = Command::new(&binary)
            .arg("-v")
            .output()
            .with_context(|| format!("running {} -v", binary.display()))?;
        let text = String::from_utf8_lossy(&out.stdout);
        // "HAProxy version 2.6.12-1+deb12u4 2026/10/17 - https://haproxy.org/"
        let version = text.split_whitespace().nth(2).unwrap_or("unknown").to_owned();
        if !version.starts_with("2.6") {
            eprintln!("note: HAProxy {version}, not 2.6 as in the design's figures");
        }
        Ok(Self { binary, version })
    }

    pub fn version(&self) -> &str {
        &self.version
    }

    /// Starts HAProxy in the foreground (`-db`) with a config written to a
    /// fresh temporary directory, which also receives its standard error.
    pub fn start(
        &self,
        name: &str,
        tuning: HaproxyTuning,
        upstream: HaproxyUpstream,
        open_files: u64,
        topology: &Topology,
    ) -> Result<(Process, SocketAddr, TempDir)> {
        let addr = topology.proxy_addr()?;
        let dir = TempDir::create()?;
        let config = dir.path.join("haproxy.cfg");
        std::fs::write(&config, haproxy_config(name, tuning, addr, upstream, open_files))
            .with_context(|| format!("writing {}", config.display()))?;
        let log_path = dir.path.join("haproxy.log");
        let log = File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
        let child = topology
            .proxy_command(&self.binary)
            .arg("-f")
            .arg(&config)
            .arg("-db")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.binary.display()))?;
        let mut process = Process { name: name.to_owned(), child, log: Some(log_path) };
        process.wait_until_accepting(addr)?;
        Ok((process, addr, dir))
    }
}

/// Mode tcp, one frontend on `listen`, one backend to the upstream; nbthread
/// is left to its default (one thread per CPU) unless the tuning sets it.
/// maxconn: as many connections as `open_files` holds (two sockets each),
/// for the idle workload; with
/// `maxpipes 1024` (the default for issue 10's maxconn 4096: maxconn / 4),
/// HAProxy's file need is 2 × maxconn + 2 × 1024 + a few, within the limit.
fn haproxy_config(
    name: &str,
    (global_tuning, defaults_tuning): HaproxyTuning,
    listen: SocketAddr,
    upstream: HaproxyUpstream,
    open_files: u64,
) -> String {
    let maxconn = format!("maxconn {}", crate::limits::max_connections(open_files));
    let owned = |lines: &[&str]| lines.iter().map(|line| (*line).to_owned()).collect::<Vec<_>>();
    let mut global =
        vec![maxconn.clone(), format!("ulimit-n {open_files}"), format!("maxpipes {HAPROXY_PIPES}")];
    global.extend(owned(global_tuning));
    let mut defaults = vec!["mode tcp".to_owned(), maxconn];
    defaults.extend(owned(&["timeout connect 10s", "timeout client 5m", "timeout server 5m"]));
    defaults.extend(owned(defaults_tuning));
    let mut frontend = vec![format!("bind {listen}")];
    let mut sections = vec![("global", global), ("defaults", defaults)];
    let server = match upstream {
        HaproxyUpstream::Address(addr) => format!("server upstream {addr}"),
        HaproxyUpstream::Resolved { name, port, dns, hold_valid } => {
            sections.push((
                "resolvers bench",
                vec![
                    format!("nameserver bench {dns}"),
                    // HAProxy takes an answer held 0 ms as stale on arrival
                    // and asks again until `timeout resolve`: 1 ms is its
                    // lookup for every connection.
                    format!("hold valid {}ms", hold_valid.as_millis().max(1)),
                    "hold obsolete 0s".to_owned(),
                    // A `do-resolve` that arrives while a lookup of the same
                    // name is in flight waits for the resolvers' next run,
                    // `timeout resolve` away (1 s by default), so connections
                    // whose lookups collide would wait that long. 1 ms, the
                    // shortest: idle, HAProxy only wakes its resolvers task
                    // that often, it sends no query.
                    "timeout resolve 1ms".to_owned(),
                ],
            ));
            // Without an inspect delay the content rules are not waited
            // for, and the lookup (which yields) would not be either; the
            // accept then releases the connection as soon as it has its
            // address, rather than at the end of the delay.
            frontend.extend([
                "tcp-request inspect-delay 5s".to_owned(),
                format!("tcp-request content do-resolve(sess.upstream,bench,ipv4) str({name})"),
                "tcp-request content set-dst var(sess.upstream)".to_owned(),
                format!("tcp-request content set-dst-port int({port})"),
                "tcp-request content accept".to_owned(),
            ]);
            "server upstream 0.0.0.0:0".to_owned()
        }
    };
    frontend.push("default_backend upstream".to_owned());
    sections.extend([("frontend bench", frontend), ("backend upstream", vec![server])]);
    let mut text = format!("# {name}, written by splice-proxy's bench\n");
    for (section, lines) in sections {
        text += &format!("\n{section}\n");
        text.extend(lines.iter().map(|line| format!("    {line}\n")));
    }
    text
}
