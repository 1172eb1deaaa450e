//! A fake Kubernetes API server on one ENI address: HTTP/1.1 (hyper) over
//! TLS with the cluster host name's certificate. It serves what `kubectl
//! version`, `kubectl get --raw /version`, `kubectl get pods` and `kubectl
//! get pods --watch` need: `/version`, legacy discovery (`/api`, `/apis`,
//! `/api/v1`), the pod list, and a watch stream that emits an event every
//! [`WATCH_PERIOD`]. Each answer names the ENI that served it (the pod is
//! called `eni-10-2-0-11`, and the list carries `"eni"`), so a test sees
//! where every request landed.

use std::{
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result};
use http_body_util::{Either, Full, channel::Channel};
use hyper::{Request, Response, StatusCode, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio_rustls::TlsAcceptor;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::api::Pki;

/// How often an open watch gets an event.
pub const WATCH_PERIOD: Duration = Duration::from_millis(300);
/// The version `/version` reports.
pub const GIT_VERSION: &str = "v1.32.9-eks-e2e";

type Body = Either<Full<Bytes>, Channel<Bytes>>;

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    watches: AtomicU64,
}

/// One running API server; [`KubeApi::stop`] withdraws the ENI (listener
/// and every open connection closed).
pub struct KubeApi {
    pub addr: SocketAddr,
    stop: CancellationToken,
    tasks: TaskTracker,
    counters: Arc<Counters>,
}

impl KubeApi {
    /// Serves on `ip:443`; call it on the `eks` node (the socket is made there).
    pub async fn start(pki: &Pki, ip: IpAddr) -> Result<Self> {
        let addr = SocketAddr::new(ip, super::PROXY_PORT);
        let listener = crate::listen(addr).with_context(|| format!("binding the API server on {addr}"))?;
        let acceptor = TlsAcceptor::from(pki.server_config()?);
        let (stop, tasks, counters) =
            (CancellationToken::new(), TaskTracker::new(), Arc::new(Counters::default()));
        let (stop2, tasks2, counters2) = (stop.clone(), tasks.clone(), Arc::clone(&counters));
        tasks.spawn(async move {
            loop {
                let stream = tokio::select! {
                    () = stop2.cancelled() => return,
                    accepted = listener.accept() => match accepted { Ok((s, _)) => s, Err(_) => continue },
                };
                let (acceptor, stop, counters) = (acceptor.clone(), stop2.clone(), Arc::clone(&counters2));
                let watch_tasks = tasks2.clone();
                tasks2.spawn(async move {
                    let Ok(tls) = acceptor.accept(stream).await else { return };
                    let service_stop = stop.clone();
                    let service = service_fn(move |request| {
                        let (counters, stop) = (Arc::clone(&counters), service_stop.clone());
                        let watch_tasks = watch_tasks.clone();
                        async move { Ok::<_, Infallible>(respond(ip, &request, &counters, &stop, &watch_tasks)) }
                    });
                    let connection = http1::Builder::new().serve_connection(TokioIo::new(tls), service);
                    tokio::select! {
                        () = stop.cancelled() => {}
                        _ = connection => {}
                    }
                });
            }
        });
        Ok(Self { addr, stop, tasks, counters })
    }

    /// Requests answered so far.
    #[must_use]
    pub fn requests(&self) -> u64 {
        self.counters.requests.load(Ordering::Relaxed)
    }

    /// Watches started so far.
    #[must_use]
    pub fn watches(&self) -> u64 {
        self.counters.watches.load(Ordering::Relaxed)
    }

    /// The ENI goes away: the listener and every open connection close.
    pub async fn stop(self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

fn respond(
    eni: IpAddr,
    request: &Request<hyper::body::Incoming>,
    counters: &Counters,
    stop: &CancellationToken,
    tasks: &TaskTracker,
) -> Response<Body> {
    counters.requests.fetch_add(1, Ordering::Relaxed);
    let query = request.uri().query().unwrap_or_default();
    let watch = query.split('&').any(|kv| kv == "watch=true" || kv == "watch=1");
    match request.uri().path() {
        "/version" => json(StatusCode::OK, &version()),
        "/api" => json(
            StatusCode::OK,
            &serde_json::json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
                {"clientCIDR": "0.0.0.0/0", "serverAddress": format!("{eni}:443")}]}),
        ),
        "/apis" => json(
            StatusCode::OK,
            &serde_json::json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": []}),
        ),
        "/api/v1" => json(
            StatusCode::OK,
            &serde_json::json!({"kind": "APIResourceList", "groupVersion": "v1", "resources": [{
                "name": "pods", "singularName": "pod", "namespaced": true, "kind": "Pod",
                "verbs": ["get", "list", "watch"], "shortNames": ["po"]}]}),
        ),
        "/api/v1/namespaces/default/pods" if watch => {
            counters.watches.fetch_add(1, Ordering::Relaxed);
            let (mut sender, body) = Channel::<Bytes>::new(4);
            let stop = stop.clone();
            tasks.spawn(async move {
                for version in 2u64.. {
                    let event = serde_json::json!({"type": "MODIFIED", "object": pod(eni, version)});
                    let line = Bytes::from(format!("{event}\n"));
                    tokio::select! {
                        () = stop.cancelled() => return,
                        sent = sender.send_data(line) => if sent.is_err() { return },
                    }
                    tokio::time::sleep(WATCH_PERIOD).await;
                }
            });
            let mut response = Response::new(Either::Right(body));
            response
                .headers_mut()
                .insert(hyper::header::CONTENT_TYPE, "application/json".parse().expect("valid"));
            response
        }
        "/api/v1/namespaces/default/pods" => json(
            StatusCode::OK,
            &serde_json::json!({"kind": "PodList", "apiVersion": "v1", "eni": eni.to_string(),
                "metadata": {"resourceVersion": "1"}, "items": [pod(eni, 1)]}),
        ),
        path => json(
            StatusCode::NOT_FOUND,
            &serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                "message": format!("the server could not find {path}"), "reason": "NotFound", "code": 404}),
        ),
    }
}

/// What `/version` answers.
#[must_use]
pub fn version() -> serde_json::Value {
    serde_json::json!({"major": "1", "minor": "32", "gitVersion": GIT_VERSION, "gitCommit": "e2e",
        "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.23.0",
        "compiler": "gc", "platform": "linux/amd64"})
}

/// The pod name that says which ENI served a request.
#[must_use]
pub fn pod_name(eni: IpAddr) -> String {
    format!("eni-{}", eni.to_string().replace(['.', ':'], "-"))
}

fn pod(eni: IpAddr, version: u64) -> serde_json::Value {
    serde_json::json!({"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": pod_name(eni), "namespace": "default", "uid": format!("uid-{}", pod_name(eni)),
        "resourceVersion": version.to_string(), "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"containers": [{"name": "app", "image": "registry.example/app:1"}]},
        "status": {"phase": "Running"}})
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut response = Response::new(Either::Left(Full::new(Bytes::from(value.to_string()))));
    *response.status_mut() = status;
    response.headers_mut().insert(hyper::header::CONTENT_TYPE, "application/json".parse().expect("valid"));
    response
}
