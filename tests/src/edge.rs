//! What an NLB and a TLS client send first, built here for the edge tests:
//! PROXY protocol headers (written by this small builder, independently of
//! the proxy's parser) and real ClientHellos (from rustls).

use std::{net::SocketAddr, sync::Arc};

use anyhow::{Context as _, Result};
use rustls::{ClientConfig, ClientConnection, RootCertStore, pki_types::ServerName};

/// The v2 signature.
pub const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// AWS TLV type and its VPC endpoint ID subtype.
pub const TLV_AWS: u8 = 0xEA;
pub const AWS_VPCE_ID: u8 = 0x01;

/// A v2 header: `command_byte` (0x21 PROXY, 0x20 LOCAL), `family_byte` (0x11
/// TCP over IPv4, 0x21 over IPv6, 0x00 unspecified), the address block and TLVs.
#[must_use]
pub fn v2_raw(command_byte: u8, family_byte: u8, addresses: &[u8], tlvs: &[(u8, Vec<u8>)]) -> Vec<u8> {
    let mut block = addresses.to_vec();
    for (kind, value) in tlvs {
        block.push(*kind);
        block.extend(u16::try_from(value.len()).expect("TLV fits").to_be_bytes());
        block.extend(value);
    }
    let mut header = V2_SIGNATURE.to_vec();
    header.extend([command_byte, family_byte]);
    header.extend(u16::try_from(block.len()).expect("block fits").to_be_bytes());
    header.extend(block);
    header
}

/// A PROXY v2 header for a TCP connection from `source` to `destination`
/// (both IPv4 or both IPv6).
#[must_use]
pub fn v2_proxy(source: SocketAddr, destination: SocketAddr, tlvs: &[(u8, Vec<u8>)]) -> Vec<u8> {
    let mut addresses = Vec::new();
    let family = match (source, destination) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            addresses.extend(s.ip().octets());
            addresses.extend(d.ip().octets());
            0x11
        }
        (SocketAddr::V6(s), SocketAddr::V6(d)) => {
            addresses.extend(s.ip().octets());
            addresses.extend(d.ip().octets());
            0x21
        }
        _ => panic!("mixed address families"),
    };
    addresses.extend(source.port().to_be_bytes());
    addresses.extend(destination.port().to_be_bytes());
    v2_raw(0x21, family, &addresses, tlvs)
}

/// A LOCAL v2 header, as an NLB health check sends.
#[must_use]
pub fn v2_local() -> Vec<u8> {
    v2_raw(0x20, 0x00, &[], &[])
}

/// The AWS TLV with a VPC endpoint ID.
#[must_use]
pub fn vpce_tlv(id: &str) -> (u8, Vec<u8>) {
    (TLV_AWS, [&[AWS_VPCE_ID][..], id.as_bytes()].concat())
}

/// A v1 text header.
#[must_use]
pub fn v1_line(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let family = if source.is_ipv4() { "TCP4" } else { "TCP6" };
    format!(
        "PROXY {family} {} {} {} {}\r\n",
        source.ip(),
        destination.ip(),
        source.port(),
        destination.port()
    )
    .into_bytes()
}

/// The first flight of a rustls client connecting to `server_name` (no
/// server_name extension when it is an IP address).
pub fn client_hello(server_name: &str) -> Result<Vec<u8>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(RootCertStore::empty())
        .with_no_client_auth();
    let name = ServerName::try_from(server_name.to_owned()).context("server name")?;
    let mut connection = ClientConnection::new(Arc::new(config), name)?;
    let mut hello = Vec::new();
    connection.write_tls(&mut hello)?;
    Ok(hello)
}

/// CRC-32C (Castagnoli) of `bytes`, for the CRC32C TLV.
#[must_use]
pub fn crc32c(bytes: &[u8]) -> u32 {
    let mut crc = u32::MAX;
    for byte in bytes {
        crc ^= u32::from(*byte);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0x82F6_3B78 & mask);
        }
    }
    !crc
}

/// `header` (ending with a zeroed CRC32C TLV value) with its checksum filled in.
#[must_use]
pub fn with_crc32c(mut header: Vec<u8>) -> Vec<u8> {
    let at = header.len() - 4;
    let crc = crc32c(&header);
    header[at..].copy_from_slice(&crc.to_be_bytes());
    header
}

/// An upstream that echoes every byte it receives and closes after the
/// client's FIN, so a client sees exactly what the upstream got.
pub async fn start_echo(ip: std::net::IpAddr) -> Result<SocketAddr> {
    let listener = crate::listen((ip, 0).into())?;
    let addr = listener.local_addr()?;
    serve_echo(listener);
    Ok(addr)
}

/// Echo upstreams on each of `ips`, all on one port (the ENIs behind one
/// name); returns that port.
pub async fn start_echoes_on_common_port(ips: &[std::net::IpAddr]) -> Result<u16> {
    'attempt: for _ in 0..20 {
        let first = crate::listen((ips[0], 0).into())?;
        let port = first.local_addr()?.port();
        let mut listeners = vec![first];
        for ip in &ips[1..] {
            match crate::listen((*ip, port).into()) {
                Ok(listener) => listeners.push(listener),
                Err(_) => continue 'attempt,
            }
        }
        listeners.into_iter().for_each(serve_echo);
        return Ok(port);
    }
    anyhow::bail!("no port was free on all of {ips:?}")
}

/// Serves the echo upstream on `listener`.
pub fn serve_echo(listener: tokio::net::TcpListener) {
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut read, mut write) = stream.into_split();
                tokio::io::copy(&mut read, &mut write).await?;
                tokio::io::AsyncWriteExt::shutdown(&mut write).await
            });
        }
    });
}

/// Writes `chunks` one by one (TCP_NODELAY, `gap` after each so each leaves
/// as its own segment), half-closes, and reads what comes back until the
/// proxy closes (empty when it closed the connection itself).
pub async fn exchange_in_chunks(
    proxy: std::net::SocketAddr,
    chunks: &[&[u8]],
    gap: std::time::Duration,
) -> Result<Vec<u8>> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(proxy).await?;
    stream.set_nodelay(true)?;
    for chunk in chunks {
        stream.write_all(chunk).await?;
        tokio::time::sleep(gap).await;
    }
    stream.shutdown().await?;
    let mut back = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(10), stream.read_to_end(&mut back))
        .await
        .context("the proxy never closed")??;
    Ok(back)
}
