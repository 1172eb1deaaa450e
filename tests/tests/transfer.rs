//! Byte-exact transfers through the userspace copy data plane, checked by
//! SHA-256 both ways, each ending with a half-close from the client.

use std::{
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
};

use anyhow::Result;
use testkit::{
    process::ProxyProcess,
    transfer::{TransferServer, run_transfer},
};

const MIB: u64 = 1 << 20;

async fn proxy_to(server: &TransferServer) -> Result<ProxyProcess> {
    // An IP literal upstream needs no DNS.
    let upstream = server.addr.to_string();
    tokio::task::block_in_place(|| ProxyProcess::start(&["--upstream", upstream.as_str()]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sizes_from_one_byte_to_64_mib_arrive_exactly_both_ways() -> Result<()> {
    let server = TransferServer::start(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2))).await?;
    let proxy = proxy_to(&server).await?;
    let cases = [(0, 0), (1, 0), (0, 1), (1, 1), (1000, 65_537), (MIB + 3, 3 * MIB), (64 * MIB, 64 * MIB)];
    for (up, down) in cases {
        run_transfer(proxy.addr(), &server, up, down)
            .await
            .map_err(|e| e.context(format!("{up} bytes up, {down} down")))?;
    }
    let closed = proxy.wait_closed(cases.len(), std::time::Duration::from_secs(5)).await?;
    for (event, (up, down)) in closed.iter().zip(cases) {
        assert_eq!(event["reason"], "completed", "{event}");
        // The 16-byte header goes up too.
        assert_eq!(event["bytes_up"].as_u64(), Some(up + 16), "{event}");
        assert_eq!(event["bytes_down"].as_u64(), Some(down), "{event}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_connections_at_once_arrive_exactly() -> Result<()> {
    let server = Arc::new(TransferServer::start(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2))).await?);
    let proxy = proxy_to(&server).await?;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..64u64 {
        let (server, addr) = (Arc::clone(&server), proxy.addr());
        tasks.spawn(async move { run_transfer(addr, &server, 256 * 1024 + i, 128 * 1024 + i).await });
    }
    while let Some(result) = tasks.join_next().await {
        result??;
    }
    let closed = proxy.wait_closed(64, std::time::Duration::from_secs(10)).await?;
    assert!(closed.iter().all(|c| c["reason"] == "completed"), "{closed:?}");
    Ok(())
}
