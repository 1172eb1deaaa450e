//! SIGHUP: the configuration file is read and validated again (with the
//! same command-line flags, which still win) and applied to new
//! connections: listeners added and removed, each listener's edge settings
//! (routes, allowed names and VPC endpoints, timeouts), the connection
//! limit, DNS, connect and TCP settings, the drain timings, the probed
//! upstreams and the XDP allow list. Open connections keep what they started
//! with. Whatever can fail (validation, a new resolver, binding the added
//! listeners) is done before anything changes, so a rejected file leaves
//! the running configuration wholly in force. Settings fixed at start-up
//! keep their running value and are logged ([`crate::config::NeedsRestart`]).

use std::sync::Arc;

use tokio::sync::Semaphore;

use super::{Server, probes::targets, source_filter};
use crate::{
    config::{Config, ConfigError},
    dns::ResolveError,
    proxy::PathSettings,
    server::listeners::socket::BindError,
};

#[derive(Debug, thiserror::Error)]
pub(super) enum ReloadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("field `dns_servers` (--dns-server): {0}")]
    Resolver(#[from] ResolveError),
    #[error("field `listen` (--listen): {0}")]
    Bind(#[from] BindError),
}

/// The connection limit: the slots accept loops take a permit from.
pub(super) struct ConnectionLimit {
    pub slots: Arc<Semaphore>,
    limit: usize,
}

impl ConnectionLimit {
    pub fn new(limit: usize) -> Self {
        Self { slots: Arc::new(Semaphore::new(limit)), limit }
    }

    /// A higher limit frees slots at once; a lower one takes slots away as
    /// open connections close (new ones wait meanwhile), cutting none.
    pub fn set(&mut self, limit: usize) {
        if limit > self.limit {
            self.slots.add_permits(limit - self.limit);
        } else if limit < self.limit {
            let fewer = u32::try_from(self.limit - limit).unwrap_or(u32::MAX);
            let slots = Arc::clone(&self.slots);
            tokio::spawn(async move {
                if let Ok(permits) = slots.acquire_many_owned(fewer).await {
                    permits.forget();
                }
            });
        }
        self.limit = limit;
    }
}

impl Server {
    /// Reloads the configuration, logging and counting the outcome.
    pub(super) fn reload(&mut self) {
        let ok = match self.try_reload() {
            Ok(()) => true,
            Err(error) => {
                tracing::error!(
                    %error,
                    "SIGHUP: configuration rejected; the running configuration stays in force"
                );
                false
            }
        };
        self.proxy.metrics().reloaded(ok);
    }

    fn try_reload(&mut self) -> Result<(), ReloadError> {
        let file = Config::load(&self.flags)?;
        let (new, fixed) = self.config.keep_fixed_settings(file, self.sockmap_capacity);
        for setting in &fixed {
            tracing::warn!(
                key = setting.key,
                running = setting.running,
                file = setting.file,
                "SIGHUP: changing this setting needs a restart; it keeps its running value"
            );
        }
        let path = PathSettings::new(&new, Some(&self.proxy.path()))?;
        let (added, removed) = self.listeners.reload(&new.listeners, &new.tcp, &self.accepting)?;
        // Nothing below fails: the new configuration is in force from here.
        self.proxy.set_path(path);
        self.limit.set(new.max_connections);
        let targets = targets(&new);
        self.health.set_targets(&targets, new.admin.readiness_window());
        self.probes.set(&targets, new.admin.probe_interval);
        if let Some(filter) = &mut self.source_filter {
            // Each running listener's list on its port: added ports guarded,
            // removed ones no longer.
            source_filter::apply(filter, &new, &self.listeners.listening());
        }
        let strings =
            |addrs: &[crate::addr::ListenAddr]| addrs.iter().map(ToString::to_string).collect::<Vec<_>>();
        tracing::info!(
            added = ?strings(&added),
            removed = ?strings(&removed),
            listeners = ?strings(&self.listeners.addrs()),
            max_connections = new.max_connections,
            needs_restart = fixed.len(),
            "SIGHUP: configuration reloaded"
        );
        self.config = new;
        Ok(())
    }
}
