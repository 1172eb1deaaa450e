//! Test kit for splice-proxy's integration tests and the local demo: a DNS
//! server whose answers change on demand, fake TLS API servers, byte-exact
//! transfers, the proxy as a real process, PROXY headers and ClientHellos,
//! and a network-namespace guard.

pub mod admin;
pub mod api;
pub mod big_tcp;
pub mod bpf_maps;
pub mod busy;
pub mod capabilities;
pub mod dns;
pub mod e2e;
pub mod echo_stream;
pub mod edge;
pub mod frames;
pub mod netns;
pub mod packet_lab;
pub mod positional;
pub mod process;
pub mod segments;
pub mod transfer;

/// The hostname the tests and the demo give their fake EKS API server.
pub const API_HOSTNAME: &str = "demo.gr7.us-east-1.eks.amazonaws.com";

/// A listener with a backlog deep enough for a thousand connections arriving
/// at once (tokio's `bind` uses 1,024, which overflows and stalls connects).
pub fn listen(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket =
        if addr.is_ipv4() { tokio::net::TcpSocket::new_v4() } else { tokio::net::TcpSocket::new_v6() }?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// The next connection on `listener` that brings data. The proxy's
/// background probe connects to the upstream and closes without a byte:
/// a test accepting upstream connections by hand skips those.
pub async fn accept_with_data(listener: &tokio::net::TcpListener) -> std::io::Result<tokio::net::TcpStream> {
    loop {
        let (stream, _) = listener.accept().await?;
        if stream.peek(&mut [0u8; 1]).await? > 0 {
            return Ok(stream);
        }
    }
}

/// Raises this process's soft descriptor limit to the hard limit (tests that
/// hold thousands of sockets need more than the usual 1,024).
pub fn raise_fd_limit() -> anyhow::Result<()> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    Ok(())
}
