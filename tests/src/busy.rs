//! CPU-bound loops on every core, as on a loaded host: the proxy's threads,
//! the kernel's workers and the test's own ends then wait for a CPU, and
//! rare orderings that an idle machine never shows become likely.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
};

use anyhow::{Context as _, Result};

/// Spinning threads, one per core, until dropped.
pub struct BusyLoops {
    stop: Arc<AtomicBool>,
    /// Rounds the loops completed: proof they ran.
    rounds: Arc<AtomicU64>,
    threads: Vec<JoinHandle<()>>,
}

impl BusyLoops {
    /// One loop per core this process may run on.
    pub fn on_every_core() -> Result<Self> {
        let cores = std::thread::available_parallelism().context("counting the cores")?.get();
        Self::start(cores)
    }

    /// `n` loops.
    pub fn start(n: usize) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(AtomicU64::new(0));
        let threads = (0..n)
            .map(|i| {
                let (stop, rounds) = (Arc::clone(&stop), Arc::clone(&rounds));
                std::thread::Builder::new().name(format!("busy-{i}")).spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let mut x = 0u64;
                        for k in 0..1_000_000u64 {
                            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(k));
                        }
                        rounds.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect::<std::io::Result<Vec<_>>>()
            .context("starting a busy loop")?;
        Ok(Self { stop, rounds, threads })
    }

    /// How many threads spin.
    #[must_use]
    pub fn loops(&self) -> usize {
        self.threads.len()
    }

    /// Rounds of a million steps completed so far, all loops together.
    #[must_use]
    pub fn rounds(&self) -> u64 {
        self.rounds.load(Ordering::Relaxed)
    }
}

impl Drop for BusyLoops {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            // A loop cannot panic; joining only waits for its last round.
            let _ = thread.join();
        }
    }
}
