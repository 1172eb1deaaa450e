//! The command line laid over the config file: a flag given wins.

use super::Options;

/// `flags` over `file`: a value given as a flag replaces the file's.
pub(super) fn overlay(file: Options, flags: Options) -> Options {
    fn vec_or<T>(flag: Vec<T>, file: Vec<T>) -> Vec<T> {
        if flag.is_empty() { file } else { flag }
    }
    Options {
        config: flags.config,
        // `--listen` replaces every listener of the file, `[[listeners]]` too.
        listeners: if flags.listen.is_empty() { file.listeners } else { Vec::new() },
        listen: vec_or(flags.listen, file.listen),
        listener: flags.listener.over(&file.listener),
        dns_servers: vec_or(flags.dns_servers, file.dns_servers),
        dns_max_ttl: flags.dns_max_ttl.or(file.dns_max_ttl),
        dns_timeout: flags.dns_timeout.or(file.dns_timeout),
        dns_family: flags.dns_family.or(file.dns_family),
        connect_timeout: flags.connect_timeout.or(file.connect_timeout),
        failed_address_hold: flags.failed_address_hold.or(file.failed_address_hold),
        drain_timeout: flags.drain_timeout.or(file.drain_timeout),
        drain_delay: flags.drain_delay.or(file.drain_delay),
        admin_listen: flags.admin_listen.or(file.admin_listen),
        health_listen: flags.health_listen.or(file.health_listen),
        probe_interval: flags.probe_interval.or(file.probe_interval),
        tcp_keepalive_idle: flags.tcp_keepalive_idle.or(file.tcp_keepalive_idle),
        tcp_keepalive_interval: flags.tcp_keepalive_interval.or(file.tcp_keepalive_interval),
        tcp_keepalive_count: flags.tcp_keepalive_count.or(file.tcp_keepalive_count),
        tcp_user_timeout: flags.tcp_user_timeout.or(file.tcp_user_timeout),
        copy_buffer_size: flags.copy_buffer_size.or(file.copy_buffer_size),
        dataplane: flags.dataplane.or(file.dataplane),
        splice_pipe_size: flags.splice_pipe_size.or(file.splice_pipe_size),
        max_inflight: flags.max_inflight.or(file.max_inflight),
        packet_interfaces: flags.packet_interfaces.or(file.packet_interfaces),
        packet_switch_after: flags.packet_switch_after.or(file.packet_switch_after),
        packet_switch_after_bytes: flags.packet_switch_after_bytes.or(file.packet_switch_after_bytes),
        packet_switch_after_reads: flags.packet_switch_after_reads.or(file.packet_switch_after_reads),
        max_connections: flags.max_connections.or(file.max_connections),
        workers: flags.workers.or(file.workers),
        listen_sockets: flags.listen_sockets.or(file.listen_sockets),
        log_format: flags.log_format.or(file.log_format),
        upgrade_socket: flags.upgrade_socket.or(file.upgrade_socket),
    }
}
