//! The listeners the server accepts on, as a set a SIGHUP reload changes:
//! a listener kept gets its new edge settings (for the connections it
//! accepts from then on), a removed one stops accepting and closes (its open
//! connections go on), an added one is bound before anything else changes.
//! A listener is one socket or an SO_REUSEPORT group of sockets on one
//! address (`listen_sockets`): one socket that every worker accepts on, so
//! whichever worker is free takes the next connection, but every idle
//! worker's event loop wakes for it and all but one find nothing to accept;
//! or one socket per worker, accepted on by its worker alone, so the
//! kernel's pick (a hash of the connection's addresses) wakes one worker,
//! busy or not. Each keeps a second descriptor of every socket of its group
//! to hand to a new process on a graceful upgrade ([`super::upgrade`]): a
//! socket closed with connections in its accept queue would reset them. The
//! sockets and their accept loop: [`socket`].

pub mod socket;
mod steering;

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
use super::workers::Workers;

use crate::{addr::ListenAddr, config::ListenerConfig, edge::EdgeConfig, proxy::Proxy, sockopt::TcpConfig};

/// What every accept loop hands its connections to.
#[derive(Clone)]
pub(super) struct Accepting {
    pub proxy: Arc<Proxy>,
    pub connections: TaskTracker,
    pub stop_connections: CancellationToken,
    pub slots: Arc<Semaphore>,
}

/// A listener's sockets, bound (or inherited) but perhaps not accepting yet.
pub(super) struct Bound {
    /// The address as configured (port 0 stays 0).
    pub configured: ListenAddr,
    /// Never empty: as many sockets as `listen_sockets` asks for when bound
    /// here (one alone, or an SO_REUSEPORT group of one per worker), the old
    /// process's sockets when handed over.
    pub sockets: Vec<Listener>,
}

impl Bound {
    /// A new listener on `configured`: one socket of its own (`sockets` 1:
    /// a program binding the port with SO_REUSEPORT cannot join it), or a
    /// group of `sockets`.
    pub fn bind(configured: ListenAddr, sockets: usize) -> Result<Self, BindError> {
        if sockets <= 1 {
            return Ok(Self { configured, sockets: vec![Listener::bind(configured)?] });
        }
        let first = Listener::bind_group(configured)?;
        let addr = first.addr;
        let mut group = vec![first];
        while group.len() < sockets {
            group.push(group[0].join().map_err(|source| BindError { addr, source })?);
        }
        Ok(Self { configured, sockets: group })
    }
}

struct Served {
    configured: ListenAddr,
    addr: ListenAddr,
    edge: watch::Sender<Arc<EdgeConfig>>,
    /// Ends this listener's accept loop (a child of the set's).
    stop: CancellationToken,
    /// A second descriptor of each socket of the group, for a graceful upgrade.
    fds: Vec<OwnedFd>,
    /// Until the accept loops start, a descriptor for each: the worker (an
    /// index into the set's) and the socket registered with it.
    waiting: Vec<(usize, Listener)>,
}

/// Every listener of the server.
pub(super) struct ListenerSet {
    served: Vec<Served>,
    /// Where the accept loops run (each serves what it accepts).
    workers: Vec<Handle>,
    /// With `listen_sockets = "per-cpu"`, the CPU each worker is pinned to.
    cpu_of_worker: Option<Vec<usize>>,
    /// The sockets of a listener bound here (1: shared by the workers).
    sockets_per_listener: usize,
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
    /// accepted on by `workers`; a listener a reload adds gets
    /// `sockets_per_listener` sockets.
    pub fn new(
        bound: Vec<Bound>,
        configs: &[ListenerConfig],
        tcp: &TcpConfig,
        workers: &Workers,
        sockets_per_listener: usize,
    ) -> Result<Self, BindError> {
        let mut set = Self {
            served: Vec::new(),
            workers: workers.handles().to_vec(),
            cpu_of_worker: workers.cpus().map(<[usize]>::to_vec),
            sockets_per_listener,
            accept_loops: JoinSet::new(),
            stop_accepting: CancellationToken::new(),
        };
        for (b, config) in bound.into_iter().zip(configs) {
            set.served.push(set.served(b, &config.edge, tcp)?);
        }
        Ok(set)
    }

    /// `b` with the TCP options `tcp` on each of its sockets, a descriptor
    /// of each registered with the worker that will accept on it, and its
    /// new connections steered to the worker on their CPU (`per-cpu`) or
    /// left to the kernel's hash.
    fn served(&self, b: Bound, edge: &Arc<EdgeConfig>, tcp: &TcpConfig) -> Result<Served, BindError> {
        for socket in &b.sockets {
            with_options(socket, tcp)?;
        }
        let addr = b.sockets[0].addr;
        let error = |source| BindError { addr, source };
        self.steer(&b.sockets).map_err(error)?;
        let fds = b.sockets.iter().map(|s| s.as_fd().try_clone_to_owned()).collect::<Result<_, _>>();
        // Every worker accepts on a socket and every socket has a worker: a
        // group with fewer sockets than workers (handed over by a process
        // with fewer workers, or one whose sockets were not a group) is
        // shared by some workers, one with more has a worker accept on more
        // than one.
        let pairs = b.sockets.len().max(self.workers.len());
        let waiting = (0..pairs)
            .map(|i| {
                let worker = self.worker_of(i);
                let socket = &b.sockets[i % b.sockets.len()];
                Ok((worker, socket.on_worker(&self.workers[worker])?))
            })
            .collect::<std::io::Result<_>>();
        Ok(Served {
            configured: b.configured,
            addr,
            edge: watch::Sender::new(Arc::clone(edge)),
            stop: self.stop_accepting.child_token(),
            fds: fds.map_err(error)?,
            waiting: waiting.map_err(error)?,
        })
    }

    /// The worker of the `i`th pair of worker and socket of a group (the
    /// first worker to accept on socket `i`).
    fn worker_of(&self, i: usize) -> usize {
        i % self.workers.len()
    }

    /// With `per-cpu`, steers the group's connections to the socket of the
    /// worker on the CPU that took their SYN; otherwise takes off a
    /// program a handed-over group may carry from a `per-cpu` process, so
    /// the kernel's hash spreads them as the mode says.
    fn steer(&self, group: &[Listener]) -> std::io::Result<()> {
        let steering = match &self.cpu_of_worker {
            // One socket (one worker, or a handed-over shared socket) has
            // nothing to steer between.
            Some(_) if group.len() == 1 => Ok(()),
            Some(cpus) => {
                let cpu_of_socket: Vec<usize> = (0..group.len()).map(|i| cpus[self.worker_of(i)]).collect();
                steering::steer_by_cpu(&group[0], &cpu_of_socket)
            }
            None if group.len() > 1 => steering::stop_steering(&group[0]),
            None => Ok(()),
        };
        steering.map_err(|e| std::io::Error::new(e.kind(), format!("steering new connections by CPU: {e}")))
    }

    /// The bound addresses.
    pub fn addrs(&self) -> Vec<ListenAddr> {
        self.served.iter().map(|s| s.addr).collect()
    }

    /// Each listener's configured address and bound port, in configuration
    /// order (for the XDP source filter's lists).
    pub fn listening(&self) -> Vec<super::source_filter::Listening> {
        self.served.iter().map(|s| (s.configured.0, s.addr.0.port())).collect()
    }

    /// Each listener's configured and bound address with a new descriptor of
    /// each socket of its group, for a new process.
    pub fn handover(&self) -> std::io::Result<Vec<(ListenAddr, ListenAddr, OwnedFd)>> {
        let sockets = self.served.iter().flat_map(|s| s.fds.iter().map(move |fd| (s, fd)));
        sockets.map(|(s, fd)| Ok((s.configured, s.addr, fd.try_clone()?))).collect()
    }

    /// Starts the accept loops of every listener not accepting yet, one on
    /// each worker for each socket it has; once all of a listener's have
    /// ended, it logs that it closed.
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
                sockets = served.fds.len(),
                workers = self.workers.len(),
                "listening"
            );
            let mut loops = JoinSet::new();
            for (worker, listener) in waiting {
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
                loops.spawn_on(accept_loop, &self.workers[worker]);
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
            let bound = Bound::bind(config.addr, self.sockets_per_listener)?;
            added.push(self.served(bound, &config.edge, tcp)?);
        }
        // The kept listeners take the new options past the point where the
        // reload may still fail: an option a validated value cannot be set
        // to on a listening socket is logged, the old one stays.
        for served in &self.served {
            if let Some(error) = served.fds.iter().find_map(|fd| crate::sockopt::apply(fd, tcp).err()) {
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
