//! A fake "EKS API server" (one per ENI address) speaking HTTP/1.1 over TLS
//! with a certificate for the cluster hostname, and a client that verifies
//! that certificate through the proxy. Every response names the ENI that
//! served it, so a test sees where each request landed.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use anyhow::{Context as _, Result, bail};
use rustls::{
    ClientConfig, RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName},
};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::{TlsAcceptor, TlsConnector, client::TlsStream};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// A CA and a server certificate for one hostname.
pub struct Pki {
    ca_der: CertificateDer<'static>,
    ca_pem: String,
    cert_der: CertificateDer<'static>,
    key_der: Vec<u8>,
}

impl Pki {
    pub fn new(hostname: &str) -> Result<Self> {
        let ca_key = rcgen::KeyPair::generate()?;
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(rcgen::DnType::CommonName, "splice-proxy test CA");
        let ca = ca_params.self_signed(&ca_key)?;
        let key = rcgen::KeyPair::generate()?;
        let params = rcgen::CertificateParams::new(vec![hostname.to_owned()])?;
        let cert = params.signed_by(&key, &ca, &ca_key)?;
        Ok(Self {
            ca_der: ca.der().clone(),
            ca_pem: ca.pem(),
            cert_der: cert.der().clone(),
            key_der: key.serialize_der(),
        })
    }

    /// The CA certificate, PEM (a kubeconfig's `certificate-authority`).
    #[must_use]
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The server side: the hostname's certificate, no ALPN (HTTP/1.1).
    pub fn server_config(&self) -> Result<Arc<ServerConfig>> {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()));
        let config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(vec![self.cert_der.clone()], key)?;
        Ok(Arc::new(config))
    }

    /// A client that trusts only this CA.
    pub fn client(&self, hostname: &str) -> Result<ApiClient> {
        Ok(ApiClient {
            connector: TlsConnector::from(self.client_config()?),
            server_name: ServerName::try_from(hostname.to_owned())?,
        })
    }

    /// The client side: trusts only this CA.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca_der.clone())?;
        let config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Arc::new(config))
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A running fake API server on one address.
pub struct ApiServer {
    pub addr: SocketAddr,
    stop: CancellationToken,
    tasks: TaskTracker,
    requests: Arc<AtomicU64>,
}

impl ApiServer {
    /// Serves on `ip:port` (port 0 = any).
    pub async fn start(pki: &Pki, ip: IpAddr, port: u16) -> Result<Self> {
        let listener = TcpListener::bind((ip, port)).await.with_context(|| format!("binding {ip}:{port}"))?;
        Self::serve(pki, listener)
    }

    /// Serves on a listening socket made elsewhere (in another network
    /// namespace, say); called within a runtime.
    pub fn start_on(pki: &Pki, listener: std::net::TcpListener) -> Result<Self> {
        listener.set_nonblocking(true)?;
        Self::serve(pki, TcpListener::from_std(listener)?)
    }

    fn serve(pki: &Pki, listener: TcpListener) -> Result<Self> {
        let addr = listener.local_addr()?;
        let acceptor = TlsAcceptor::from(pki.server_config()?);
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let requests = Arc::new(AtomicU64::new(0));
        let (stop2, tasks2, requests2) = (stop.clone(), tasks.clone(), Arc::clone(&requests));
        tasks.spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    () = stop2.cancelled() => return,
                    accepted = listener.accept() => match accepted { Ok(a) => a, Err(_) => continue },
                };
                let (acceptor, stop, requests) = (acceptor.clone(), stop2.clone(), Arc::clone(&requests2));
                tasks2.spawn(async move {
                    tokio::select! {
                        () = stop.cancelled() => {}
                        _ = serve_http(acceptor, stream, addr.ip(), requests) => {}
                    }
                });
            }
        });
        Ok(Self { addr, stop, tasks, requests })
    }

    /// Requests served so far.
    #[must_use]
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// The ENI goes away: the listener and every open connection close.
    pub async fn stop(self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

/// Two servers on `ips` sharing one port, as the ENIs behind one DNS name do.
pub async fn start_on_common_port(pki: &Pki, ips: &[IpAddr]) -> Result<Vec<ApiServer>> {
    'attempt: for _ in 0..20 {
        let first = ApiServer::start(pki, ips[0], 0).await?;
        let port = first.addr.port();
        let mut servers = vec![first];
        for ip in &ips[1..] {
            match ApiServer::start(pki, *ip, port).await {
                Ok(server) => servers.push(server),
                Err(_) => continue 'attempt,
            }
        }
        return Ok(servers);
    }
    bail!("no port was free on all of {ips:?}")
}

async fn serve_http(
    acceptor: TlsAcceptor,
    stream: TcpStream,
    eni: IpAddr,
    requests: Arc<AtomicU64>,
) -> Result<()> {
    let tls = acceptor.accept(stream).await?;
    let (read, mut write) = tokio::io::split(tls);
    let mut read = BufReader::new(read);
    loop {
        let mut request_line = String::new();
        if read.read_line(&mut request_line).await? == 0 {
            return Ok(());
        }
        let path = request_line.split_whitespace().nth(1).unwrap_or("/").to_owned();
        let mut close = false;
        loop {
            let mut header = String::new();
            if read.read_line(&mut header).await? == 0 || header == "\r\n" {
                break;
            }
            close |= header.eq_ignore_ascii_case("connection: close\r\n");
        }
        requests.fetch_add(1, Ordering::Relaxed);
        let body = format!("{{\"eni\":\"{eni}\",\"path\":\"{path}\"}}");
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        write.write_all(response.as_bytes()).await?;
        write.flush().await?;
        if close {
            // The server closes first, as an API server does when asked.
            write.shutdown().await?;
            return Ok(());
        }
    }
}

/// Makes TLS connections through the proxy and verifies the server certificate.
pub struct ApiClient {
    connector: TlsConnector,
    server_name: ServerName<'static>,
}

/// One verified TLS connection to an API server.
pub struct ApiConnection {
    stream: BufReader<TlsStream<TcpStream>>,
}

impl ApiClient {
    pub async fn connect(&self, proxy: SocketAddr) -> Result<ApiConnection> {
        let tcp = TcpStream::connect(proxy).await.with_context(|| format!("connecting to {proxy}"))?;
        let tls = self.connector.connect(self.server_name.clone(), tcp).await.context("TLS handshake")?;
        Ok(ApiConnection { stream: BufReader::new(tls) })
    }

    /// One request on a new connection; returns the ENI that answered.
    pub async fn get_once(&self, proxy: SocketAddr, path: &str) -> Result<IpAddr> {
        self.connect(proxy).await?.get(path).await
    }
}

impl ApiConnection {
    /// `GET path`; returns the ENI that answered.
    pub async fn get(&mut self, path: &str) -> Result<IpAddr> {
        let request = format!("GET {path} HTTP/1.1\r\nhost: api\r\n\r\n");
        self.stream.get_mut().write_all(request.as_bytes()).await?;
        let mut status = String::new();
        if self.stream.read_line(&mut status).await? == 0 {
            bail!("connection closed before a response");
        }
        if !status.starts_with("HTTP/1.1 200") {
            bail!("unexpected status line {status:?}");
        }
        let mut length = 0usize;
        loop {
            let mut header = String::new();
            self.stream.read_line(&mut header).await?;
            if header == "\r\n" || header.is_empty() {
                break;
            }
            if let Some(value) = header.to_ascii_lowercase().strip_prefix("content-length:") {
                length = value.trim().parse()?;
            }
        }
        let mut body = vec![0u8; length];
        self.stream.read_exact(&mut body).await?;
        let body: serde_json::Value = serde_json::from_slice(&body)?;
        let eni = body["eni"].as_str().context("response without eni")?;
        Ok(eni.parse()?)
    }
}
