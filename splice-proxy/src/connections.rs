//! The open connections, for `/debug/connections` and the
//! `connections_active` gauge: each connection registers when it is accepted
//! and leaves when its [`Registration`] is dropped (whatever the path).
//! What it learns (client, SNI, upstream) and its bytes so far are filled in
//! as it goes; byte counts are live on every plane (on sockmap the kernel's
//! share is read from its flows when the list is asked for).

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use serde::Serialize;

use crate::{
    addr::{ClientAddr, ListenAddr, UpstreamAddr},
    dataplane::ByteProgress,
};

/// Most connections one `/debug/connections` answer lists (the oldest first).
pub const LISTED_AT_MOST: usize = 10_000;

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// The edge guard reads the PROXY header and the ClientHello.
    Edge,
    /// Resolving and connecting to the upstream.
    Connecting,
    /// Both directions are being forwarded.
    Forwarding,
}

#[derive(Debug, Clone)]
struct Details {
    stage: Stage,
    client: Option<SocketAddr>,
    sni: Option<String>,
    target: Option<String>,
    upstream: Option<UpstreamAddr>,
}

#[derive(Debug)]
struct Entry {
    started: Instant,
    peer: ClientAddr,
    listen: ListenAddr,
    details: Mutex<Details>,
    bytes: Arc<ByteProgress>,
}

/// Every open connection.
#[derive(Debug, Default)]
pub struct ConnectionTable {
    next_id: AtomicU64,
    open: Mutex<HashMap<u64, Arc<Entry>>>,
}

/// One connection's place in the table; removes it when dropped.
#[derive(Debug)]
pub struct Registration {
    id: u64,
    table: Arc<ConnectionTable>,
    entry: Arc<Entry>,
}

/// One open connection as `/debug/connections` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectionView {
    pub id: u64,
    pub age_seconds: f64,
    pub stage: Stage,
    /// The address the PROXY header names, else the peer's.
    pub client: String,
    pub peer: String,
    pub listen: String,
    pub sni: Option<String>,
    pub target: Option<String>,
    pub upstream: Option<String>,
    pub bytes_up: u64,
    pub bytes_down: u64,
}

/// The `/debug/connections` answer.
#[derive(Debug, Serialize)]
pub struct ConnectionList {
    pub open: usize,
    pub listed: usize,
    pub connections: Vec<ConnectionView>,
}

impl ConnectionTable {
    /// Registers a connection just accepted from `peer` on `listen`.
    pub fn register(self: &Arc<Self>, peer: ClientAddr, listen: ListenAddr) -> Registration {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let entry = Arc::new(Entry {
            started: Instant::now(),
            peer,
            listen,
            details: Mutex::new(Details {
                stage: Stage::Edge,
                client: None,
                sni: None,
                target: None,
                upstream: None,
            }),
            bytes: Arc::default(),
        });
        self.lock().insert(id, Arc::clone(&entry));
        Registration { id, table: Arc::clone(self), entry }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Arc<Entry>>> {
        self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Connections open now.
    #[must_use]
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The open connections, oldest first, at most [`LISTED_AT_MOST`]. The
    /// table is locked only to copy the entry handles.
    #[must_use]
    pub fn list(&self) -> ConnectionList {
        let mut entries: Vec<(u64, Arc<Entry>)> =
            self.lock().iter().map(|(id, e)| (*id, Arc::clone(e))).collect();
        let open = entries.len();
        entries.sort_unstable_by_key(|(id, _)| *id);
        entries.truncate(LISTED_AT_MOST);
        let connections: Vec<ConnectionView> = entries.iter().map(|(id, e)| e.view(*id)).collect();
        ConnectionList { open, listed: connections.len(), connections }
    }
}

impl Entry {
    fn details(&self) -> MutexGuard<'_, Details> {
        self.details.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn view(&self, id: u64) -> ConnectionView {
        let d = self.details().clone();
        let (bytes_up, bytes_down) = self.bytes.totals();
        ConnectionView {
            id,
            age_seconds: (self.started.elapsed().as_secs_f64() * 1e3).round() / 1e3,
            stage: d.stage,
            client: d.client.map_or_else(|| self.peer.to_string(), |c| c.to_string()),
            peer: self.peer.to_string(),
            listen: self.listen.to_string(),
            sni: d.sni,
            target: d.target,
            upstream: d.upstream.map(|u| u.to_string()),
            bytes_up,
            bytes_down,
        }
    }
}

impl Registration {
    /// The guard's findings; the connection now resolves and connects.
    pub fn connecting(&self, client: Option<SocketAddr>, sni: Option<&str>, target: String) {
        let mut d = self.entry.details();
        d.stage = Stage::Connecting;
        d.client = client;
        d.sni = sni.map(str::to_owned);
        d.target = Some(target);
    }

    /// Connected to `upstream`.
    pub fn forwarding(&self, upstream: UpstreamAddr) {
        let mut d = self.entry.details();
        d.stage = Stage::Forwarding;
        d.upstream = Some(upstream);
    }

    /// The counters the data plane adds to.
    #[must_use]
    pub fn bytes(&self) -> &ByteProgress {
        &self.entry.bytes
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.table.lock().remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registered_until_dropped_with_what_was_learned() {
        let table = Arc::new(ConnectionTable::default());
        let peer = ClientAddr("10.0.0.1:5000".parse().unwrap());
        let listen = ListenAddr("127.0.0.1:443".parse().unwrap());
        let first = table.register(peer, listen);
        let second = table.register(peer, listen);
        first.connecting(
            Some("192.0.2.7:1234".parse().unwrap()),
            Some("a.example.com"),
            "a.example.com:443".into(),
        );
        first.forwarding(UpstreamAddr("10.1.0.5:443".parse().unwrap()));
        first.bytes().client_to_upstream.store(517, Ordering::Relaxed);
        let list = table.list();
        assert_eq!((list.open, list.listed), (2, 2));
        let view = &list.connections[0];
        assert_eq!(view.stage, Stage::Forwarding);
        assert_eq!(view.client, "192.0.2.7:1234");
        assert_eq!(view.peer, "10.0.0.1:5000");
        assert_eq!(view.upstream.as_deref(), Some("10.1.0.5:443"));
        assert_eq!((view.bytes_up, view.bytes_down), (517, 0));
        assert_eq!(list.connections[1].stage, Stage::Edge);
        assert_eq!(list.connections[1].client, "10.0.0.1:5000");
        drop(first);
        assert_eq!(table.len(), 1);
        drop(second);
        assert!(table.is_empty());
    }
}
