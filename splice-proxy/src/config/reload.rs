//! What a SIGHUP reload may change. Listeners, routes, allow lists, limits
//! and timeouts take effect for new connections; the settings below are
//! fixed when the process starts (the data plane and its buffers, the admin
//! and health-check addresses, the log format, the XDP interfaces, and on
//! sockmap a connection limit above the one its maps were sized for). A
//! reloaded file that changes one of them keeps it at the running value and
//! says so.

use std::fmt::Debug;

use super::Config;

/// A setting the file changed that only a restart applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NeedsRestart {
    /// The config key(s).
    pub key: &'static str,
    /// The running value (kept).
    pub running: String,
    /// The value in the file (not applied).
    pub file: String,
}

impl Config {
    /// `new` with every setting that cannot change at runtime put back to
    /// this (running) configuration's value, and the list of those that the
    /// file changed. `sockmap_capacity`: the connections the sockmap maps
    /// were sized for, when that plane runs.
    #[must_use]
    pub fn keep_fixed_settings(
        &self,
        mut new: Config,
        sockmap_capacity: Option<usize>,
    ) -> (Config, Vec<NeedsRestart>) {
        let mut changed = Vec::new();
        let mut keep = |key: &'static str, running: &dyn Debug, file: &dyn Debug| {
            let (running, file) = (format!("{running:?}"), format!("{file:?}"));
            if running != file {
                changed.push(NeedsRestart { key, running, file });
            }
        };
        keep("dataplane, max_inflight, splice_pipe_size, copy_buffer_size", &self.dataplane, &new.dataplane);
        new.dataplane = self.dataplane;
        keep("packet_interfaces", &self.packet_interfaces, &new.packet_interfaces);
        new.packet_interfaces.clone_from(&self.packet_interfaces);
        keep(
            "packet_switch_after, packet_switch_after_bytes, packet_switch_after_reads",
            &self.packet_switch_after,
            &new.packet_switch_after,
        );
        new.packet_switch_after = self.packet_switch_after;
        keep("workers", &self.workers, &new.workers);
        new.workers = self.workers;
        keep("listen_sockets", &self.listen_sockets, &new.listen_sockets);
        new.listen_sockets = self.listen_sockets;
        keep("admin_listen", &self.admin.listen, &new.admin.listen);
        new.admin.listen = self.admin.listen;
        keep("health_listen", &self.admin.health_listen, &new.admin.health_listen);
        new.admin.health_listen = self.admin.health_listen;
        keep("log_format", &self.log_format, &new.log_format);
        new.log_format = self.log_format;
        keep("upgrade_socket", &self.upgrade_socket, &new.upgrade_socket);
        new.upgrade_socket.clone_from(&self.upgrade_socket);
        // The set of interfaces (top level and every listener's): the filter
        // stays attached where it is; the lists, keyed by port, still reload.
        let interfaces = |c: &Config| c.source_filter.as_ref().map(|f| f.interfaces.clone());
        keep("xdp_interface", &interfaces(self), &interfaces(&new));
        match (&self.source_filter, &mut new.source_filter) {
            (Some(running), Some(file)) => file.interfaces.clone_from(&running.interfaces),
            // Attaching or detaching the filter needs a restart; the list stays as it is.
            (running, file) => file.clone_from(running),
        }
        if let Some(capacity) = sockmap_capacity.filter(|c| new.max_connections > *c) {
            keep("max_connections (above the sockmap maps' size)", &capacity, &new.max_connections);
            new.max_connections = capacity;
        }
        (new, changed)
    }
}

#[cfg(test)]
mod tests {
    use crate::{
        config::{Config, Options},
        dataplane::DataPlaneChoice,
    };

    fn config(extra: impl FnOnce(&mut Options)) -> Config {
        let mut o = Options::listening("127.0.0.1:6443", "api.example.com:443");
        extra(&mut o);
        Config::from_options(o).unwrap()
    }

    #[test]
    fn fixed_settings_are_kept_and_named() {
        let running = config(|_| {});
        let file = config(|o| {
            o.dataplane = Some(DataPlaneChoice::Copy);
            o.admin_listen = Some("127.0.0.1:9999".parse().unwrap());
            o.max_connections = Some(10);
            o.connect_timeout = Some(std::time::Duration::from_secs(7));
        });
        let (kept, changed) = running.keep_fixed_settings(file, None);
        let keys: Vec<_> = changed.iter().map(|c| c.key).collect();
        assert_eq!(keys, ["dataplane, max_inflight, splice_pipe_size, copy_buffer_size", "admin_listen"]);
        assert_eq!(kept.dataplane, running.dataplane);
        assert_eq!(kept.admin.listen, running.admin.listen);
        assert_eq!(changed[1].file, "127.0.0.1:9999");
        // Reloadable ones are taken from the file.
        assert_eq!(kept.max_connections, 10);
        assert_eq!(kept.connect.timeout, std::time::Duration::from_secs(7));
    }

    #[test]
    fn sockmap_connections_stay_within_the_maps() {
        let running = config(|o| o.max_connections = Some(100));
        let (kept, changed) =
            running.keep_fixed_settings(config(|o| o.max_connections = Some(200)), Some(100));
        assert_eq!(kept.max_connections, 100);
        assert_eq!(changed[0].file, "200");
        let (kept, changed) =
            running.keep_fixed_settings(config(|o| o.max_connections = Some(50)), Some(100));
        assert_eq!((kept.max_connections, changed.len()), (50, 0));
    }

    #[test]
    fn the_set_of_xdp_interfaces_is_kept_and_named() {
        let filtered = |o: &mut Options| {
            o.listener.xdp_interface = Some("lo".into());
            o.listener.allowed_source_cidrs = Some(vec!["192.0.2.0/24".parse().unwrap()]);
        };
        let running = config(filtered);
        let mut file = config(|o| {
            filtered(o);
            o.listener.allowed_source_cidrs = Some(vec!["10.0.0.0/8".parse().unwrap()]);
        });
        // A listener of the file on a second interface (validated as existing).
        file.source_filter.as_mut().unwrap().interfaces.insert("xf-a".into());
        let (kept, changed) = running.keep_fixed_settings(file.clone(), None);
        assert_eq!(changed.len(), 1, "{changed:?}");
        assert_eq!(
            (changed[0].key, changed[0].running.as_str(), changed[0].file.as_str()),
            ("xdp_interface", "Some({\"lo\"})", "Some({\"lo\", \"xf-a\"})")
        );
        assert_eq!(kept.source_filter, running.source_filter);
        // The lists still reload.
        assert_eq!(kept.listeners[0].allowed_sources, file.listeners[0].allowed_sources);
    }

    #[test]
    fn unchanged_file_changes_nothing() {
        let running = config(|_| {});
        assert!(running.keep_fixed_settings(running.clone(), None).1.is_empty());
    }
}
