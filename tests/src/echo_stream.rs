//! A long-lived connection through the proxy to an echo upstream with data
//! flowing the whole time: a ClientHello for the upstream's name, then a
//! chunk every few milliseconds until [`EchoStream::finish`], which
//! half-closes and checks that the echo is byte for byte what was sent
//! (SHA-256 of both, and the length).

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use sha2::{Digest as _, Sha256};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    sync::oneshot,
    task::JoinHandle,
};

/// Bytes per chunk and the pause between chunks.
const CHUNK: usize = 4096;
const PAUSE: Duration = Duration::from_millis(5);

/// A connection sending checksummed data until told to finish.
pub struct EchoStream {
    stop: oneshot::Sender<()>,
    /// Bytes echoed so far.
    echoed: Arc<AtomicU64>,
    done: JoinHandle<Result<u64>>,
}

impl EchoStream {
    /// Connects to `proxy` and starts sending (the ClientHello for
    /// `server_name` first).
    pub async fn start(proxy: SocketAddr, server_name: &str, seed: u8) -> Result<Self> {
        let hello = crate::edge::client_hello(server_name)?;
        let stream = TcpStream::connect(proxy).await.with_context(|| format!("connecting to {proxy}"))?;
        stream.set_nodelay(true)?;
        let (stop, mut stopped) = oneshot::channel();
        let echoed = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&echoed);
        let done = tokio::spawn(async move {
            let (mut read, mut write) = stream.into_split();
            let sender = async move {
                let mut sent = Sha256::new();
                let mut len = hello.len() as u64;
                write.write_all(&hello).await?;
                sent.update(&hello);
                let mut chunk = vec![0u8; CHUNK];
                for round in 0u64.. {
                    if stopped.try_recv().is_ok() {
                        break;
                    }
                    for (i, byte) in chunk.iter_mut().enumerate() {
                        *byte = (i as u64 ^ round).wrapping_mul(31).wrapping_add(u64::from(seed)) as u8;
                    }
                    write.write_all(&chunk).await.with_context(|| format!("writing after {len} bytes"))?;
                    sent.update(&chunk);
                    len += CHUNK as u64;
                    tokio::time::sleep(PAUSE).await;
                }
                write.shutdown().await?;
                anyhow::Ok((sent.finalize(), len))
            };
            let receiver = async move {
                let mut got = Sha256::new();
                let mut len = 0u64;
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n =
                        read.read(&mut buf).await.with_context(|| format!("reading after {len} bytes"))?;
                    if n == 0 {
                        break;
                    }
                    got.update(&buf[..n]);
                    len += n as u64;
                    counter.store(len, Ordering::Relaxed);
                }
                anyhow::Ok((got.finalize(), len))
            };
            let (sent, got) = tokio::try_join!(sender, receiver)?;
            ensure!(got.1 == sent.1, "{} bytes came back of {} sent", got.1, sent.1);
            ensure!(got.0 == sent.0, "the {} bytes that came back differ from those sent", got.1);
            Ok(sent.1)
        });
        Ok(Self { stop, echoed, done })
    }

    /// Waits until more bytes than a chunk have come back from now on: data
    /// still flows both ways.
    pub async fn flowing(&self) -> Result<()> {
        let from = self.echoed.load(Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.echoed.load(Ordering::Relaxed) <= from + CHUNK as u64 {
            ensure!(!self.done.is_finished(), "the connection ended after {from} bytes echoed");
            ensure!(Instant::now() < deadline, "nothing came back after {from} bytes for 10 s");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }

    /// Whether it failed already (a reset, say).
    #[must_use]
    pub fn is_finished(&self) -> bool {
        self.done.is_finished()
    }

    /// Stops sending, half-closes, and checks the whole echo; returns the
    /// bytes sent.
    pub async fn finish(self) -> Result<u64> {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(20), self.done).await.context("the echo never ended")??
    }
}
