//! The value of every setting left out of both the flags and the file. The
//! configuration applies these constants and `--help` prints them
//! ([`shown_in_help`]), so the two cannot disagree.

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    num::NonZeroUsize,
    time::Duration,
};

use crate::{
    config::{DnsFamily, ListenSockets, LogFormat},
    dataplane::DataPlaneChoice,
    edge::{ChainedHeaders, ProxyProtocolMode},
};

pub const PROXY_PROTOCOL: ProxyProtocolMode = ProxyProtocolMode::Off;
pub const CHAINED_PROXY_HEADERS: ChainedHeaders = ChainedHeaders::Refuse;
pub const PROXY_HEADER_TIMEOUT: Duration = Duration::from_secs(5);
pub const CLIENT_HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Short enough that a rotated ENI is followed within seconds, long enough
/// that a burst of connections makes one lookup.
pub const DNS_MAX_TTL: Duration = Duration::from_secs(5);
pub const DNS_TIMEOUT: Duration = Duration::from_secs(2);
/// Both: the proxy cannot know whether the upstream's VPC has IPv6.
pub const DNS_FAMILY: DnsFamily = DnsFamily::Any;
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
pub const FAILED_ADDRESS_HOLD: Duration = Duration::from_secs(10);
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// An NLB with a 10 s health-check interval and a threshold of 3 failures
/// takes 30 s to mark a target unhealthy.
pub const DRAIN_DELAY: Duration = Duration::from_secs(30);
/// Loopback only, so metrics are not served to the NLB's side.
pub const ADMIN_LISTEN: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9901));
pub const PROBE_INTERVAL: Duration = Duration::from_secs(10);
/// Well under the NLB's 350 s idle timeout.
pub const TCP_KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
pub const TCP_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
pub const TCP_KEEPALIVE_COUNT: u32 = 3;
pub const TCP_USER_TIMEOUT: Duration = Duration::from_secs(60);
pub const DATAPLANE: DataPlaneChoice = DataPlaneChoice::Auto;
/// HAProxy's best splice configuration used 1 MiB pipes.
pub const SPLICE_PIPE_SIZE: usize = 1 << 20;
pub const MAX_CONNECTIONS: usize = 65_536;
pub const MAX_INFLIGHT: u64 = 4 << 20;
pub const COPY_BUFFER_SIZE: usize = 128 << 10;
/// Longer than a kubectl request's connection (a handshake, a request, an
/// answer), short for a watch or a stream, whose bytes the program then
/// carries.
pub const PACKET_SWITCH_AFTER: Duration = Duration::from_secs(1);
/// A bulk copy is relayed by hand for this much at most, a few hundred
/// microseconds of the proxy's CPU, before the program carries it.
pub const PACKET_SWITCH_AFTER_BYTES: u64 = 1 << 20;
/// A kubectl request's connection (a TLS handshake, a request, an answer
/// that is not large) makes a few dozen reads at most; a connection that
/// makes more is chatty, and joined after costing the proxy about as many
/// calls by hand as the switch costs several times over.
pub const PACKET_SWITCH_AFTER_READS: u64 = 64;
pub const LOG_FORMAT: LogFormat = LogFormat::Text;
/// On the packet plane (the default, once it started: `auto` falls back to
/// splice without it), with a worker for every CPU the process may run on
/// (the default worker count, unless a CPU quota is below the CPUs),
/// `per-cpu`: each worker pinned to its CPU takes the connections whose SYN
/// that CPU took, so no connection is handed to a worker on another CPU,
/// and the kernel carries the bytes. Otherwise
/// `shared`: a socket every worker accepts on, so whichever is free takes
/// the next connection; on the planes whose workers move the bytes, a
/// pinned worker cannot leave a CPU its streams crowd (docs/configuration.md).
/// One worker is not pinned unless asked.
#[must_use]
pub fn listen_sockets(workers: usize, cpus: usize, packet_plane: bool) -> ListenSockets {
    if packet_plane && workers > 1 && workers == cpus { ListenSockets::PerCpu } else { ListenSockets::Shared }
}

/// [`listen_sockets`], as the defaults are listed.
pub const LISTEN_SOCKETS: &str = "per-cpu on the packet plane with a worker per CPU, else shared";

/// One worker per CPU this process may use (its affinity and its cgroup's
/// CPU quota), as nginx's `worker_processes auto` and HAProxy's `nbthread`.
#[must_use]
pub fn workers() -> NonZeroUsize {
    std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN)
}

/// The name a value of a `ValueEnum` has on the command line and in the file.
pub fn value_name<T: clap::ValueEnum>(v: &T) -> String {
    v.to_possible_value().map(|p| p.get_name().to_owned()).unwrap_or_default()
}

/// Each flag's id (its field name) with the default `--help` shows for it.
#[must_use]
pub fn shown_in_help() -> Vec<(&'static str, String)> {
    let duration = |d: Duration| humantime::format_duration(d).to_string();
    vec![
        ("proxy_protocol", value_name(&PROXY_PROTOCOL)),
        ("chained_proxy_headers", value_name(&CHAINED_PROXY_HEADERS)),
        ("proxy_header_timeout", duration(PROXY_HEADER_TIMEOUT)),
        ("client_hello_timeout", duration(CLIENT_HELLO_TIMEOUT)),
        ("dns_max_ttl", duration(DNS_MAX_TTL)),
        ("dns_timeout", duration(DNS_TIMEOUT)),
        ("dns_family", value_name(&DNS_FAMILY)),
        ("connect_timeout", duration(CONNECT_TIMEOUT)),
        ("failed_address_hold", duration(FAILED_ADDRESS_HOLD)),
        ("drain_timeout", duration(DRAIN_TIMEOUT)),
        ("drain_delay", duration(DRAIN_DELAY)),
        ("admin_listen", ADMIN_LISTEN.to_string()),
        ("probe_interval", duration(PROBE_INTERVAL)),
        ("tcp_keepalive_idle", duration(TCP_KEEPALIVE_IDLE)),
        ("tcp_keepalive_interval", duration(TCP_KEEPALIVE_INTERVAL)),
        ("tcp_keepalive_count", TCP_KEEPALIVE_COUNT.to_string()),
        ("tcp_user_timeout", duration(TCP_USER_TIMEOUT)),
        ("dataplane", value_name(&DATAPLANE)),
        ("splice_pipe_size", SPLICE_PIPE_SIZE.to_string()),
        ("max_connections", MAX_CONNECTIONS.to_string()),
        ("workers", "one per CPU".to_owned()),
        ("listen_sockets", LISTEN_SOCKETS.to_owned()),
        ("max_inflight", MAX_INFLIGHT.to_string()),
        ("copy_buffer_size", COPY_BUFFER_SIZE.to_string()),
        ("packet_switch_after", duration(PACKET_SWITCH_AFTER)),
        ("packet_switch_after_bytes", PACKET_SWITCH_AFTER_BYTES.to_string()),
        ("packet_switch_after_reads", PACKET_SWITCH_AFTER_READS.to_string()),
        ("log_format", value_name(&LOG_FORMAT)),
    ]
}

#[cfg(test)]
mod tests {
    use super::{ListenSockets, listen_sockets};

    #[test]
    fn listen_sockets_are_per_cpu_only_on_the_packet_plane_with_a_worker_per_cpu() {
        assert_eq!(listen_sockets(4, 4, true), ListenSockets::PerCpu);
        assert_eq!(listen_sockets(2, 4, true), ListenSockets::Shared, "a CPU quota below the CPUs");
        assert_eq!(listen_sockets(8, 4, true), ListenSockets::Shared, "more workers than CPUs");
        assert_eq!(listen_sockets(1, 1, true), ListenSockets::Shared, "one worker is not pinned");
        assert_eq!(
            listen_sockets(4, 4, false),
            ListenSockets::Shared,
            "a plane whose workers move the bytes"
        );
    }
}
