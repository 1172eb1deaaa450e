//! RCU grace periods, waited for by many connections with one thread.
//!
//! The receive path runs the tc program and delivers the packet to its
//! socket inside one RCU read-side section (softirq, or a thread with
//! bottom halves off). So once a grace period that began after a flow's
//! hold was written has ended, every packet that saw the entry before the
//! hold has reached its socket, and a look at the sockets then sees all
//! that slipped through. `membarrier(MEMBARRIER_CMD_GLOBAL)` waits for one
//! (`synchronize_rcu`). It blocks for milliseconds, so one thread runs it
//! for every connection waiting at the time, rather than a thread each.

use std::{
    sync::{
        Arc, Condvar, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::sync::watch;

/// `MEMBARRIER_CMD_QUERY` and `MEMBARRIER_CMD_GLOBAL` (linux/membarrier.h),
/// written here: the libc crate does not export them.
const MEMBARRIER_CMD_QUERY: nix::libc::c_long = 0;
const MEMBARRIER_CMD_GLOBAL: nix::libc::c_long = 1;
/// How often the idle thread looks whether the plane is gone.
const IDLE_CHECK: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum GraceError {
    #[error(
        "membarrier(MEMBARRIER_CMD_GLOBAL) is not available (kernel without it, or nohz_full CPUs): \
         the packet plane needs it to confirm each switch; use another data plane"
    )]
    Unsupported,
    #[error("starting the grace-period thread: {0}")]
    Thread(std::io::Error),
}

#[derive(Debug, Default)]
struct Requests {
    /// Someone waits for a grace period that has not started yet.
    wanted: Mutex<bool>,
    wake: Condvar,
    /// Grace periods started so far.
    started: AtomicU64,
}

/// The thread, and the count of grace periods it completed.
#[derive(Debug)]
pub struct GracePeriods {
    requests: Arc<Requests>,
    completed: watch::Receiver<u64>,
}

impl GracePeriods {
    pub fn start() -> Result<Self, GraceError> {
        // SAFETY: membarrier takes no pointers; QUERY returns the supported
        // commands as a bit mask, or -1.
        #[allow(unsafe_code)]
        let supported = unsafe { nix::libc::syscall(nix::libc::SYS_membarrier, MEMBARRIER_CMD_QUERY, 0, 0) };
        if supported < 0 || supported & MEMBARRIER_CMD_GLOBAL == 0 {
            return Err(GraceError::Unsupported);
        }
        let requests = Arc::new(Requests::default());
        let (done, completed) = watch::channel(0);
        let thread_requests = Arc::clone(&requests);
        std::thread::Builder::new()
            .name("grace-periods".into())
            .spawn(move || run(&thread_requests, &done))
            .map_err(GraceError::Thread)?;
        Ok(Self { requests, completed })
    }

    /// Returns once a grace period that began after this call has ended.
    pub async fn wait(&self) {
        // Read before the request: the period that started after this read
        // (its count above `target - 1`) began after the call.
        let target = self.requests.started.load(Ordering::SeqCst) + 1;
        *self.requests.wanted.lock().unwrap_or_else(PoisonError::into_inner) = true;
        self.requests.wake.notify_one();
        let mut completed = self.completed.clone();
        // The sender lives as long as the thread, which outlives every receiver's wait.
        let _ = completed.wait_for(|done| *done >= target).await;
    }
}

/// Waits for a request, counts the period started, waits for it, publishes
/// it; ends once every [`GracePeriods`] is gone.
fn run(requests: &Requests, done: &watch::Sender<u64>) {
    loop {
        {
            let mut wanted = requests.wanted.lock().unwrap_or_else(PoisonError::into_inner);
            while !*wanted {
                if done.is_closed() {
                    return;
                }
                wanted =
                    requests.wake.wait_timeout(wanted, IDLE_CHECK).unwrap_or_else(PoisonError::into_inner).0;
            }
            *wanted = false;
        }
        let period = requests.started.fetch_add(1, Ordering::SeqCst) + 1;
        // SAFETY: as in `GracePeriods::start`; GLOBAL waits for a grace
        // period and returns 0 (it was found supported there).
        #[allow(unsafe_code)]
        unsafe {
            nix::libc::syscall(nix::libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0)
        };
        done.send_replace(period);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waiters_return_after_periods_that_began_after_them() {
        let grace = Arc::new(GracePeriods::start().expect("membarrier on this kernel"));
        for _ in 0..3 {
            let before = grace.requests.started.load(Ordering::SeqCst);
            grace.wait().await;
            assert!(*grace.completed.borrow() > before, "a period that began after the call has ended");
        }
        // Many at once share periods: they all return.
        let mut waits = tokio::task::JoinSet::new();
        for _ in 0..50 {
            let grace = Arc::clone(&grace);
            waits.spawn(async move { grace.wait().await });
        }
        while waits.join_next().await.is_some() {}
        assert!(grace.requests.started.load(Ordering::SeqCst) < 50, "periods were shared");
    }
}
