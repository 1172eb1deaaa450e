//! Graceful upgrade (`--upgrade-socket`): while client loops open
//! connections back to back, each moving a little checksummed data, a new
//! process takes the listening and admin sockets over; not one connection is
//! refused or reset, a long-lived connection on the old process goes on
//! and ends byte-exact, the old process drains and exits, and the new one
//! serves on the same addresses, on every socket of the listener's
//! per-worker SO_REUSEPORT group (a socket closed with connections in its
//! queue would reset them).

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use splice_proxy_tests::{
    echo_stream::EchoStream,
    edge::start_echo,
    process::{ProxyProcess, listening_on, message},
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

const ECHO: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 8));
const WAIT: Duration = Duration::from_secs(20);
const CLIENT_LOOPS: u64 = 3;
/// Workers, so sockets in the listener's group: set, not one per CPU, and odd.
const WORKERS: usize = 3;

/// Opens connections one after another until `stop`: each sends 1–4 KiB
/// (different per connection), half-closes and must get exactly those
/// bytes back. Any refusal, reset or difference ends it with an error.
async fn client_loop(proxy: SocketAddr, id: u64, stop: Arc<AtomicBool>, done: Arc<AtomicU64>) -> Result<u64> {
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let len = 1024 + ((n * 7 + id * 13) % 3072) as usize;
        let sent: Vec<u8> = (0..len).map(|i| (i as u64 * 31 + n + id * 101) as u8).collect();
        let exchange = async {
            let mut stream = TcpStream::connect(proxy).await.context("connect")?;
            stream.write_all(&sent).await.context("write")?;
            stream.shutdown().await.context("shutdown")?;
            let mut back = Vec::with_capacity(len);
            stream.read_to_end(&mut back).await.context("read")?;
            ensure!(back == sent, "{} bytes came back, not the {len} sent (or different ones)", back.len());
            anyhow::Ok(())
        };
        tokio::time::timeout(Duration::from_secs(10), exchange)
            .await
            .context("no answer in 10 s")?
            .with_context(|| format!("client loop {id}, connection {n}"))?;
        n += 1;
        done.fetch_add(1, Ordering::Relaxed);
    }
    Ok(n)
}

/// Waits until `done` reached `n`, failing early when a loop ended.
async fn until(done: &AtomicU64, n: u64, loops: &[tokio::task::JoinHandle<Result<u64>>]) -> Result<()> {
    let deadline = Instant::now() + WAIT;
    while done.load(Ordering::Relaxed) < n {
        ensure!(!loops.iter().any(tokio::task::JoinHandle::is_finished), "a client loop ended early");
        ensure!(Instant::now() < deadline, "only {} connections of {n}", done.load(Ordering::Relaxed));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_process_takes_over_without_refusing_a_connection() -> Result<()> {
    takes_over_without_refusing("per-worker", WORKERS).await
}

/// The same with `per-cpu`: the group and its steering program go over,
/// a worker per CPU (as many as this machine has, up to [`WORKERS`]).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_process_steering_by_cpu_takes_over_without_refusing_a_connection() -> Result<()> {
    let cpus = splice_proxy::cpus::allowed().context("the CPUs this process may run on")?.len();
    takes_over_without_refusing("per-cpu", cpus.min(WORKERS)).await
}

/// A process with `--listen-sockets mode` and `workers` workers hands its
/// listeners to a new one like it while clients connect without a pause;
/// none is refused, every exchange is checked, and the new group is the
/// old one.
async fn takes_over_without_refusing(mode: &str, workers: usize) -> Result<()> {
    let echo = start_echo(ECHO).await?.to_string();
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("upgrade.sock");
    let socket = socket.to_str().context("socket path")?;
    let workers_flag = workers.to_string();
    let args = [
        "--upstream",
        &echo,
        "--no-sni-check",
        "--upgrade-socket",
        socket,
        "--drain-timeout",
        "30s",
        "--workers",
        &workers_flag,
        "--listen-sockets",
        mode,
    ];
    let mut old = tokio::task::block_in_place(|| ProxyProcess::start(&args))?;
    let via = old.addr();
    let long = EchoStream::start(via, "long.example.test", 9).await?;

    let (stop, done) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
    let loops: Vec<_> = (0..CLIENT_LOOPS)
        .map(|id| tokio::spawn(client_loop(via, id, Arc::clone(&stop), Arc::clone(&done))))
        .collect();
    until(&done, 50, &loops).await.context("before the upgrade")?;

    let mut new = tokio::task::block_in_place(|| ProxyProcess::start(&args))?;
    ensure!(new.listen == [via], "the new process listens on {:?}, not {via}", new.listen);
    ensure!(new.admin == old.admin, "admin endpoint {:?}, not the old {:?}", new.admin, old.admin);
    old.wait_message("upgrade: the new process accepts; this one drains", WAIT).await?;
    let taken = new.wait_message("upgrade: listener taken over", WAIT).await?;
    ensure!(taken["sockets"] == workers, "not the old process's whole group: {taken}");
    let handed_over = done.load(Ordering::Relaxed);
    long.flowing().await.context("the long-lived connection after the hand-over")?;
    until(&done, handed_over + 300, &loops).await.context("after the upgrade")?;
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for client in loops {
        total += client.await??;
    }
    long.finish().await.context("the long-lived connection on the old process")?;

    let status = old.wait_exit(WAIT).await?;
    ensure!(status.success(), "the old process exited with {status}");
    let exiting = old.events().into_iter().find(|e| message(e) == "exiting").context("no exiting line")?;
    ensure!(exiting["stopped"] == "Drained", "{exiting}");
    let listening = listening_on(via)?;
    let group = listening.len();
    ensure!(group == workers, "the new process listens on {group} sockets, not {workers}:\n{listening:#?}");
    let on_old = old.closed_connections();
    let on_new = new.closed_connections();
    let completed =
        |closed: &[serde_json::Value]| closed.iter().filter(|c| c["reason"] == "completed").count();
    ensure!(
        completed(&on_old) + completed(&on_new) >= usize::try_from(total)?,
        "{total} exchanges, {} and {} completed connections logged",
        completed(&on_old),
        completed(&on_new)
    );
    ensure!(completed(&on_new) > 0, "the new process served nothing");
    // The admin socket went along: the new process answers on it.
    let metrics = new.metrics().await?;
    let accepted: f64 = metrics.all("splice_proxy_connections_accepted_total").map(|s| s.value).sum();
    ensure!(accepted >= completed(&on_new) as f64, "the admin endpoint is not the new process's: {accepted}");

    new.signal(nix::sys::signal::Signal::SIGTERM)?;
    ensure!(new.wait_exit(WAIT).await?.success(), "the new process failed at exit");
    Ok(())
}

/// SIGUSR2: the proxy starts its binary again, which takes over (its log
/// lines come on the old process's standard error, which it inherits).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr2_starts_the_binary_again_and_it_takes_over() -> Result<()> {
    use nix::sys::signal::{Signal, kill};
    let echo = start_echo(ECHO).await?.to_string();
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("upgrade.sock");
    let socket = socket.to_str().context("socket path")?;
    let args = ["--upstream", &echo, "--no-sni-check", "--upgrade-socket", socket];
    let mut old = tokio::task::block_in_place(|| ProxyProcess::start(&args))?;
    let long = EchoStream::start(old.addr(), "long.example.test", 5).await?;
    old.signal(Signal::SIGUSR2)?;
    let started = old.wait_message("SIGUSR2: started the new binary; it takes over when ready", WAIT).await?;
    let pid = nix::unistd::Pid::from_raw(i32::try_from(started["pid"].as_u64().context("no pid")?)?);
    let result = async {
        old.wait_message("upgrade: took over; the old process drains", WAIT).await?;
        old.wait_message("upgrade: the new process accepts; this one drains", WAIT).await?;
        let (stop, done) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
        let one = tokio::spawn(client_loop(old.addr(), 0, Arc::clone(&stop), Arc::clone(&done)));
        until(&done, 20, std::slice::from_ref(&one)).await?;
        stop.store(true, Ordering::Relaxed);
        one.await??;
        long.finish().await.context("the long-lived connection on the old process")
    }
    .await;
    // The new process is not the test's child: stop it by its PID, then the old one exits.
    kill(pid, Signal::SIGTERM)?;
    result?;
    let status = old.wait_exit(WAIT).await?;
    ensure!(status.success(), "the old process exited with {status}");
    let deadline = Instant::now() + WAIT;
    while kill(pid, None).is_ok() {
        ensure!(Instant::now() < deadline, "the new process {pid} did not exit on SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}
