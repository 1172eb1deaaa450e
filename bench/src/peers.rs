//! What the bench sends to: the sink (reached directly or through a proxy),
//! splice-proxy in each data plane, and HAProxy in three configurations. The
//! proxies are child processes on loopback, each killed by its PID on drop.

use std::{
    fs::File,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

/// Buffer size of the sink's reads.
const SINK_BUFFER: usize = 256 * 1024;
/// How long a started proxy may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum PeerKind {
    Direct,
    SpliceProxySockmap,
    SpliceProxySplice,
    SpliceProxyCopy,
    HaproxySpliceAuto,
    HaproxySpliceBothPipe1M,
    HaproxyNoSpliceBuf256K,
}

impl PeerKind {
    /// In the order they are measured within a round and listed in the tables.
    pub const ALL: [Self; 7] = [
        Self::Direct,
        Self::SpliceProxySockmap,
        Self::SpliceProxySplice,
        Self::SpliceProxyCopy,
        Self::HaproxySpliceAuto,
        Self::HaproxySpliceBothPipe1M,
        Self::HaproxyNoSpliceBuf256K,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::SpliceProxySockmap => "splice-proxy sockmap",
            Self::SpliceProxySplice => "splice-proxy splice",
            Self::SpliceProxyCopy => "splice-proxy copy",
            Self::HaproxySpliceAuto => "HAProxy splice-auto",
            Self::HaproxySpliceBothPipe1M => "HAProxy splice-request+response, pipesize 1 MiB",
            Self::HaproxyNoSpliceBuf256K => "HAProxy no splice, bufsize 256 KiB",
        }
    }

    pub fn is_haproxy(&self) -> bool {
        self.haproxy_tuning().is_some()
    }

    fn dataplane(self) -> Option<&'static str> {
        match self {
            Self::SpliceProxySockmap => Some("sockmap"),
            Self::SpliceProxySplice => Some("splice"),
            Self::SpliceProxyCopy => Some("copy"),
            _ => None,
        }
    }

    /// If this is HAProxy: its lines for the global section, and for the defaults.
    fn haproxy_tuning(self) -> Option<HaproxyTuning> {
        match self {
            Self::HaproxySpliceAuto => Some((&[], &["option splice-auto"])),
            Self::HaproxySpliceBothPipe1M => {
                Some((&["tune.pipesize 1048576"], &["option splice-request", "option splice-response"]))
            }
            Self::HaproxyNoSpliceBuf256K => Some((&["tune.bufsize 262144"], &[])),
            _ => None,
        }
    }
}

/// Lines for HAProxy's global section, and for its defaults section.
type HaproxyTuning = (&'static [&'static str], &'static [&'static str]);

/// A peer ready to be measured: where to connect, and the process behind it.
pub struct RunningPeer {
    pub kind: PeerKind,
    pub addr: SocketAddr,
    // Declared before the config directory so the process dies first.
    process: Option<Process>,
    _config_dir: Option<TempDir>,
}

impl RunningPeer {
    pub fn start(
        kind: PeerKind,
        sink: SocketAddr,
        proxy_bin: &Path,
        haproxy: Option<&Haproxy>,
    ) -> Result<Self> {
        if let Some(dataplane) = kind.dataplane() {
            let (process, addr) = start_splice_proxy(proxy_bin, sink, dataplane)?;
            return Ok(Self { kind, addr, process: Some(process), _config_dir: None });
        }
        if let Some(tuning) = kind.haproxy_tuning() {
            let haproxy = haproxy.context("HAProxy peer without a HAProxy binary")?;
            let (process, addr, dir) = haproxy.start(kind.name(), tuning, sink)?;
            return Ok(Self { kind, addr, process: Some(process), _config_dir: Some(dir) });
        }
        Ok(Self { kind, addr: sink, process: None, _config_dir: None })
    }

    /// Fails if the proxy behind this peer has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        self.process.as_mut().map_or(Ok(()), Process::check_alive)
    }
}

/// A server that reads each connection to EOF, then writes one byte, so the
/// client's measurement ends only when every byte has arrived.
pub fn start_sink() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding the sink")?;
    let addr = listener.local_addr()?;
    thread::spawn(move || {
        for mut stream in listener.incoming().map_while(Result::ok) {
            thread::spawn(move || {
                let mut buf = vec![0u8; SINK_BUFFER];
                while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
                let _ = stream.write_all(&[1]);
            });
        }
    });
    Ok(addr)
}

fn start_splice_proxy(binary: &Path, sink: SocketAddr, dataplane: &str) -> Result<(Process, SocketAddr)> {
    if !binary.is_file() {
        bail!("{} is missing: run `cargo build --release --bin splice-proxy` first", binary.display());
    }
    if dataplane == "sockmap" && !is_root() {
        bail!("the sockmap data plane needs root (BPF): run the bench as root, or pick peers with --only");
    }
    let addr = free_loopback_addr()?;
    let child = Command::new(binary)
        .args(["--listen", &addr.to_string(), "--upstream", &sink.to_string()])
        .args(["--dataplane", dataplane])
        // Several proxies run at once: no shared admin port.
        .args(["--admin-listen", "127.0.0.1:0"])
        // The bench moves plain TCP, not TLS.
        .arg("--no-sni-check")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let mut process = Process { name: format!("splice-proxy --dataplane {dataplane}"), child, log: None };
    process.wait_until_accepting(addr)?;
    Ok((process, addr))
}

/// The HAProxy binary the bench starts, with its version.
pub struct Haproxy {
    binary: PathBuf,
    version: String,
}

impl Haproxy {
    /// `name` is a path, or a command looked up on PATH, then in /usr/sbin
    /// and /usr/local/sbin (Debian installs it in /usr/sbin).
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
    fn start(
        &self,
        name: &str,
        tuning: HaproxyTuning,
        sink: SocketAddr,
    ) -> Result<(Process, SocketAddr, TempDir)> {
        let addr = free_loopback_addr()?;
        let dir = TempDir::create()?;
        let config = dir.path.join("haproxy.cfg");
        let config_text = haproxy_config(name, tuning, addr, sink);
        std::fs::write(&config, config_text).with_context(|| format!("writing {}", config.display()))?;
        let log_path = dir.path.join("haproxy.log");
        let log = File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
        let child = Command::new(&self.binary)
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

/// Mode tcp, one frontend on `listen`, one backend to the sink; nbthread is
/// left to its default (one thread per CPU).
fn haproxy_config(
    name: &str,
    (global_tuning, defaults_tuning): HaproxyTuning,
    listen: SocketAddr,
    sink: SocketAddr,
) -> String {
    const TIMEOUTS: [&str; 3] = ["timeout connect 10s", "timeout client 5m", "timeout server 5m"];
    let bind = format!("bind {listen}");
    let server = format!("server sink {sink}");
    let sections: [(&str, Vec<&str>); 4] = [
        ("global", [&["maxconn 4096"], global_tuning].concat()),
        ("defaults", [&["mode tcp"], &TIMEOUTS[..], defaults_tuning].concat()),
        ("frontend bench", vec![&bind, "default_backend sink"]),
        ("backend sink", vec![&server]),
    ];
    let mut text = format!("# {name}, written by splice-proxy's bench\n");
    for (section, lines) in sections {
        text += &format!("\n{section}\n");
        text.extend(lines.iter().map(|line| format!("    {line}\n")));
    }
    text
}

/// A child process, killed (SIGKILL to its PID) and reaped on drop.
struct Process {
    name: String,
    child: Child,
    /// Where its output goes, quoted when it fails.
    log: Option<PathBuf>,
}

impl Process {
    fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            let log = self.log.as_ref().and_then(|path| std::fs::read_to_string(path).ok());
            bail!(
                "{} (PID {}) exited: {status}{}",
                self.name,
                self.child.id(),
                log.map(|text| format!("; its output:\n{text}")).unwrap_or_default()
            );
        }
        Ok(())
    }

    fn wait_until_accepting(&mut self, addr: SocketAddr) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            self.check_alive()?;
            if TcpStream::connect(addr).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{} does not accept on {addr} after {START_TIMEOUT:?}", self.name);
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A directory of our own under the system temp dir, removed on drop.
struct TempDir {
    path: PathBuf,
}

impl TempDir {
    fn create() -> Result<Self> {
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("splice-proxy-bench-{}-{n}", std::process::id()));
        std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path })
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Reserves a loopback port, frees it, and hands it out.
fn free_loopback_addr() -> Result<SocketAddr> {
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    Ok(([127, 0, 0, 1], port).into())
}

fn find_program(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        return Path::new(name).is_file().then(|| PathBuf::from(name));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// Effective UID 0, from /proc/self/status ("Uid: real effective saved fs").
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .find_map(|line| line.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            .is_some_and(|euid| euid == "0")
    })
}
