//! The listeners the server accepts on, as a set a SIGHUP reload changes:
//! a listener kept gets its new edge settings (for the connections it
//! accepts from then on), a removed one stops accepting and closes (its open
//! connections go on), an added one is bound before anything else changes.
//! Each keeps a second descriptor of its socket to hand to a new process on
//! a graceful upgrade ([`super::upgrade`]). The sockets and their accept
//! loop: [`socket`].

pub mod socket;

use std::{
    os::fd::{AsFd as _, OwnedFd},
    sync::Arc,
};

use tokio::{
    runtime::Handle,
    sync::{OwnedSemaphorePermit, Semaphore, watch},
    task::JoinSet,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use self::socket::{BindError, Listener};

use crate::{addr::ListenAddr, config::ListenerConfig, edge::EdgeConfig, proxy::Proxy, sockopt::TcpConfig};

/// What every accept loop hands its connections to.
#[derive(Clone)]
pub(super) struct Accepting {
    pub proxy: Arc<Proxy>,
    pub connections: TaskTracker,
    pub stop_connections: CancellationToken,
    pub slots: Arc<Semaphore>,
}

/// A listening socket, bound (or inherited) but perhaps not accepting yet.
pub(super) struct Bound {
    /// The address as configured (port 0 stays 0).
    pub configured: ListenAddr,
    pub listener: Listener,
}

struct Served {
    configured: ListenAddr,
    addr: ListenAddr,
    edge: watch::Sender<Arc<EdgeConfig>>,
    /// Ends this listener's accept loop (a child of the set's).
    stop: CancellationToken,
    /// A second descriptor of the listening socket, for a graceful upgrade.
    fd: OwnedFd,
    /// A descriptor per worker, registered with it, until the accept loops start.
    waiting: Vec<Listener>,
}

/// Every listener of the server.
pub(super) struct ListenerSet {
    served: Vec<Served>,
    /// Where the accept loops run (each serves what it accepts).
    workers: Vec<Handle>,
    accept_loops: JoinSet<()>,
    stop_accepting: CancellationToken,
}

/// Sets `tcp` on `listener`: the sockets it accepts inherit the options.
fn with_options(listener: &Listener, tcp: &TcpConfig) -> Result<(), BindError> {
    crate::sockopt::apply(listener, tcp)
        .map_err(|error| BindError { addr: listener.addr, source: std::io::Error::other(error) })
}

/// For each wanted address, the running listener it keeps, if any: a fixed
/// port is the listener bound there (whatever it was configured as, so a
/// file may name the port a port-0 listener got); port 0 is the next
/// listener configured with that same address.
pub(super) fn keep(running: &[(ListenAddr, ListenAddr)], wanted: &[ListenAddr]) -> Vec<Option<usize>> {
    let mut taken = vec![false; running.len()];
    wanted
        .iter()
        .map(|want| {
            let found = running.iter().enumerate().position(|(i, (configured, bound))| {
                !taken[i] && if want.0.port() == 0 { configured == want } else { bound == want }
            });
            if let Some(i) = found {
                taken[i] = true;
            }
            found
        })
        .collect()
}

impl ListenerSet {
    /// `bound` in the order of `configs` (not accepting yet), each with the
    /// TCP options `tcp`, which the sockets it accepts inherit, to be
    /// accepted on by each of `workers`.
    pub fn new(
        bound: Vec<Bound>,
        configs: &[ListenerConfig],
        tcp: &TcpConfig,
        workers: &[Handle],
    ) -> Result<Self, BindError> {
        let mut set = Self {
            served: Vec::new(),
            workers: workers.to_vec(),
            accept_loops: JoinSet::new(),
            stop_accepting: CancellationToken::new(),
        };
        for (b, config) in bound.into_iter().zip(configs) {
            with_options(&b.listener, tcp)?;
            set.served.push(set.served(b, &config.edge)?);
        }
        Ok(set)
    }

    fn served(&self, b: Bound, edge: &Arc<EdgeConfig>) -> Result<Served, BindError> {
        let addr = b.listener.addr;
        let error = |source| BindError { addr, source };
        let fd = b.listener.as_fd().try_clone_to_owned().map_err(error)?;
        let waiting = self
            .workers
            .iter()
            .map(|worker| b.listener.on_worker(worker))
            .collect::<Result<_, _>>()
            .map_err(error)?;
        Ok(Served {
            configured: b.configured,
            addr,
            edge: watch::Sender::new(Arc::clone(edge)),
            stop: self.stop_accepting.child_token(),
            fd,
            waiting,
        })
    }

    /// The bound addresses.
    pub fn addrs(&self) -> Vec<ListenAddr> {
        self.served.iter().map(|s| s.addr).collect()
    }

    /// Each listener's configured and bound address with a new descriptor of
    /// its socket, for a new process.
    /// Each listener's configured address and bound port, in configuration
    /// order (for the XDP source filter's lists).
    pub fn listening(&self) -> Vec<super::source_filter::Listening> {
        self.served.iter().map(|s| (s.configured.0, s.addr.0.port())).collect()
    }

    pub fn handover(&self) -> std::io::Result<Vec<(ListenAddr, ListenAddr, OwnedFd)>> {
        self.served.iter().map(|s| Ok((s.configured, s.addr, s.fd.try_clone()?))).collect()
    }

    /// Starts the accept loops of every listener not accepting yet, one on
    /// each worker; once all of a listener's have ended, it logs that it
    /// closed.
    pub fn start(&mut self, accepting: &Accepting) {
        for served in &mut self.served {
            let waiting = std::mem::take(&mut served.waiting);
            if waiting.is_empty() {
                continue;
            }
            let edge = served.edge.borrow().clone();
            tracing::info!(
                listen = %served.addr,
                upstream = edge.upstreams.describe(),
                proxy_protocol = ?edge.proxy_protocol.mode,
                allowed_vpce_ids = ?edge.proxy_protocol.allowed_vpce_ids,
                workers = waiting.len(),
                "listening"
            );
            let mut loops = JoinSet::new();
            for (listener, worker) in waiting.into_iter().zip(&self.workers) {
                let edges = served.edge.subscribe();
                let accepting = accepting.clone();
                let serve = move |stream, peer, listen, permit: OwnedSemaphorePermit| {
                    let proxy = Arc::clone(&accepting.proxy);
                    let edge = Arc::clone(&edges.borrow());
                    let stop = accepting.stop_connections.clone();
                    // On the worker that accepted it (the loop's runtime).
                    accepting.connections.spawn(async move {
                        proxy.serve(stream, peer, listen, edge, stop).await;
                        drop(permit);
                    });
                };
                let accept_loop =
                    listener.accept_loop(served.stop.clone(), Arc::clone(&accepting.slots), serve);
                loops.spawn_on(accept_loop, worker);
            }
            let addr = served.addr;
            self.accept_loops.spawn(async move {
                while loops.join_next().await.is_some() {}
                tracing::info!(listen = %addr, "listener closed");
            });
        }
    }

    /// A reload: binds the listeners `configs` adds (nothing changes when
    /// one fails), then updates the kept ones' edge settings, stops the
    /// removed ones and starts the added ones. Returns the addresses added
    /// and removed.
    pub fn reload(
        &mut self,
        configs: &[ListenerConfig],
        tcp: &TcpConfig,
        accepting: &Accepting,
    ) -> Result<(Vec<ListenAddr>, Vec<ListenAddr>), BindError> {
        let running: Vec<_> = self.served.iter().map(|s| (s.configured, s.addr)).collect();
        let wanted: Vec<_> = configs.iter().map(|c| c.addr).collect();
        let kept = keep(&running, &wanted);
        let mut added = Vec::new();
        for (config, _) in configs.iter().zip(&kept).filter(|(_, k)| k.is_none()) {
            let listener = Listener::bind(config.addr)?;
            with_options(&listener, tcp)?;
            added.push(self.served(Bound { configured: config.addr, listener }, &config.edge)?);
        }
        // The kept listeners take the new options past the point where the
        // reload may still fail: an option a validated value cannot be set
        // to on a listening socket is logged, the old one stays.
        for served in &self.served {
            if let Err(error) = crate::sockopt::apply(&served.fd, tcp) {
                tracing::warn!(listen = %served.addr, %error, "SIGHUP: the new TCP options on a kept listener");
            }
        }
        let added_addrs = added.iter().map(|s| s.addr).collect();
        let mut old: Vec<Option<Served>> = self.served.drain(..).map(Some).collect();
        let mut added = added.into_iter();
        for (config, keep) in configs.iter().zip(kept) {
            let served = match keep.and_then(|i| old[i].take()) {
                Some(served) => {
                    served.edge.send_replace(Arc::clone(&config.edge));
                    served
                }
                None => added.next().expect("one bound listener per added address"),
            };
            self.served.push(served);
        }
        let removed = old.into_iter().flatten().map(|s| {
            s.stop.cancel();
            s.addr
        });
        let removed = removed.collect();
        self.start(accepting);
        Ok((added_addrs, removed))
    }

    /// Stops every accept loop and waits for them (the listening sockets
    /// close; a process that took them over keeps its own copies open).
    pub async fn close(&mut self) {
        self.stop_accepting.cancel();
        while self.accept_loops.join_next().await.is_some() {}
        self.served.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> ListenAddr {
        ListenAddr(s.parse().unwrap())
    }

    #[test]
    fn fixed_ports_match_the_bound_address_port_zero_the_configured_one() {
        let running = [
            (a("127.0.0.1:0"), a("127.0.0.1:40001")),
            (a("127.0.0.1:0"), a("127.0.0.1:40002")),
            (a("127.0.0.1:443"), a("127.0.0.1:443")),
        ];
        assert_eq!(
            keep(&running, &[a("127.0.0.1:443"), a("127.0.0.1:0"), a("127.0.0.1:444")]),
            [Some(2), Some(0), None]
        );
        assert_eq!(keep(&running, &[a("127.0.0.1:40002"), a("127.0.0.1:0")]), [Some(1), Some(0)]);
        assert_eq!(
            keep(&running, &[a("0.0.0.0:443"), a("127.0.0.1:0"), a("127.0.0.1:0"), a("127.0.0.1:0")]),
            [None, Some(0), Some(1), None]
        );
    }
}
