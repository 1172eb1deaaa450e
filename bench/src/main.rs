//! Throughput benchmark: one TCP stream over loopback, direct and through
//! splice-proxy in each data plane, in alternating rounds on the same machine. Reports Gbit/s,
//! whole-machine busy % and core-seconds per GB (busy = ncpu × wall − Δidle,
//! idle from /proc/uptime), each the median of the rounds with its range, and
//! the ratio to the direct connection measured in the same run.
//!
//! `cargo run --release -p bench -- --help`

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

struct Args {
    seconds: f64,
    rounds: usize,
    proxy_bin: PathBuf,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        seconds: 3.0,
        rounds: 3,
        proxy_bin: PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/release/splice-proxy")),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--seconds" => args.seconds = value()?.parse().context("--seconds")?,
            "--rounds" => args.rounds = value()?.parse().context("--rounds")?,
            "--proxy-bin" => args.proxy_bin = value()?.into(),
            "--help" | "-h" => {
                println!(
                    "bench [--seconds S (3)] [--rounds N (3)] [--proxy-bin PATH (target/release/splice-proxy)]\n\
                     One stream over loopback, direct and through splice-proxy, alternating rounds."
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}; see --help"),
        }
    }
    if args.rounds == 0 || args.seconds <= 0.0 {
        bail!("--rounds and --seconds must be positive");
    }
    Ok(args)
}

/// One measured run.
#[derive(Clone, Copy)]
struct Sample {
    gbit_per_s: f64,
    busy_percent: f64,
    core_s_per_gb: f64,
}

fn main() -> Result<()> {
    let args = parse_args()?;
    if !args.proxy_bin.is_file() {
        bail!(
            "{} is missing: run `cargo build --release --bin splice-proxy` first",
            args.proxy_bin.display()
        );
    }
    let sink = start_sink()?;
    let splice = Proxy::start(&args.proxy_bin, sink, "splice")?;
    let copy = Proxy::start(&args.proxy_bin, sink, "copy")?;
    // Needs root (BPF); fails the bench with the proxy's reason otherwise.
    let sockmap = Proxy::start(&args.proxy_bin, sink, "sockmap")?;
    let peers: [(&str, SocketAddr); 4] = [
        ("direct", sink),
        ("splice-proxy (sockmap)", sockmap.addr),
        ("splice-proxy (splice)", splice.addr),
        ("splice-proxy (copy)", copy.addr),
    ];
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); peers.len()];
    for round in 0..args.rounds {
        for (i, (name, addr)) in peers.iter().enumerate() {
            let sample = measure(*addr, Duration::from_secs_f64(args.seconds))?;
            eprintln!("round {}: {name}: {:.1} Gbit/s", round + 1, sample.gbit_per_s);
            samples[i].push(sample);
        }
    }
    println!("one stream over loopback, {} rounds of {} s, {} CPUs", args.rounds, args.seconds, ncpu());
    println!("| peer | Gbit/s | busy % | core-s per GB | throughput vs direct | cost vs direct |");
    println!("|---|---|---|---|---|---|");
    let direct = summarize(&samples[0]);
    for ((name, _), peer) in peers.iter().zip(&samples) {
        let s = summarize(peer);
        println!(
            "| {name} | {} | {} | {} | {:.2} | {:.2} |",
            s.gbit.show(1),
            s.busy.show(1),
            s.cost.show(2),
            s.gbit.median / direct.gbit.median,
            s.cost.median / direct.cost.median
        );
    }
    Ok(())
}

/// Median with range.
struct Stat {
    median: f64,
    min: f64,
    max: f64,
}

impl Stat {
    fn of(mut values: Vec<f64>) -> Self {
        values.sort_by(f64::total_cmp);
        let n = values.len();
        let median = if n % 2 == 1 { values[n / 2] } else { (values[n / 2 - 1] + values[n / 2]) / 2.0 };
        Self { median, min: values[0], max: values[n - 1] }
    }

    fn show(&self, digits: usize) -> String {
        format!("{:.digits$} ({:.digits$}–{:.digits$})", self.median, self.min, self.max)
    }
}

struct Summary {
    gbit: Stat,
    busy: Stat,
    cost: Stat,
}

fn summarize(samples: &[Sample]) -> Summary {
    Summary {
        gbit: Stat::of(samples.iter().map(|s| s.gbit_per_s).collect()),
        busy: Stat::of(samples.iter().map(|s| s.busy_percent).collect()),
        cost: Stat::of(samples.iter().map(|s| s.core_s_per_gb).collect()),
    }
}

/// Sends as fast as possible for `duration`; the sink discards.
fn measure(addr: SocketAddr, duration: Duration) -> Result<Sample> {
    let mut stream = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    let buf = vec![0x5au8; 256 * 1024];
    let idle_before = idle_seconds()?;
    let started = Instant::now();
    let mut sent = 0u64;
    while started.elapsed() < duration {
        stream.write_all(&buf)?;
        sent += buf.len() as u64;
    }
    stream.shutdown(std::net::Shutdown::Write)?;
    // The sink answers with one byte once it has read everything.
    let mut done = [0u8; 1];
    stream.read_exact(&mut done).context("waiting for the sink to finish")?;
    let wall = started.elapsed().as_secs_f64();
    let idle = idle_seconds()? - idle_before;
    let busy = (ncpu() as f64 * wall - idle).max(0.0);
    let gb = sent as f64 / 1e9;
    Ok(Sample {
        gbit_per_s: gb * 8.0 / wall,
        busy_percent: 100.0 * busy / (ncpu() as f64 * wall),
        core_s_per_gb: busy / gb,
    })
}

/// A server that reads each connection to EOF, then writes one byte.
fn start_sink() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    thread::spawn(move || {
        for mut stream in listener.incoming().map_while(Result::ok) {
            thread::spawn(move || {
                let mut buf = vec![0u8; 256 * 1024];
                while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
                let _ = stream.write_all(&[1]);
            });
        }
    });
    Ok(addr)
}

/// splice-proxy started by the bench; killed (by its PID) on drop.
struct Proxy {
    child: Child,
    addr: SocketAddr,
}

impl Proxy {
    fn start(binary: &std::path::Path, upstream: SocketAddr, dataplane: &str) -> Result<Self> {
        // Reserve a port, free it, and hand it to the proxy.
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let child = Command::new(binary)
            .args(["--listen", &addr.to_string(), "--upstream", &upstream.to_string()])
            .args(["--dataplane", dataplane])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting splice-proxy")?;
        let proxy = Self { child, addr };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(addr).is_err() {
            if Instant::now() > deadline {
                bail!("splice-proxy did not listen on {addr}");
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(proxy)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ncpu() -> usize {
    thread::available_parallelism().map_or(1, std::num::NonZero::get)
}

/// Idle time of all CPUs together, in seconds (second field of /proc/uptime).
fn idle_seconds() -> Result<f64> {
    let text = std::fs::read_to_string("/proc/uptime")?;
    text.split_whitespace().nth(1).context("/proc/uptime has no idle field")?.parse().context("/proc/uptime")
}
