//! Byte-exact transfers: a client sends N bytes and half-closes; the server
//! hashes what it got, then answers with M bytes and closes. Both payloads are
//! deterministic, so each side checks the other's bytes by SHA-256.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};
use sha2::{Digest as _, Sha256};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    sync::Notify,
};

/// Deterministic pseudo-random bytes (SplitMix64), `len` of them from `seed`.
pub struct Payload {
    state: u64,
    remaining: u64,
}

impl Payload {
    #[must_use]
    pub fn new(seed: u64, len: u64) -> Self {
        Self { state: seed, remaining: len }
    }

    /// Fills `buf` with the next bytes; returns how many (0 at the end).
    pub fn fill(&mut self, buf: &mut [u8]) -> usize {
        let n = usize::try_from(self.remaining).unwrap_or(usize::MAX).min(buf.len());
        for chunk in buf[..n].chunks_mut(8) {
            self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            chunk.copy_from_slice(&z.to_le_bytes()[..chunk.len()]);
        }
        self.remaining -= n as u64;
        n
    }

    /// SHA-256 of the whole payload.
    #[must_use]
    pub fn sha256(seed: u64, len: u64) -> [u8; 32] {
        let mut payload = Self::new(seed, len);
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = payload.fill(&mut buf);
            if n == 0 {
                return hasher.finalize().into();
            }
            hasher.update(&buf[..n]);
        }
    }
}

const UPLOAD_SEED: u64 = 0x5eed_0001;
const DOWNLOAD_SEED: u64 = 0x5eed_0002;

/// What the server received on one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub bytes: u64,
    pub sha256: [u8; 32],
}

/// Results by transfer id.
#[derive(Default)]
struct Results {
    by_id: Mutex<HashMap<u64, Received>>,
    arrived: Notify,
}

/// The upstream side of byte-exact transfers; shared by concurrent transfers.
pub struct TransferServer {
    pub addr: SocketAddr,
    results: Arc<Results>,
    next_id: AtomicU64,
}

impl TransferServer {
    pub async fn start(ip: IpAddr) -> Result<Self> {
        Self::serve_on(crate::listen((ip, 0).into())?)
    }

    /// Serves on a listener made elsewhere (in another network namespace, say).
    pub fn serve_on(listener: tokio::net::TcpListener) -> Result<Self> {
        let addr = listener.local_addr()?;
        let results = Arc::new(Results::default());
        let sink = Arc::clone(&results);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let sink = Arc::clone(&sink);
                tokio::spawn(async move {
                    if let Ok((id, got)) = serve(stream).await {
                        sink.by_id.lock().unwrap_or_else(|p| p.into_inner()).insert(id, got);
                        sink.arrived.notify_waiters();
                    }
                });
            }
        });
        Ok(Self { addr, results, next_id: AtomicU64::new(0) })
    }

    /// What the server received for transfer `id`, once it has it.
    async fn received(&self, id: u64) -> Result<Received> {
        let wait = async {
            loop {
                let notified = self.results.arrived.notified();
                if let Some(got) = self.results.by_id.lock().unwrap_or_else(|p| p.into_inner()).remove(&id) {
                    return got;
                }
                notified.await;
            }
        };
        tokio::time::timeout(Duration::from_secs(60), wait)
            .await
            .context("the server never finished the transfer")
    }
}

/// Who writes when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// Both sides write and read at once; each closes right after its last write.
    Concurrent,
    /// The client sends everything and half-closes; only then does the server
    /// answer (the client's half-close must reach the server, and the client
    /// must still get the whole answer).
    ClientFirst,
    /// The server answers and half-closes first; the client reads to EOF, then
    /// sends its upload (the other half-close direction).
    UpstreamFirst,
}

impl Order {
    fn code(self) -> u64 {
        match self {
            Self::Concurrent => 0,
            Self::ClientFirst => 1,
            Self::UpstreamFirst => 2,
        }
    }

    fn from_code(code: u64) -> Result<Self> {
        Ok(match code {
            0 => Self::Concurrent,
            1 => Self::ClientFirst,
            2 => Self::UpstreamFirst,
            other => anyhow::bail!("unknown order {other}"),
        })
    }
}

/// Writes `len` bytes of the payload `seed`, then half-closes.
pub async fn send_payload<W: tokio::io::AsyncWrite + Unpin>(
    write: &mut W,
    seed: u64,
    len: u64,
) -> Result<()> {
    let mut payload = Payload::new(seed, len);
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = payload.fill(&mut buf);
        if n == 0 {
            break;
        }
        write.write_all(&buf[..n]).await?;
    }
    write.shutdown().await?;
    Ok(())
}

/// How a side reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pace {
    /// As fast as it can.
    Fast,
    /// Fast for 16 MiB, then slow (ten 64 KiB reads 20 ms apart), and again.
    Alternating,
}

const FAST_PHASE: u64 = 16 << 20;
const SLOW_READS: u32 = 10;
const SLOW_GAP: Duration = Duration::from_millis(20);

/// Reads to EOF; returns the byte count and SHA-256.
async fn receive_all<R: tokio::io::AsyncRead + Unpin>(read: &mut R) -> Result<Received> {
    receive_paced(read, Pace::Fast).await
}

/// [`receive_all`] at a [`Pace`].
async fn receive_paced<R: tokio::io::AsyncRead + Unpin>(read: &mut R, pace: Pace) -> Result<Received> {
    let mut hasher = Sha256::new();
    let mut bytes = 0u64;
    let mut buf = vec![0u8; 1 << 16];
    let mut next_slow_phase = FAST_PHASE;
    loop {
        if pace == Pace::Alternating && bytes >= next_slow_phase {
            next_slow_phase += FAST_PHASE;
            for _ in 0..SLOW_READS {
                tokio::time::sleep(SLOW_GAP).await;
                let n = read.read(&mut buf).await?;
                if n == 0 {
                    return Ok(Received { bytes, sha256: hasher.finalize().into() });
                }
                hasher.update(&buf[..n]);
                bytes += n as u64;
            }
        }
        let n = read.read(&mut buf).await?;
        if n == 0 {
            return Ok(Received { bytes, sha256: hasher.finalize().into() });
        }
        hasher.update(&buf[..n]);
        bytes += n as u64;
    }
}

/// Header: transfer id, response length and [`Order`] (u64 each), then the upload.
async fn serve(stream: TcpStream) -> Result<(u64, Received)> {
    let (mut read, mut write) = stream.into_split();
    let id = read.read_u64().await?;
    let response_len = read.read_u64().await?;
    let code = read.read_u64().await?;
    let order = Order::from_code(code & 0xff)?;
    let pace = if code & PACED_FLAG != 0 { Pace::Alternating } else { Pace::Fast };
    let got = match order {
        Order::Concurrent => {
            let writer =
                tokio::spawn(async move { send_payload(&mut write, DOWNLOAD_SEED, response_len).await });
            let got = receive_paced(&mut read, pace).await?;
            writer.await??;
            got
        }
        Order::ClientFirst => {
            let got = receive_all(&mut read).await?;
            send_payload(&mut write, DOWNLOAD_SEED, response_len).await?;
            got
        }
        Order::UpstreamFirst => {
            send_payload(&mut write, DOWNLOAD_SEED, response_len).await?;
            receive_all(&mut read).await?
        }
    };
    Ok((id, got))
}

/// One transfer through `proxy`: `up` bytes to the server, `down` bytes back,
/// in `order`; checks both by length and SHA-256.
pub async fn run_transfer(proxy: SocketAddr, server: &TransferServer, up: u64, down: u64) -> Result<()> {
    run_ordered_transfer(proxy, server, up, down, Order::ClientFirst).await
}

/// [`run_transfer`] with an explicit [`Order`].
pub async fn run_ordered_transfer(
    proxy: SocketAddr,
    server: &TransferServer,
    up: u64,
    down: u64,
    order: Order,
) -> Result<()> {
    let stream = TcpStream::connect(proxy).await?;
    run_transfer_on(stream, server, up, down, order).await
}

/// [`run_ordered_transfer`] on a connection made elsewhere.
pub async fn run_transfer_on(
    stream: TcpStream,
    server: &TransferServer,
    up: u64,
    down: u64,
    order: Order,
) -> Result<()> {
    run_paced_transfer_on(stream, server, up, down, order, Pace::Fast).await
}

/// Header bit: both sides read at [`Pace::Alternating`] (concurrent order only).
const PACED_FLAG: u64 = 1 << 8;

/// [`run_transfer_on`] with both readers at `pace` (for [`Order::Concurrent`]).
pub async fn run_paced_transfer_on(
    stream: TcpStream,
    server: &TransferServer,
    up: u64,
    down: u64,
    order: Order,
    pace: Pace,
) -> Result<()> {
    let id = server.next_id.fetch_add(1, Ordering::Relaxed);
    let (mut read, mut write) = stream.into_split();
    let code = order.code() | if pace == Pace::Alternating { PACED_FLAG } else { 0 };
    write.write_all(&[id.to_be_bytes(), down.to_be_bytes(), code.to_be_bytes()].concat()).await?;
    let got = if order == Order::UpstreamFirst {
        let got = receive_all(&mut read).await.context("reading the response")?;
        send_payload(&mut write, UPLOAD_SEED, up).await?;
        got
    } else {
        let sender = tokio::spawn(async move { send_payload(&mut write, UPLOAD_SEED, up).await });
        let got = receive_paced(&mut read, pace).await.context("reading the response")?;
        sender.await??;
        got
    };
    ensure!(got.bytes == down, "client received {} bytes, expected {down}", got.bytes);
    ensure!(
        got.sha256 == Payload::sha256(DOWNLOAD_SEED, down),
        "client received the wrong bytes ({down} bytes)"
    );
    let received = server.received(id).await?;
    ensure!(received.bytes == up, "server received {} bytes, expected {up}", received.bytes);
    ensure!(
        received.sha256 == Payload::sha256(UPLOAD_SEED, up),
        "server received the wrong bytes ({up} bytes)"
    );
    Ok(())
}

/// Bytes of the header every transfer sends first.
pub const HEADER_LEN: u64 = 24;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_is_deterministic_and_exact_in_length_whatever_the_chunking() {
        let mut whole = vec![0u8; 100_003];
        assert_eq!(Payload::new(9, 100_003).fill(&mut whole), 100_003);
        let mut pieces = Vec::new();
        let mut payload = Payload::new(9, 100_003);
        let mut buf = [0u8; 4096];
        loop {
            let n = payload.fill(&mut buf);
            if n == 0 {
                break;
            }
            pieces.extend_from_slice(&buf[..n]);
        }
        // Chunks of 4096 (a multiple of 8) give the same stream as one fill.
        assert_eq!(pieces, whole);
        assert_eq!(Payload::sha256(9, 100_003), <[u8; 32]>::from(Sha256::digest(&whole)));
        assert_ne!(Payload::sha256(9, 100_003), Payload::sha256(10, 100_003));
    }
}
