//! Readiness: the proxy can serve new connections now. Ready = not draining
//! AND, for every upstream target, a resolution and a TCP connect succeeded
//! within the readiness window (client connections and the background probe
//! both count). Liveness (/healthz) needs no state: the process answers.
//!
//! Timestamps are atomics (milliseconds since start-up), so recording a
//! success on the data path takes no lock. The drain flag is a watch channel,
//! so the TCP health port ([`crate::health_port`]) closes the moment a drain starts.

use std::{
    fmt::Write as _,
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::sync::watch;

use crate::addr::UpstreamTarget;

/// One upstream target's last successes.
#[derive(Debug)]
struct TargetHealth {
    target: UpstreamTarget,
    /// Milliseconds since `Health::started` + 1 of the last success; 0 = never.
    resolved: AtomicU64,
    connected: AtomicU64,
}

/// Shared readiness state.
#[derive(Debug)]
pub struct Health {
    started: Instant,
    /// The targets and the window; a SIGHUP reload may replace both.
    targets: RwLock<Targets>,
    draining: watch::Sender<bool>,
}

#[derive(Debug)]
struct Targets {
    window: Duration,
    list: Vec<Arc<TargetHealth>>,
}

/// The readiness answer with its reasons.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    pub ready: bool,
    /// Why not (empty when ready).
    pub reasons: Vec<String>,
    /// Per target: ready or not.
    pub targets: Vec<(String, bool)>,
}

impl Readiness {
    /// The /readyz body: `ready`, or `not ready` and one reason per line.
    #[must_use]
    pub fn body(&self) -> String {
        let mut text = String::from(if self.ready { "ready\n" } else { "not ready\n" });
        for reason in &self.reasons {
            let _ = writeln!(text, "{reason}");
        }
        text
    }
}

impl Health {
    /// `targets`: every upstream of every listener; `window`: how long a
    /// success counts.
    #[must_use]
    pub fn new(targets: &[UpstreamTarget], window: Duration) -> Self {
        let health = Self {
            started: Instant::now(),
            targets: RwLock::new(Targets { window, list: Vec::new() }),
            draining: watch::Sender::new(false),
        };
        health.set_targets(targets, window);
        health
    }

    /// A reload: these targets and window from now on. A target kept keeps
    /// its last successes; a new one has none yet.
    pub fn set_targets(&self, targets: &[UpstreamTarget], window: Duration) {
        let mut current = self.targets.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        let list = targets
            .iter()
            .map(|t| {
                current.list.iter().find(|h| h.target == *t).map_or_else(
                    || {
                        Arc::new(TargetHealth {
                            target: t.clone(),
                            resolved: AtomicU64::new(0),
                            connected: AtomicU64::new(0),
                        })
                    },
                    Arc::clone,
                )
            })
            .collect();
        *current = Targets { window, list };
    }

    fn stamp(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1
    }

    fn target(&self, target: &UpstreamTarget) -> Option<Arc<TargetHealth>> {
        let targets = self.targets.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        targets.list.iter().find(|t| t.target == *target).cloned()
    }

    /// `target` resolved just now.
    pub fn resolved(&self, target: &UpstreamTarget) {
        if let Some(t) = self.target(target) {
            t.resolved.store(self.stamp(), Ordering::Relaxed);
        }
    }

    /// An address of `target` accepted a connection just now.
    pub fn connected(&self, target: &UpstreamTarget) {
        if let Some(t) = self.target(target) {
            t.connected.store(self.stamp(), Ordering::Relaxed);
        }
    }

    /// Starts the drain: not ready from now on. Returns false when a drain had
    /// already started.
    pub fn start_drain(&self) -> bool {
        !self.draining.send_replace(true)
    }

    #[must_use]
    pub fn is_draining(&self) -> bool {
        *self.draining.borrow()
    }

    /// Watches the drain flag.
    #[must_use]
    pub fn subscribe_drain(&self) -> watch::Receiver<bool> {
        self.draining.subscribe()
    }

    /// The readiness now, with reasons.
    #[must_use]
    pub fn readiness(&self) -> Readiness {
        let now = self.stamp();
        let current = self.targets.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        let window = u64::try_from(current.window.as_millis()).unwrap_or(u64::MAX);
        // A connection on a worker thread may stamp a success after `now`
        // was read: that success is recent, not 584 million years old.
        let recent = |stamp: u64| stamp != 0 && now.saturating_sub(stamp) <= window;
        let mut reasons = Vec::new();
        if self.is_draining() {
            reasons.push("draining (SIGTERM)".to_owned());
        }
        let mut targets = Vec::new();
        for t in &current.list {
            let mut ok = true;
            for (what, stamp) in [("resolution", &t.resolved), ("connect", &t.connected)] {
                if !recent(stamp.load(Ordering::Relaxed)) {
                    ok = false;
                    reasons.push(format!(
                        "{}: no successful {what} in the last {}",
                        t.target,
                        humantime::format_duration(current.window)
                    ));
                }
            }
            targets.push((t.target.to_string(), ok));
        }
        Readiness { ready: reasons.is_empty(), reasons, targets }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(name: &str) -> UpstreamTarget {
        name.parse().unwrap()
    }

    #[test]
    fn ready_needs_a_resolution_and_a_connect_for_every_target_and_no_drain() {
        let (a, b) = (target("a.example.com:443"), target("b.example.com:443"));
        let health = Health::new(&[a.clone(), b.clone()], Duration::from_secs(30));
        let r = health.readiness();
        assert!(!r.ready);
        assert_eq!(r.reasons.len(), 4, "{r:?}");
        health.resolved(&a);
        health.connected(&a);
        health.resolved(&b);
        let r = health.readiness();
        assert!(!r.ready);
        assert_eq!(r.reasons, ["b.example.com:443: no successful connect in the last 30s"]);
        assert_eq!(
            r.targets,
            [("a.example.com:443".to_owned(), true), ("b.example.com:443".to_owned(), false)]
        );
        health.connected(&b);
        // A target nobody configured changes nothing.
        health.connected(&target("c.example.com:443"));
        assert!(health.readiness().ready);
        assert_eq!(health.readiness().body(), "ready\n");
        assert!(health.start_drain());
        assert!(!health.start_drain(), "a second drain is not a new one");
        let r = health.readiness();
        assert!(!r.ready);
        assert_eq!(r.body(), "not ready\ndraining (SIGTERM)\n");
    }

    #[test]
    fn a_success_stamped_while_readiness_is_read_counts_as_recent() {
        let a = target("a.example.com:443");
        let health = Health::new(std::slice::from_ref(&a), Duration::from_secs(30));
        let t = health.target(&a).unwrap();
        // As when a worker thread stamps between readiness's clock read and
        // its load of the stamp.
        let later = health.stamp() + 60_000;
        t.resolved.store(later, Ordering::Relaxed);
        t.connected.store(later, Ordering::Relaxed);
        assert!(health.readiness().ready, "{:?}", health.readiness());
    }

    #[test]
    fn successes_expire_after_the_window() {
        let a = target("a.example.com:443");
        let health = Health::new(std::slice::from_ref(&a), Duration::from_millis(50));
        health.resolved(&a);
        health.connected(&a);
        assert!(health.readiness().ready);
        std::thread::sleep(Duration::from_millis(120));
        let r = health.readiness();
        assert!(!r.ready);
        assert!(r.reasons[0].contains("no successful resolution in the last 50ms"), "{r:?}");
    }

    #[test]
    fn a_reload_keeps_the_successes_of_kept_targets() {
        let (a, b) = (target("a.example.com:443"), target("b.example.com:443"));
        let health = Health::new(std::slice::from_ref(&a), Duration::from_secs(30));
        health.resolved(&a);
        health.connected(&a);
        health.set_targets(&[a.clone(), b.clone()], Duration::from_secs(60));
        let r = health.readiness();
        assert_eq!(
            r.targets,
            [("a.example.com:443".to_owned(), true), ("b.example.com:443".to_owned(), false)]
        );
        assert!(r.reasons[0].contains("in the last 1m"), "{r:?}");
        health.set_targets(std::slice::from_ref(&a), Duration::from_secs(30));
        assert!(health.readiness().ready);
    }
}
