//! The background probe of every upstream target, one task each; a reload
//! starts the new targets' probes and stops the removed ones' (all of them
//! when the interval changed).

use std::{sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;

use crate::{addr::UpstreamTarget, config::Config, proxy::Proxy};

/// The probe tasks; stopped when dropped.
pub struct Probes {
    proxy: Arc<Proxy>,
    interval: Duration,
    running: Vec<(UpstreamTarget, CancellationToken)>,
    stop: CancellationToken,
}

/// Every upstream of every listener (the default upstream and each route's), once.
pub fn targets(config: &Config) -> Vec<UpstreamTarget> {
    let mut targets: Vec<UpstreamTarget> = Vec::new();
    for target in config.listeners.iter().flat_map(|l| l.edge.upstreams.targets()) {
        if !targets.contains(target) {
            targets.push(target.clone());
        }
    }
    targets
}

impl Probes {
    pub fn new(proxy: Arc<Proxy>) -> Self {
        Self { proxy, interval: Duration::ZERO, running: Vec::new(), stop: CancellationToken::new() }
    }

    /// Cancelling it stops every probe, those a later reload starts too.
    pub fn stopper(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Probes exactly `targets` every `interval` from now on.
    pub fn set(&mut self, targets: &[UpstreamTarget], interval: Duration) {
        let restart = interval != self.interval;
        self.interval = interval;
        self.running.retain(|(target, stop)| {
            let keep = !restart && targets.contains(target);
            if !keep {
                stop.cancel();
            }
            keep
        });
        for target in targets {
            if self.running.iter().any(|(t, _)| t == target) {
                continue;
            }
            let stop = self.stop.child_token();
            tokio::spawn(super::run(Arc::clone(&self.proxy), target.clone(), interval, stop.clone()));
            self.running.push((target.clone(), stop));
        }
    }
}

impl Drop for Probes {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
