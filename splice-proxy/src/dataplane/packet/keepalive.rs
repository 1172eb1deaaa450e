//! Keepalive for the ends of a spliced connection. The proxy's sockets are
//! silent once spliced, so their own keepalive is off; the proxy probes each
//! quiet end itself, as the kernel would: an end that has sent nothing for
//! `--tcp-keepalive-idle` gets a probe from the proxy's socket there (a
//! pure ACK with an old sequence number, which `packet_silence` lets out
//! and the end answers; the answer is rewritten on to the other end like
//! any packet, a duplicate ACK to it), again every
//! `--tcp-keepalive-interval`, and is gone after `--tcp-keepalive-count`
//! probes unanswered, or answered only by RSTs (its socket is gone). The probes and their answers keep a quiet
//! connection's state alive on the path (an NLB forgets a flow idle for
//! 350 s), as the proxy's keepalive does on the other planes, and find an
//! end that vanished without a word.

use std::time::{Duration, Instant};

use proxy_common::PacketRewrite;

use super::{PacketPlane, repair};
use crate::dataplane::transfer::{Side, Sockets};

/// The proxy's keepalive times, applied to the ends of spliced connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeepaliveTimes {
    idle: Duration,
    interval: Duration,
    count: u32,
}

impl From<&crate::sockopt::TcpConfig> for KeepaliveTimes {
    fn from(tcp: &crate::sockopt::TcpConfig) -> Self {
        Self { idle: tcp.keepalive_idle, interval: tcp.keepalive_interval, count: tcp.keepalive_count }
    }
}

/// What an end of a spliced connection needs now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Due {
    Nothing,
    Probe,
    /// Its probes went unanswered: it is gone.
    Gone,
}

/// Keepalive for one end of a spliced connection, as the kernel keeps a
/// socket alive: an end that has sent nothing for the idle time is probed
/// (the proxy's socket there sends a pure ACK with an old sequence number,
/// which the end answers), again every interval, and is gone after as many
/// unanswered probes as the count. The answers are what keeps a quiet
/// connection's state alive on the path (an NLB forgets a flow idle for
/// 350 s), as the proxy's keepalive does on the other planes.
#[derive(Debug)]
pub(super) struct Keepalive {
    /// The end's packets last counted, when that count last moved, and
    /// the probes sent since.
    heard: u64,
    quiet_since: Instant,
    probes: u32,
}

impl Keepalive {
    pub(super) fn new(now: Instant) -> Self {
        Self { heard: 0, quiet_since: now, probes: 0 }
    }

    /// What the end whose packets now count `heard` needs at `now`.
    fn due(&mut self, heard: u64, now: Instant, times: KeepaliveTimes) -> Due {
        if heard != self.heard {
            *self = Self { heard, quiet_since: now, probes: 0 };
            return Due::Nothing;
        }
        if now < self.quiet_since + times.idle + times.interval * self.probes {
            Due::Nothing
        } else if self.probes >= times.count {
            Due::Gone
        } else {
            self.probes += 1;
            Due::Probe
        }
    }
}

/// Probes the quiet ends of a spliced connection (`flows`: the packets of
/// the client's end, the upstream's): whether it sent a probe, or the side
/// of an end that is gone.
pub(super) fn keep_alive(
    plane: &PacketPlane,
    keepalives: &mut [Keepalive; 2],
    flows: [&PacketRewrite; 2],
    sockets: &Sockets,
    now: Instant,
) -> Result<bool, Side> {
    let mut probed = false;
    let ends = [(Side::Downstream, &sockets.client), (Side::Upstream, &sockets.upstream)];
    for ((keepalive, flow), (side, socket)) in keepalives.iter_mut().zip(flows).zip(ends) {
        // A RST is what a stack with no socket answers a probe with.
        match keepalive.due(flow.packets.wrapping_sub(flow.resets), now, plane.keepalive) {
            Due::Nothing => {}
            Due::Gone => return Err(side),
            Due::Probe => {
                probed = true;
                let sent =
                    plane.program().let_probe_out(flow.socket_cookie, || repair::keepalive_probe(socket));
                match sent {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => {
                        tracing::warn!(%error, ?side, "a keepalive probe on a spliced connection")
                    }
                    Err(error) => tracing::warn!(%error, ?side, "letting a keepalive probe out"),
                }
            }
        }
    }
    Ok(probed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quiet_end_is_probed_after_the_idle_time_then_every_interval_and_gone_after_the_count() {
        let times =
            KeepaliveTimes { idle: Duration::from_secs(30), interval: Duration::from_secs(10), count: 3 };
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut end = Keepalive::new(t0);
        let table = [
            // (time, the end's packets, what is due)
            (10, 0, Due::Nothing),
            (29, 0, Due::Nothing),
            (30, 0, Due::Probe),
            (31, 0, Due::Nothing),
            // It answered: quiet again from 35 s.
            (35, 1, Due::Nothing),
            (64, 1, Due::Nothing),
            (65, 1, Due::Probe),
            (75, 1, Due::Probe),
            (80, 1, Due::Nothing),
            (85, 1, Due::Probe),
            (94, 1, Due::Nothing),
            // Three probes unanswered, the third 10 s ago.
            (95, 1, Due::Gone),
        ];
        for (second, heard, want) in table {
            assert_eq!(end.due(heard, at(second), times), want, "at {second} s");
        }
    }
}
