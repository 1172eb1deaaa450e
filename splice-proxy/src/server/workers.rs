//! The worker threads that accept and serve connections, each a
//! single-threaded tokio runtime: every worker accepts on every listener
//! (through a descriptor of the listening socket registered with its own
//! event loop) and serves each connection it accepted to its end, so a
//! connection never crosses threads. A work-stealing runtime hands a freshly
//! accepted connection to whichever thread is idle, and the wake-ups that
//! takes (an `eventfd` write and a thread woken, several times per
//! connection) are a measurable share of a short connection's cost; a worker
//! that is busy simply does not accept, so the kernel's listen queue
//! balances the workers. Control work (signals, reloads, probes, the data
//! planes' event readers) stays on the main runtime.

use std::{io, num::NonZeroUsize, time::Duration};

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

/// How far ahead each worker's timer wheel is always armed. tokio's timer
/// wakes its own event loop (an `eventfd` write, even from the loop's own
/// thread) whenever a timer is armed earlier than the loop's next wake; a
/// connection arms several (handshake, connect, the packet plane's switch),
/// all seconds away, so a tick this short keeps every one of them later
/// than the next wake, at the cost of a few wakes a second when idle. The
/// tick also closes the worker's DNS query sockets kept past their time.
const TIMER_TICK: Duration = Duration::from_millis(250);

#[derive(Debug, thiserror::Error)]
#[error("cannot start worker thread {index} of {count}: {source}")]
pub struct WorkerError {
    index: usize,
    count: usize,
    source: io::Error,
}

/// The running workers; dropping this ends them (and the tasks still on them).
pub struct Workers {
    handles: Vec<Handle>,
    /// The CPU each worker is pinned to, when pinned.
    cpus: Option<Vec<usize>>,
    stop: CancellationToken,
}

impl Workers {
    /// Starts `count` worker threads, named `worker-N`; with `cpus`, worker
    /// `N` is pinned to `cpus[N]` (there are as many) before it runs anything.
    pub fn start(count: NonZeroUsize, cpus: Option<&[usize]>) -> Result<Self, WorkerError> {
        let count = count.get();
        let stop = CancellationToken::new();
        let cpus_kept = cpus.map(|cpus| cpus[..count.min(cpus.len())].to_vec());
        let mut workers = Self { handles: Vec::with_capacity(count), cpus: cpus_kept, stop };
        for index in 0..count {
            let error = |source| WorkerError { index, count, source };
            // Before the runtime is built: one dropped here, inside the
            // caller's runtime, would panic.
            let cpu = cpus.map(|cpus| cpus.get(index).copied().ok_or_else(|| not_pinned(index, cpus.len())));
            let cpu = cpu.transpose().map_err(error)?;
            let runtime =
                tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(error)?;
            workers.handles.push(runtime.handle().clone());
            let stop = workers.stop.clone();
            runtime.spawn(async {
                loop {
                    tokio::time::sleep(TIMER_TICK).await;
                    crate::dns::close_expired_query_sockets();
                }
            });
            let (pinned, told) = std::sync::mpsc::channel();
            // The runtime is dropped on its own thread (dropping one inside
            // another runtime's task would panic); the thread is not joined.
            std::thread::Builder::new()
                .name(format!("worker-{index}"))
                .spawn(move || {
                    let pinning = cpu.map_or(Ok(()), crate::cpus::pin_this_thread);
                    let failed = pinning.is_err();
                    let _ = pinned.send(pinning);
                    if !failed {
                        runtime.block_on(stop.cancelled());
                    }
                })
                .map_err(error)?;
            told.recv()
                .unwrap_or_else(|_| Err(io::Error::other("the thread ended before it was pinned")))
                .map_err(|source| {
                    let cpu = cpu.unwrap_or_default();
                    error(io::Error::new(source.kind(), format!("pinning it to CPU {cpu}: {source}")))
                })?;
        }
        Ok(workers)
    }

    /// One handle per worker, to spawn onto and to register sockets with.
    #[must_use]
    pub fn handles(&self) -> &[Handle] {
        &self.handles
    }

    /// The CPU each worker is pinned to (as many as the workers), if pinned.
    #[must_use]
    pub fn cpus(&self) -> Option<&[usize]> {
        self.cpus.as_deref()
    }
}

fn not_pinned(index: usize, cpus: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("worker {index} has no CPU to be pinned to of {cpus}"),
    )
}

impl Drop for Workers {
    /// Tells every worker to end; their threads finish on their own (not
    /// joined: this may run inside the main runtime, which must not block).
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_worker_runs_what_is_spawned_on_it_on_its_own_thread() {
        let workers = Workers::start(NonZeroUsize::new(2).unwrap(), None).unwrap();
        let names: Vec<String> = workers
            .handles()
            .iter()
            .map(|handle| {
                let (tx, rx) = std::sync::mpsc::channel();
                handle.spawn(async move {
                    tx.send(std::thread::current().name().unwrap_or_default().to_owned()).unwrap();
                });
                rx.recv().unwrap()
            })
            .collect();
        assert_eq!(names, ["worker-0", "worker-1"]);
    }

    #[test]
    fn each_worker_is_pinned_to_its_cpu() {
        let cpus = crate::cpus::allowed().unwrap();
        let workers = Workers::start(NonZeroUsize::new(cpus.len()).unwrap(), Some(&cpus)).unwrap();
        let pinned: Vec<Option<usize>> = workers
            .handles()
            .iter()
            .map(|handle| {
                let (tx, rx) = std::sync::mpsc::channel();
                handle.spawn(async move { tx.send(crate::cpus::pinned_to().unwrap()).unwrap() });
                rx.recv().unwrap()
            })
            .collect();
        assert_eq!(pinned, cpus.iter().copied().map(Some).collect::<Vec<_>>());
    }

    #[test]
    fn a_worker_without_a_cpu_is_an_error() {
        let first = crate::cpus::allowed().unwrap()[0];
        let error =
            Workers::start(NonZeroUsize::new(2).unwrap(), Some(&[first])).err().expect("one CPU for two");
        assert!(error.to_string().contains("worker 1 has no CPU"), "{error}");
    }
}
