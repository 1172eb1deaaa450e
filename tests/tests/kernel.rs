//! The embedded kernel object loads, attaches, sees every byte, sends its
//! logs through aya-log, and leaves no map entry behind. Runs as root in its
//! own network namespace; without root it fails with a clear message.

use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, TcpListener, TcpStream},
    sync::{Arc, Mutex},
};

use anyhow::{Context as _, Result, ensure};
use sha2::{Digest as _, Sha256};
use splice_proxy::kernel::KernelPrograms;
use splice_proxy_tests::{netns::NetNs, transfer::Payload};

/// Keeps the kernel log records it is given.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<String>>>);

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        self.0.lock().unwrap().push(format!("{} {}", record.level(), record.args()));
    }
    fn flush(&self) {}
}

#[test]
fn the_kernel_object_loads_attaches_and_counts_every_byte() -> Result<()> {
    let _netns = NetNs::enter()?;
    let mut kernel =
        KernelPrograms::load(log::LevelFilter::Trace, 16).context("loading the embedded kernel object")?;
    let capture = Capture::default();
    let mut logger = kernel.logger(capture.clone())?;

    let listener = TcpListener::bind("127.0.0.1:0")?;
    let client = TcpStream::connect(listener.local_addr()?)?;
    let (mut server, _) = listener.accept()?;
    let server_cookie = kernel.insert_socket(&server)?;
    let client_cookie = kernel.insert_socket(&client)?;
    ensure!(server_cookie != client_cookie, "two sockets share cookie {server_cookie}");
    let mut cookies = kernel.socket_cookies()?;
    cookies.sort_unstable();
    let mut expected = vec![server_cookie, client_cookie];
    expected.sort_unstable();
    assert_eq!(cookies, expected);

    const LEN: u64 = 4 << 20;
    let writer = std::thread::spawn(move || -> std::io::Result<TcpStream> {
        let mut client = client;
        let mut payload = Payload::new(7, LEN);
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = payload.fill(&mut buf);
            if n == 0 {
                break;
            }
            client.write_all(&buf[..n])?;
        }
        client.shutdown(Shutdown::Write)?;
        Ok(client)
    });
    let mut hasher = Sha256::new();
    let mut got = 0u64;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = server.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        got += n as u64;
    }
    let client = writer.join().expect("writer thread")?;
    assert_eq!(got, LEN, "bytes read through the verdict program");
    assert_eq!(<[u8; 32]>::from(hasher.finalize()), Payload::sha256(7, LEN));

    let stats = kernel.verdict_stats()?;
    assert_eq!(stats.bytes, LEN, "{stats:?}");
    assert!(stats.skbs >= 1, "{stats:?}");

    logger.flush();
    let records = capture.0.lock().unwrap().clone();
    assert!(records.iter().any(|r| r.starts_with("TRACE skb of ")), "kernel log records: {records:?}");

    drop((client, server));
    // Closed sockets leave the SOCKHASH by themselves.
    assert_eq!(kernel.socket_cookies()?, Vec::<u64>::new());
    Ok(())
}
