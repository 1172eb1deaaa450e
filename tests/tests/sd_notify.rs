//! systemd readiness (sd_notify, `Type=notify` in deploy/systemd): with
//! `NOTIFY_SOCKET` set, the proxy sends `READY=1` once its listener accepts
//! and `STOPPING=1` when SIGTERM starts the drain or SIGINT the stop, each
//! with a `STATUS=` line; a socket nobody listens on is only a warning.

use std::{collections::HashMap, net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Context as _, Result, bail, ensure};
use nix::sys::signal::Signal;
use splice_proxy_tests::process::{ProxyProcess, message};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream, UnixDatagram},
};

/// The service manager's end: a datagram socket in a temporary directory.
struct NotifySocket {
    socket: UnixDatagram,
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl NotifySocket {
    fn bind() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("notify");
        let socket = UnixDatagram::bind(&path).with_context(|| format!("binding {}", path.display()))?;
        Ok(Self { socket, path, _dir: dir })
    }

    /// The next message as `KEY=value` pairs (sd_notify sends one per line).
    async fn recv(&self) -> Result<HashMap<String, String>> {
        let mut buf = vec![0; 4096];
        let len = tokio::time::timeout(Duration::from_secs(10), self.socket.recv(&mut buf))
            .await
            .context("no notification within 10 s")??;
        let text = std::str::from_utf8(&buf[..len])?;
        text.lines()
            .map(|line| {
                let (key, value) =
                    line.split_once('=').with_context(|| format!("not KEY=value: {text:?}"))?;
                Ok((key.to_owned(), value.to_owned()))
            })
            .collect()
    }

    /// Fails if a message is waiting.
    fn expect_none(&self) -> Result<()> {
        let mut buf = vec![0; 4096];
        match self.socket.try_recv(&mut buf) {
            Ok(len) => bail!("unexpected notification {:?}", String::from_utf8_lossy(&buf[..len])),
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
            Err(error) => Err(error.into()),
        }
    }
}

/// A client and the upstream's end of one connection through the proxy,
/// checked with one exchange each way.
async fn open_connection(proxy: SocketAddr, upstream: &TcpListener) -> Result<(TcpStream, TcpStream)> {
    let mut client = TcpStream::connect(proxy).await.with_context(|| format!("connecting to {proxy}"))?;
    client.write_all(b"ping").await?;
    let mut server =
        tokio::time::timeout(Duration::from_secs(10), splice_proxy_tests::accept_with_data(upstream))
            .await
            .context("no upstream connection")??;
    let mut got = [0; 4];
    server.read_exact(&mut got).await?;
    ensure!(&got == b"ping", "upstream got {got:?}");
    server.write_all(b"pong").await?;
    client.read_exact(&mut got).await?;
    ensure!(&got == b"pong", "client got {got:?}");
    Ok((client, server))
}

/// Starts a proxy with a notify socket, checks READY=1 against a served
/// connection, sends `signal` with that connection open, checks STOPPING=1
/// and the status starting with `status_prefix`, and a clean exit.
async fn notifies(signal: Signal, status_prefix: &str) -> Result<()> {
    let upstream = TcpListener::bind("127.0.0.1:0").await?;
    let upstream_addr = upstream.local_addr()?.to_string();
    let notify = NotifySocket::bind()?;
    let mut proxy = ProxyProcess::start_with_env(
        &["--upstream", upstream_addr.as_str(), "--no-sni-check", "--drain-timeout", "10s"],
        &[("NOTIFY_SOCKET", notify.path.as_os_str())],
    )?;

    let ready = notify.recv().await?;
    assert_eq!(ready.get("READY").map(String::as_str), Some("1"), "{ready:?}");
    let status = &ready["STATUS"];
    let listen = proxy.addr().to_string();
    assert_eq!(status, &format!("serving on {listen} (data plane splice)"));
    // Ready means accepting: the address in the status serves a connection end to end.
    let addr: SocketAddr = status["serving on ".len()..].split(' ').next().unwrap_or_default().parse()?;
    let (client, server) = open_connection(addr, &upstream).await?;
    notify.expect_none()?;

    proxy.signal(signal)?;
    let stopping = notify.recv().await?;
    assert_eq!(stopping.get("STOPPING").map(String::as_str), Some("1"), "{stopping:?}");
    assert!(stopping["STATUS"].starts_with(status_prefix), "{signal}: {stopping:?}");
    drop((client, server));
    let exit = proxy.wait_exit(Duration::from_secs(15)).await?;
    assert!(exit.success(), "{signal}: exit {exit}");
    notify.expect_none()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn ready_once_accepting_and_stopping_when_sigterm_drains() -> Result<()> {
    notifies(Signal::SIGTERM, "draining: 1 connections open, drain timeout 10s").await
}

#[tokio::test(flavor = "multi_thread")]
async fn stopping_when_sigint_stops() -> Result<()> {
    notifies(Signal::SIGINT, "stopping: closing 1 open connections now").await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_notify_socket_is_only_a_warning() -> Result<()> {
    let upstream = TcpListener::bind("127.0.0.1:0").await?;
    let upstream_addr = upstream.local_addr()?.to_string();
    let dir = tempfile::tempdir()?;
    let nobody = dir.path().join("nobody-listens");
    let mut proxy = ProxyProcess::start_with_env(
        &["--upstream", upstream_addr.as_str(), "--no-sni-check"],
        &[("NOTIFY_SOCKET", nobody.as_os_str())],
    )?;
    let warning = proxy.wait_message("cannot notify the service manager", Duration::from_secs(10)).await?;
    assert_eq!(warning["what"], "READY=1", "{warning}");
    let (client, server) = open_connection(proxy.addr(), &upstream).await?;
    drop((client, server));
    proxy.signal(Signal::SIGTERM)?;
    let exit = proxy.wait_exit(Duration::from_secs(15)).await?;
    assert!(exit.success(), "exit {exit}");
    let warnings =
        proxy.events().iter().filter(|e| message(e) == "cannot notify the service manager").count();
    assert_eq!(warnings, 2, "READY=1 and STOPPING=1 each warn once: {:?}", proxy.events());
    Ok(())
}
