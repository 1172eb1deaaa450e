//! The packet plane's test bench: client, proxy and upstream namespaces over
//! veths ([`LineTopology`]), a [`TransferServer`] in the upstream's, and the
//! proxy run there with `--dataplane packet` (its programs attached to the
//! interfaces of its routes); transfers from the client's namespace, and
//! what a failed one leaves behind.

use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, ensure};
use serde_json::Value;
use tokio::runtime::Runtime;

use crate::{
    bpf_maps,
    netns::{LineTopology, in_netns},
    process::{ProxyProcess, tcp_sockets},
    transfer::{Order, Pace, TransferServer, run_paced_transfer_on, run_transfer_on},
};

pub const MIB: u64 = 1 << 20;
/// The transfer protocol's request header, counted in the upload.
pub const HEADER: u64 = 24;
/// A transfer that takes this long has stalled.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(120);

/// A number from the environment variable `name`, or `default`.
pub fn knob(name: &str, default: usize) -> Result<usize> {
    match std::env::var(name) {
        Ok(value) => value.parse().with_context(|| format!("{name}={value} is not a number")),
        Err(_) => Ok(default),
    }
}

/// The three namespaces, a runtime, and the transfer server (dropped in
/// that order: the namespaces last).
pub struct Lab {
    pub server: TransferServer,
    pub runtime: Runtime,
    pub topology: LineTopology,
}

impl Lab {
    pub fn new() -> Result<Self> {
        Self::with(|_| Ok(()))
    }

    /// A lab whose namespaces `setup` changes (sysctls, MTUs) before any
    /// socket is made.
    pub fn with(setup: impl FnOnce(&LineTopology) -> Result<()>) -> Result<Self> {
        let topology = LineTopology::create()?;
        setup(&topology).context("setting the namespaces up")?;
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        let server = {
            let _guard = runtime.enter();
            topology.transfer_server()?
        };
        Ok(Self { server, runtime, topology })
    }

    /// The proxy on the packet plane, forwarding to the server, with `extra`
    /// flags. It joins every connection at once (`--packet-switch-after
    /// 0s`, unless `extra` sets it), so that the switch meets whatever a
    /// test sends, a few bytes included; [`Lab::proxy_as_deployed`] keeps
    /// the default.
    pub fn proxy(&self, extra: &[&str]) -> Result<ProxyProcess> {
        self.proxy_to(&self.server.addr.to_string(), extra)
    }

    /// The proxy on the packet plane as it is deployed: a connection is
    /// relayed by hand until it has lived or carried enough for the switch.
    pub fn proxy_as_deployed(&self, extra: &[&str]) -> Result<ProxyProcess> {
        self.start_proxy(&self.server.addr.to_string(), extra)
    }

    /// [`Lab::proxy_as_deployed`] forwarding to `upstream`.
    pub fn start_proxy_as_deployed_to(&self, upstream: &str) -> Result<ProxyProcess> {
        self.start_proxy(upstream, &[])
    }

    /// [`Lab::proxy`] forwarding to `upstream`.
    pub fn proxy_to(&self, upstream: &str, extra: &[&str]) -> Result<ProxyProcess> {
        let mut args = extra.to_vec();
        if !extra.contains(&"--packet-switch-after") {
            args.extend_from_slice(&["--packet-switch-after", "0s"]);
        }
        self.start_proxy(upstream, &args)
    }

    fn start_proxy(&self, upstream: &str, extra: &[&str]) -> Result<ProxyProcess> {
        let listen = format!("{}:0", LineTopology::PROXY_CLIENT_SIDE_ADDR);
        let mut args =
            vec!["--listen", &listen, "--upstream", upstream, "--dataplane", "packet", "--no-sni-check"];
        args.extend_from_slice(extra);
        ProxyProcess::start_in_netns(&self.topology.proxy, &args)
    }

    /// A plain listener in the upstream's namespace, for connections a test
    /// drives itself ([`Lab::spliced_pair`]).
    pub fn plain_upstream(&self) -> Result<tokio::net::TcpListener> {
        let listener = in_netns(&self.topology.upstream, || {
            std::net::TcpListener::bind((LineTopology::UPSTREAM_ADDR, 0)).and_then(|l| {
                l.set_nonblocking(true)?;
                Ok(l)
            })
        })??;
        let _guard = self.runtime.enter();
        Ok(tokio::net::TcpListener::from_std(listener)?)
    }

    /// One connection through `proxy` to `upstream` (a [`Lab::plain_upstream`]):
    /// `hello` up before the switch, then, once it is the `n`-th spliced,
    /// bytes each way through the program. Returns the client's end and the
    /// upstream's.
    pub async fn spliced_pair(
        &self,
        proxy: &ProxyProcess,
        upstream: &tokio::net::TcpListener,
        n: f64,
    ) -> Result<(tokio::net::TcpStream, tokio::net::TcpStream)> {
        self.spliced_pair_opening_with(proxy, upstream, n, b"hello").await
    }

    /// [`Lab::spliced_pair`] whose client opens with `first` (a
    /// ClientHello, say), which the upstream must receive whole.
    pub async fn spliced_pair_opening_with(
        &self,
        proxy: &ProxyProcess,
        upstream: &tokio::net::TcpListener,
        n: f64,
        first: &[u8],
    ) -> Result<(tokio::net::TcpStream, tokio::net::TcpStream)> {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut client = self.client_socket()?.connect(proxy.addr()).await?;
        client.write_all(first).await?;
        let mut accepted = crate::accept_with_data(upstream).await?;
        let mut received = vec![0; first.len()];
        accepted.read_exact(&mut received).await?;
        ensure!(received == first, "the upstream received other first bytes than the client sent");
        spliced(proxy, n).await?;
        accepted.write_all(b"spliced").await?;
        client.read_exact(&mut [0; 7]).await?;
        client.write_all(b"too").await?;
        accepted.read_exact(&mut [0; 3]).await?;
        Ok((client, accepted))
    }

    /// A socket in the client's namespace.
    pub fn client_socket(&self) -> Result<tokio::net::TcpSocket> {
        Ok(in_netns(&self.topology.client, tokio::net::TcpSocket::new_v4)??)
    }

    /// Runs each of `transfers` (up, down, order) through `proxy`.
    pub fn run_all(&self, proxy: &ProxyProcess, transfers: &[(u64, u64, Order)]) -> Result<()> {
        for (i, &(up, down, order)) in transfers.iter().enumerate() {
            let socket = self.client_socket()?;
            self.runtime
                .block_on(async {
                    let stream = socket.connect(proxy.addr()).await?;
                    let transfer = run_transfer_on(stream, &self.server, up, down, order);
                    tokio::time::timeout(TRANSFER_TIMEOUT, transfer).await.context("stalled")?
                })
                .with_context(|| format!("transfer {i}: {up} up, {down} down, {order:?}"))?;
        }
        Ok(())
    }

    /// Runs `runs` transfers of `mib` MiB each way at once through `proxy`,
    /// every other one with both readers alternating slow and fast; each
    /// must be exact and carried by the program.
    pub fn exact_runs(&self, proxy: &ProxyProcess, (runs, mib, what): (usize, u64, &str)) -> Result<()> {
        let closed_before = proxy.closed_connections().len();
        for run in 0..runs {
            let pace = if run % 2 == 1 { Pace::Alternating } else { Pace::Fast };
            let events_before = proxy.events().len();
            let socket = self.client_socket()?;
            self.runtime
                .block_on(async {
                    let stream = socket.connect(proxy.addr()).await?;
                    let transfer = run_paced_transfer_on(
                        stream,
                        &self.server,
                        mib * MIB,
                        mib * MIB,
                        Order::Concurrent,
                        pace,
                    );
                    tokio::pin!(transfer);
                    tokio::select! {
                        result = &mut transfer => result,
                        () = tokio::time::sleep(TRANSFER_TIMEOUT) => {
                            // Reported while the client's socket is still open.
                            Err(anyhow!("stalled:\n{}", self.stall_report(proxy)))
                        }
                    }
                })
                .with_context(|| {
                    let warnings: Vec<String> = proxy.events()[events_before..]
                        .iter()
                        .filter(|e| e["level"] == "WARN" || e["level"] == "ERROR")
                        .map(Value::to_string)
                        .collect();
                    format!("{what}: run {} of {runs} ({pace:?}); the proxy warned: {warnings:?}", run + 1)
                })?;
        }
        let closed =
            self.runtime.block_on(proxy.wait_closed(closed_before + runs, Duration::from_secs(10)))?;
        for line in &closed[closed_before..] {
            ensure!(line["reason"] == "completed", "{what}: not completed: {line}");
            ensure!(
                line["kernel_bytes"].as_u64() > Some(0),
                "{what}: not spliced: {line}; the switch said: {}",
                switch_events(proxy, line)
            );
        }
        eprintln!("{what}: {runs} runs exact, every one spliced");
        Ok(())
    }

    /// What a failed run leaves: the sockets of all three namespaces and
    /// every flow entry.
    pub fn stall_report(&self, proxy: &ProxyProcess) -> String {
        let ports = [proxy.addr().port(), self.server.addr.port()];
        let t = &self.topology;
        let mut report = String::new();
        for (side, netns) in [("client", &t.client), ("proxy", &t.proxy), ("upstream", &t.upstream)] {
            report.push_str(&format!("{side} namespace:\n{}", tcp_sockets(Some(netns), &ports)));
        }
        match bpf_maps::packet_flows(proxy.pid().as_raw()) {
            Ok(flows) => {
                for (key, flow) in flows {
                    report.push_str(&format!("flow {key:?}: {flow:?}\n"));
                }
            }
            Err(error) => report.push_str(&format!("flows: {error:#}\n")),
        }
        report
    }

    /// Stops the proxy and returns its `packet plane totals` line.
    pub fn totals(&self, proxy: &mut ProxyProcess) -> Result<Value> {
        proxy.signal(nix::sys::signal::Signal::SIGTERM)?;
        self.runtime.block_on(proxy.wait_exit(Duration::from_secs(40)))?;
        self.runtime.block_on(proxy.wait_message("packet plane totals", Duration::from_secs(1)))
    }

    /// Starts a long paced transfer through `proxy`, waits until it is
    /// spliced, does `fault`, and requires the client's end to fail by a
    /// reset within `limit` (not to hang, not to complete).
    pub fn client_reset_after(
        &self,
        proxy: &ProxyProcess,
        fault: impl FnOnce() -> Result<()>,
        limit: Duration,
    ) -> Result<()> {
        let socket = self.client_socket()?;
        let outcome = self.runtime.block_on(async {
            let stream = socket.connect(proxy.addr()).await?;
            // Paced, so that it is still running when the fault comes.
            let transfer = run_paced_transfer_on(
                stream,
                &self.server,
                256 * MIB,
                256 * MIB,
                Order::Concurrent,
                Pace::Alternating,
            );
            let mut transfer = std::pin::pin!(transfer);
            tokio::select! {
                done = &mut transfer => anyhow::bail!("the transfer ended before the fault: {done:?}"),
                spliced = spliced(proxy, 1.0) => spliced?,
            }
            fault()?;
            anyhow::Ok(tokio::time::timeout(limit, transfer).await)
        })?;
        let result = outcome.context("the client's end hung after the fault")?;
        let error = result.err().context("the transfer completed in spite of the fault")?;
        let reset = error.chain().any(|cause| {
            cause
                .downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset)
        });
        ensure!(reset, "the client's end failed otherwise than by a reset: {error:#}");
        Ok(())
    }
}

/// Waits until `proxy` has spliced `n` connections in all (its metrics).
pub async fn spliced(proxy: &ProxyProcess, n: f64) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let spliced = proxy.metrics().await?.count("splice_proxy_packet_spliced_total", &[]);
        if spliced >= n {
            return Ok(());
        }
        ensure!(tokio::time::Instant::now() < deadline, "{spliced} spliced, waited for {n}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Requires `stream`'s end to be reset within `limit`: not a clean EOF, not
/// bytes, not silence.
pub async fn reset_within(stream: &mut tokio::net::TcpStream, limit: Duration) -> Result<()> {
    use tokio::io::AsyncReadExt as _;
    let read = tokio::time::timeout(limit, stream.read(&mut [0; 64]))
        .await
        .with_context(|| format!("no reset within {limit:?}"))?;
    match read {
        Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => Ok(()),
        other => anyhow::bail!("a reset expected, got {other:?}"),
    }
}

/// What the proxy logged about the switch of the connection `closed` (its
/// reason for not splicing, a failed step of the switch).
fn switch_events(proxy: &ProxyProcess, closed: &Value) -> String {
    let events: Vec<String> = proxy
        .events()
        .into_iter()
        .filter(|e| e["span"]["client"] == closed["span"]["client"] && e["target"] != closed["target"])
        .map(|e| e.to_string())
        .collect();
    if events.is_empty() { "nothing".to_owned() } else { events.join("; ") }
}
