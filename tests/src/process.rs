//! Runs the real `splice-proxy` binary with JSON logs and reads its events.

use std::{
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use nix::{sys::signal::Signal, unistd::Pid};
use serde_json::Value;

/// A running proxy process; killed (by its PID) when dropped.
pub struct ProxyProcess {
    child: Child,
    events: Arc<Mutex<Vec<Value>>>,
    /// Reads stderr into `events` until the process closes it.
    reader: Option<std::thread::JoinHandle<()>>,
    /// The bound listen addresses, in the order they were logged.
    pub listen: Vec<SocketAddr>,
    /// The admin endpoint's bound address.
    pub admin: Option<SocketAddr>,
    /// The TCP health-check port's bound address (`--health-listen`).
    pub health: Option<SocketAddr>,
    /// The network namespace it runs in (None: the test's own).
    netns: Option<String>,
}

/// Path of the built binary: `SPLICE_PROXY_BIN`, or next to the test executable.
pub fn binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("SPLICE_PROXY_BIN") {
        return Ok(path.into());
    }
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<test> -> target/<profile>/splice-proxy
    let dir = exe.parent().and_then(|deps| deps.parent()).context("test executable has no parent")?;
    let path = dir.join("splice-proxy");
    if !path.is_file() {
        bail!(
            "{} is missing: build it first with `cargo build --bin splice-proxy` (`cargo xtask test` does)",
            path.display()
        );
    }
    if let Some(source) = newer_source(&path)? {
        bail!(
            "{} is older than {}: rebuild it with `cargo build --bin splice-proxy` (which rebuilds the \
             kernel programs too; `cargo test` alone does not, `cargo xtask test` does), or the tests \
             would run the old proxy",
            path.display(),
            source.display()
        );
    }
    Ok(path)
}

/// A source file of the proxy (its crates and the kernel program it embeds)
/// modified after `binary` was built, if any.
fn newer_source(binary: &Path) -> Result<Option<PathBuf>> {
    let built = std::fs::metadata(binary)?.modified()?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut dirs: Vec<PathBuf> =
        ["splice-proxy/src", "proxy-common/src", "proxy-ebpf/src"].iter().map(|d| root.join(d)).collect();
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let entry = entry?;
            let meta = entry.metadata()?;
            if meta.is_dir() {
                dirs.push(entry.path());
            } else if meta.modified()? > built {
                return Ok(Some(entry.path()));
            }
        }
    }
    Ok(None)
}

impl ProxyProcess {
    /// Starts the proxy with `args` plus `--log-format json`, and unless
    /// `args` set them: `--listen 127.0.0.1:0` (when no `--config` either),
    /// `--admin-listen 127.0.0.1:0` (parallel tests must not share 9901) and
    /// `--drain-delay 0s` (SIGTERM closes the listeners at once, as the
    /// tests written before the delay expect); returns once it accepts.
    pub fn start<S: AsRef<str>>(args: &[S]) -> Result<Self> {
        Self::start_binary(&binary()?, args)
    }

    /// [`Self::start`] with extra environment variables (`NOTIFY_SOCKET`, say).
    pub fn start_with_env<S: AsRef<str>>(args: &[S], env: &[(&str, &std::ffi::OsStr)]) -> Result<Self> {
        let mut cmd = Command::new(binary()?);
        cmd.envs(env.iter().copied());
        Self::start_command(cmd, args, true)
    }

    /// [`Self::start`] through a program that execs the proxy (`setpriv
    /// ARGS... -- <binary> ...`, say), so the child's PID is the proxy's.
    pub fn start_wrapped<S: AsRef<str>>(wrapper: &[&str], args: &[S]) -> Result<Self> {
        let (program, wrapper_args) = wrapper.split_first().context("empty wrapper")?;
        let mut cmd = Command::new(program);
        cmd.args(wrapper_args).arg(binary()?);
        Self::start_command(cmd, args, true)
    }

    /// [`Self::start`] with an explicit binary.
    pub fn start_binary<S: AsRef<str>>(binary: &std::path::Path, args: &[S]) -> Result<Self> {
        Self::start_command(Command::new(binary), args, true)
    }

    /// [`Self::start`] inside the network namespace `netns` (`ip netns exec`,
    /// which execs the proxy, so the child's PID is the proxy's).
    pub fn start_in_netns<S: AsRef<str>>(netns: &str, args: &[S]) -> Result<Self> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", netns]).arg(binary()?);
        let mut proxy = Self::start_command(cmd, args, true)?;
        proxy.netns = Some(netns.to_owned());
        Ok(proxy)
    }

    /// The proxy as deployed: `--config FILE` and nothing else (no test
    /// defaults: its listen and admin addresses and drain delay are the
    /// file's), inside `netns`; the file must set `log_format = "json"`.
    pub fn start_deployed(netns: &str, config: &std::path::Path) -> Result<Self> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", netns]).arg(binary()?);
        let config = config.to_str().context("config path is not UTF-8")?;
        let mut proxy = Self::start_command(cmd, &["--config", config], false)?;
        proxy.netns = Some(netns.to_owned());
        Ok(proxy)
    }

    fn start_command<S: AsRef<str>>(mut cmd: Command, args: &[S], test_defaults: bool) -> Result<Self> {
        cmd.args(args.iter().map(AsRef::as_ref));
        let given = |flag: &str| !test_defaults || args.iter().any(|a| a.as_ref() == flag);
        if test_defaults {
            cmd.args(["--log-format", "json"]);
        }
        if !given("--listen") && !given("--config") {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        if !given("--admin-listen") {
            cmd.args(["--admin-listen", "127.0.0.1:0"]);
        }
        if !given("--drain-delay") {
            cmd.args(["--drain-delay", "0s"]);
        }
        // `auto` runs the packet plane, which attaches to every routed
        // interface: a proxy started in the host's own namespace must not
        // touch the host's, so it runs splice unless the test asks.
        if !given("--dataplane") && !given("--config") && !runs_in_own_namespace(&cmd) {
            cmd.args(["--dataplane", "splice"]);
        }
        // `SPLICE_PROXY_TEST_LOG` raises the proxy's log level when chasing a failure.
        let level = std::env::var("SPLICE_PROXY_TEST_LOG").unwrap_or_else(|_| "info".to_owned());
        // A test run started by systemd must not pass its own notify socket on.
        if !cmd.get_envs().any(|(key, _)| key == "NOTIFY_SOCKET") {
            cmd.env_remove("NOTIFY_SOCKET");
        }
        cmd.env("RUST_LOG", level).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = cmd.spawn().context("starting splice-proxy")?;
        let stderr = child.stderr.take().context("no stderr pipe")?;
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&events);
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let event = serde_json::from_str(&line).unwrap_or(Value::String(line));
                sink.lock().unwrap_or_else(|p| p.into_inner()).push(event);
            }
        });
        let mut proxy = Self {
            child,
            events,
            reader: Some(reader),
            listen: Vec::new(),
            admin: None,
            health: None,
            netns: None,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if proxy.events().iter().any(|e| message(e) == "ready") {
                break;
            }
            if let Some(status) = proxy.child.try_wait()? {
                bail!("splice-proxy exited during start-up with {status}: {:?}", proxy.events());
            }
            if Instant::now() > deadline {
                bail!("splice-proxy not ready after 20 s: {:?}", proxy.events());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        proxy.listen = proxy
            .events()
            .iter()
            .filter(|e| message(e) == "listening")
            .filter_map(|e| e["listen"].as_str()?.parse().ok())
            .collect();
        let events = proxy.events();
        let logged = |msg: &str, field: &str| {
            events.iter().find(|e| message(e) == msg).and_then(|e| e[field].as_str()?.parse().ok())
        };
        proxy.admin = logged("admin endpoint listening", "admin");
        proxy.health = logged("health-check port bound; open while ready", "health");
        Ok(proxy)
    }

    /// The first listen address.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.listen[0]
    }

    #[must_use]
    pub fn pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.child.id()).expect("pid fits i32"))
    }

    /// `GET path` on the admin endpoint (from the proxy's network namespace
    /// when it runs in one): status code and body.
    pub async fn admin_get(&self, path: &str) -> Result<(u16, String)> {
        let addr = self.admin.context("no admin endpoint was logged")?;
        match &self.netns {
            None => crate::admin::get(addr, path).await,
            Some(netns) => {
                let socket = crate::netns::in_netns(netns, tokio::net::TcpSocket::new_v4)??;
                let stream =
                    socket.connect(addr).await.with_context(|| format!("connecting to {addr} in {netns}"))?;
                crate::admin::get_on(stream, path).await
            }
        }
    }

    /// `/metrics`, parsed.
    pub async fn metrics(&self) -> Result<crate::admin::Exposition> {
        let (status, body) = self.admin_get("/metrics").await?;
        anyhow::ensure!(status == 200, "/metrics answered {status}: {body}");
        crate::admin::Exposition::parse(&body)
    }

    /// Every log event so far (JSON objects; lines that were not JSON as strings).
    #[must_use]
    pub fn events(&self) -> Vec<Value> {
        self.events.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The panic messages in the proxy's log so far (the default hook's
    /// "thread '…' panicked at …" lines).
    #[must_use]
    pub fn panics(&self) -> Vec<String> {
        let events = self.events.lock().unwrap_or_else(|p| p.into_inner());
        events
            .iter()
            .filter_map(Value::as_str)
            .filter(|line| line.contains("panicked at"))
            .map(str::to_owned)
            .collect()
    }

    /// The "connection closed" access log events so far.
    #[must_use]
    pub fn closed_connections(&self) -> Vec<Value> {
        self.events().into_iter().filter(|e| message(e) == "connection closed").collect()
    }

    /// Waits until at least `n` connections have been logged as closed.
    pub async fn wait_closed(&self, n: usize, timeout: Duration) -> Result<Vec<Value>> {
        let deadline = Instant::now() + timeout;
        loop {
            let closed = self.closed_connections();
            if closed.len() >= n {
                return Ok(closed);
            }
            if Instant::now() > deadline {
                bail!("only {} of {n} connections logged as closed: {closed:?}", closed.len());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits for an event with this message.
    pub async fn wait_message(&self, msg: &str, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(event) = self.events().into_iter().find(|e| message(e) == msg) {
                return Ok(event);
            }
            if Instant::now() > deadline {
                bail!("no {msg:?} event within {timeout:?}: {:?}", self.events());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// What a failing test should print about the proxy: whether it still
    /// runs, its threads' kernel stacks, and every TCP socket on its listen
    /// port or on `other_ports`, with memory and timer details (`ss`).
    pub fn diagnostics(&mut self, other_ports: &[u16]) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let pid = self.pid();
        match self.child.try_wait() {
            Ok(Some(status)) => _ = writeln!(out, "proxy {pid} exited: {status}"),
            Ok(None) => _ = writeln!(out, "proxy {pid} is running"),
            Err(error) => _ = writeln!(out, "proxy {pid}: {error}"),
        }
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
            for task in tasks.map_while(Result::ok) {
                let read = |name: &str| std::fs::read_to_string(task.path().join(name)).unwrap_or_default();
                let _ = writeln!(out, "thread {:?} {}{}", task.file_name(), read("stat"), read("stack"));
            }
        }
        let ports: Vec<u16> =
            self.listen.iter().map(SocketAddr::port).chain(other_ports.iter().copied()).collect();
        out.push_str(&tcp_sockets(self.netns.as_deref(), &ports));
        out
    }

    pub fn signal(&self, signal: Signal) -> Result<()> {
        nix::sys::signal::kill(self.pid(), signal).with_context(|| format!("sending {signal}"))
    }

    /// Waits for the process to exit and for its last log lines to be read.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                if let Some(reader) = self.reader.take() {
                    tokio::task::block_in_place(|| reader.join()).ok();
                }
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("splice-proxy still running after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for ProxyProcess {
    /// Stops the proxy, and fails the test (unless it is failing already)
    /// when the proxy panicked: a task's panic is caught and the process
    /// carries on, so the test's own checks may not see it.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let panics = self.panics();
        assert!(std::thread::panicking() || panics.is_empty(), "the proxy panicked: {panics:?}");
    }
}

/// `ss` of every TCP socket in `netns` (None: the test's own) with one of
/// `ports` as either end, with memory and timer details.
pub fn tcp_sockets(netns: Option<&str>, ports: &[u16]) -> String {
    use std::fmt::Write as _;
    let mut cmd = match netns {
        Some(netns) => {
            let mut ip = Command::new("ip");
            ip.args(["netns", "exec", netns, "ss"]);
            ip
        }
        None => Command::new("ss"),
    };
    let mut out = String::new();
    let ports: Vec<String> = ports.iter().map(|p| format!(":{p} ")).collect();
    match cmd.args(["-tnmieoa"]).output() {
        Ok(ss) => {
            let text = String::from_utf8_lossy(&ss.stdout);
            let mut lines = text.lines().peekable();
            while let Some(line) = lines.next() {
                // A socket is a header line and an indented detail line.
                let detail = lines.next_if(|l| l.starts_with(char::is_whitespace)).unwrap_or_default();
                if ports.iter().any(|p| line.contains(p.as_str())) {
                    let _ = writeln!(out, "{line}\n{detail}");
                }
            }
        }
        Err(error) => _ = writeln!(out, "ss: {error}"),
    }
    out
}

/// The TCP sockets of this namespace listening on exactly `addr` (address
/// and port: another test's listener may have the same port on another
/// loopback address), one `ss` line each.
pub fn listening_on(addr: SocketAddr) -> Result<Vec<String>> {
    let filter = format!("src {addr}");
    let ss = Command::new("ss").args(["-Htln", &filter]).output().context("running ss")?;
    anyhow::ensure!(ss.status.success(), "ss {filter}: {}", String::from_utf8_lossy(&ss.stderr));
    Ok(String::from_utf8_lossy(&ss.stdout).lines().map(str::to_owned).collect())
}

/// The `message` field of a JSON log event.
#[must_use]
pub fn message(event: &Value) -> &str {
    event["message"].as_str().unwrap_or_default()
}

/// The count of refusal `label` in an `edge totals` event, whose `refusals`
/// field lists `label=count` pairs.
#[must_use]
pub fn refusal_count(totals: &Value, label: &str) -> Option<u64> {
    totals["refusals"].as_str()?.split(' ').find_map(|pair| {
        let (name, count) = pair.split_once('=')?;
        (name == label).then(|| count.parse().ok()).flatten()
    })
}

/// The resident memory of process `pid`, in KiB.
pub fn rss_kib(pid: i32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).context("no VmRSS line")?;
    line.trim().trim_end_matches("kB").trim().parse().with_context(|| format!("VmRSS {line:?}"))
}

/// Whether `cmd` runs the proxy in a network namespace of a test's own:
/// through `ip netns exec`, or from a test thread that entered one (the
/// test binary's main thread stays in the one it was started in).
fn runs_in_own_namespace(cmd: &Command) -> bool {
    if cmd.get_program() == "ip" {
        return true;
    }
    let namespace = |path: &str| std::fs::metadata(path).map(|m| std::os::unix::fs::MetadataExt::ino(&m));
    match (namespace("/proc/thread-self/ns/net"), namespace("/proc/self/ns/net")) {
        (Ok(own), Ok(host)) => own != host,
        _ => false,
    }
}
