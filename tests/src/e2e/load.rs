//! The load generator: kubectl-like TLS clients in `control`. Each opens a
//! TLS connection through the VPC endpoint (verifying the API server's
//! certificate for the host name), makes a few requests on it with pauses,
//! as kubectl reuses its connection, closes it and starts again, until
//! the deadline. Run it on the control node.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use crate::api::ApiClient;

/// How the clients behave.
#[derive(Debug, Clone)]
pub struct Shape {
    pub clients: usize,
    pub duration: Duration,
    pub requests_per_connection: usize,
    pub pause: Duration,
}

/// What the clients saw.
#[derive(Debug, Default)]
pub struct Report {
    pub connections: u64,
    pub requests: u64,
    pub failures: u64,
    /// The first failures, with their errors.
    pub first_failures: Vec<String>,
    /// Requests answered per ENI.
    pub enis: BTreeMap<IpAddr, u64>,
    /// Most connections open at once.
    pub peak_open: u64,
}

#[derive(Default)]
struct Shared {
    connections: AtomicU64,
    requests: AtomicU64,
    failures: AtomicU64,
    open: AtomicU64,
    peak_open: AtomicU64,
    first_failures: Mutex<Vec<String>>,
    enis: Mutex<BTreeMap<IpAddr, u64>>,
}

/// Runs `shape` against `endpoint`; every client starts within the first second.
pub async fn run(client: Arc<ApiClient>, endpoint: SocketAddr, shape: Shape) -> Report {
    let shared = Arc::new(Shared::default());
    let deadline = Instant::now() + shape.duration;
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..shape.clients {
        let (client, shared, shape) = (Arc::clone(&client), Arc::clone(&shared), shape.clone());
        let stagger = Duration::from_secs(1).mul_f64(n as f64 / shape.clients as f64);
        tasks.spawn(async move {
            tokio::time::sleep(stagger).await;
            while Instant::now() < deadline {
                if let Err(error) = one_connection(&client, endpoint, &shape, &shared).await {
                    shared.failures.fetch_add(1, Ordering::Relaxed);
                    let mut first = shared.first_failures.lock().unwrap_or_else(|p| p.into_inner());
                    if first.len() < 20 {
                        first.push(format!("{error:#}"));
                    }
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let take = |a: &AtomicU64| a.load(Ordering::Relaxed);
    Report {
        connections: take(&shared.connections),
        requests: take(&shared.requests),
        failures: take(&shared.failures),
        first_failures: shared.first_failures.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        enis: shared.enis.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        peak_open: take(&shared.peak_open),
    }
}

async fn one_connection(
    client: &ApiClient,
    endpoint: SocketAddr,
    shape: &Shape,
    shared: &Shared,
) -> anyhow::Result<()> {
    let timeout = Duration::from_secs(30);
    let mut connection = tokio::time::timeout(timeout, client.connect(endpoint)).await??;
    shared.connections.fetch_add(1, Ordering::Relaxed);
    let open = shared.open.fetch_add(1, Ordering::Relaxed) + 1;
    shared.peak_open.fetch_max(open, Ordering::Relaxed);
    let result = async {
        for _ in 0..shape.requests_per_connection {
            let eni =
                tokio::time::timeout(timeout, connection.get("/api/v1/namespaces/default/pods")).await??;
            shared.requests.fetch_add(1, Ordering::Relaxed);
            *shared.enis.lock().unwrap_or_else(|p| p.into_inner()).entry(eni).or_default() += 1;
            tokio::time::sleep(shape.pause).await;
        }
        anyhow::Ok(())
    }
    .await;
    shared.open.fetch_sub(1, Ordering::Relaxed);
    result
}
