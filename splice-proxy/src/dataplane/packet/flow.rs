//! A spliced connection from the switch to its end, and after.
//!
//! The program's per-flow counters say how far each direction went and
//! whether a FIN or a RST went through; they are read every
//! [`FOLLOW_POLL`] while packets move, at most once a second while none
//! do. The connection ends when a FIN went each way (a half-close carries
//! on in the meantime, end to end) or a RST either way; its access line,
//! metrics and byte counts are then written as on every plane. The proxy's
//! socket on the client's side then closes (repair mode closes silently)
//! and the entries are marked finished: a client that reuses its port for
//! a new connection reaches the listener, the program forgetting the old
//! entry at that SYN. The entries keep rewriting for [`LINGER`] (a FIN
//! retransmitted because its acknowledgement was lost further on still
//! goes through), then drop the flow's late packets for [`QUIET`], so they
//! neither reach a peer nor draw a RST from the proxy's stack; then they
//! go, with the socket on the upstream's side, whose port the proxy's own
//! connections must not reuse under a tuple the program still rewrites.
//!
//! A quiet end is probed ([`super::keepalive`]); one that answers no
//! probe is gone, and the connection ends as its error.
//! A side that answers nothing for the stall timeout (`--tcp-user-timeout`,
//! as on the other planes) while the other repeats itself (retransmissions,
//! window or keepalive probes) is gone (an upstream ENI that disappeared);
//! one that answers but acknowledges nothing new of what the other repeats
//! for that long is stuck: either way the connection ends as that side's
//! error.
//! That, or a stop (the drain timeout, or an immediate stop), lets go of
//! the connection at once: the entries go with the sockets, and both ends
//! are reset ([`super::reset`]), so none is left waiting.

use std::{
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use proxy_common::{PacketFlowKey, PacketRewrite, packet::rewrite_flags};
use tokio_util::sync::CancellationToken;

use super::{
    PacketPlane,
    keepalive::{Keepalive, keep_alive},
    reset::End,
};
use crate::dataplane::transfer::{ByteProgress, Ending, LiveBytes, Side, Sockets, Transfer};

/// How often a spliced connection's counters are read while packets move;
/// while none do, the wait doubles up to [`FOLLOW_POLL_QUIET`], so that the
/// many quiet connections (watches) cost few map reads.
const FOLLOW_POLL: Duration = Duration::from_millis(50);
const FOLLOW_POLL_QUIET: Duration = Duration::from_secs(1);
/// How long the entries keep rewriting after the end.
const LINGER: Duration = Duration::from_secs(2);
/// How long the entries then drop the flow's packets.
const QUIET: Duration = Duration::from_secs(3);

/// The live byte counts of a spliced connection (client to upstream,
/// upstream to client), for `/debug/connections`.
#[derive(Debug)]
struct LiveFlow {
    plane: Arc<PacketPlane>,
    keys: [PacketFlowKey; 2],
}

impl LiveBytes for LiveFlow {
    fn read(&self) -> [u64; 2] {
        let program = self.plane.program();
        self.keys.map(|key| program.flow(&key).ok().flatten().map_or(0, |f| f.bytes))
    }
}

/// Follows the spliced connection of `keys` until it ends or `stop`.
pub(super) async fn follow(
    plane: &Arc<PacketPlane>,
    keys: [PacketFlowKey; 2],
    sockets: Sockets,
    stop: &CancellationToken,
    progress: &ByteProgress,
) -> Transfer {
    progress.attach(Box::new(LiveFlow { plane: Arc::clone(plane), keys }));
    let confirmed = tokio::select! {
        () = plane.grace_periods.wait() => confirm_switch(plane, &sockets),
        () = stop.cancelled() => Err(Ending::Stopped),
    };
    let mut stalls = [Stall::default(), Stall::default()];
    // The client's end (its packets arrive with keys[0]), the upstream's.
    let mut keepalives = [Keepalive::new(Instant::now()), Keepalive::new(Instant::now())];
    let (mut wait, mut packets_seen) = (FOLLOW_POLL, 0);
    let ending = loop {
        if let Err(ending) = confirmed {
            break ending;
        }
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = stop.cancelled() => break Ending::Stopped,
        }
        let flows = {
            let program = plane.program();
            keys.map(|key| program.flow(&key).ok().flatten())
        };
        let packets = flows.iter().flatten().map(|f| f.packets).sum();
        wait = if packets == packets_seen { (wait * 2).min(FOLLOW_POLL_QUIET) } else { FOLLOW_POLL };
        packets_seen = packets;
        if let Some(ending) = ending_of(&flows) {
            break ending;
        }
        if let [Some(up), Some(down)] = &flows {
            let now = Instant::now();
            // A direction whose receiver stopped acknowledging: the
            // upstream's side for bytes going up, the client's going down.
            if stalls[0].stalled(up, down, now, plane.stall_timeout) {
                break Ending::Error(Side::Upstream);
            }
            if stalls[1].stalled(down, up, now, plane.stall_timeout) {
                break Ending::Error(Side::Downstream);
            }
            match keep_alive(plane, &mut keepalives, [up, down], &sockets, now) {
                // Soon again: the answer restarts the end's quiet time.
                Ok(true) => wait = FOLLOW_POLL,
                Ok(false) => {}
                Err(gone) => break Ending::Error(gone),
            }
        }
    };
    let kernel_bytes = progress.settle(|| {
        let program = plane.program();
        let bytes = keys.map(|key| program.flow(&key).ok().flatten().map_or(0, |f| f.bytes));
        (bytes, bytes[0] + bytes[1])
    });
    let mut transfer = Transfer::counted(progress, ending);
    transfer.kernel_bytes = kernel_bytes;
    if matches!(ending, Ending::Stopped | Ending::Error(_)) {
        let_go(plane, &keys, sockets);
    } else {
        tokio::spawn(retire(Arc::clone(plane), keys, sockets));
    }
    transfer
}

/// Once every packet that passed the program before the hold has reached
/// its socket: the sockets must still hold nothing and be established.
/// Otherwise a packet slipped in during the switch, acknowledged by a socket
/// that no longer sends: the connection is cut (both ends reset, by
/// [`let_go`]) rather than continued without its bytes.
fn confirm_switch(plane: &PacketPlane, sockets: &Sockets) -> Result<(), Ending> {
    for (socket, side) in [(&sockets.client, Side::Downstream), (&sockets.upstream, Side::Upstream)] {
        let quiescent = super::repair::queued(socket).is_ok_and(|queued| queued == (0, 0));
        let established = super::repair::negotiated(socket).is_ok_and(|(_, established)| established);
        if !(quiescent && established) {
            plane.counters.switch_races.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                ?side,
                "a packet reached the proxy's socket during the switch: the connection is cut, both ends reset"
            );
            return Err(Ending::Error(side));
        }
    }
    Ok(())
}

/// How the connection ended, if it did: a FIN each way, each acknowledged
/// by its receiver (so every byte before it arrived: a FIN seen while an
/// earlier segment is still to be retransmitted is not the end), or a RST
/// either way. The FINs win over a RST seen in the same poll: both ends had
/// everything, and a RST then (an end answering a late segment after it
/// closed) loses nothing, as on the other planes, whose sockets are done by
/// then. An entry that is gone (it should not be) ends it as an error.
pub(super) fn ending_of(flows: &[Option<PacketRewrite>; 2]) -> Option<Ending> {
    let [Some(up), Some(down)] = flows else { return Some(Ending::Error(Side::Downstream)) };
    if fin_arrived(up, down) && fin_arrived(down, up) {
        Some(Ending::Completed)
    } else if up.rst_seen != 0 {
        Some(Ending::Reset(Side::Downstream))
    } else if down.rst_seen != 0 {
        Some(Ending::Reset(Side::Upstream))
    } else {
        None
    }
}

/// Whether the receiver of one direction still takes the sender's bytes:
/// its sender repeating itself (retransmissions, window or keepalive
/// probes) while, for the timeout, nothing at all comes back from the
/// receiver (it is gone), or what comes back acknowledges none of the
/// bytes the sender waits on (it is stuck: TCP_USER_TIMEOUT's rule, end
/// to end, so that no spliced flow hangs for ever). A quiet connection
/// repeats nothing, so it never stalls; a receiver that answers restarts
/// the first clock, one that acknowledges something new, or everything
/// (a zero window answering its probes, say), the second.
#[derive(Debug, Default)]
struct Stall {
    /// The receiver's packets: it answers at all.
    heard: StandingStill,
    /// The receiver's acknowledgement: it takes what is outstanding.
    acked: StandingStill,
}

impl Stall {
    /// Whether `direction`'s receiver (the sender of `other`) has been
    /// silent, or has acknowledged nothing new of what is outstanding, for
    /// `timeout` while `direction`'s sender repeated itself.
    fn stalled(
        &mut self,
        direction: &PacketRewrite,
        other: &PacketRewrite,
        now: Instant,
        timeout: Duration,
    ) -> bool {
        let silent = self.heard.for_long(other.packets, false, direction.repeats, (now, timeout));
        // Both in the sender's numbering, low 32 bits.
        let unacknowledged = (direction.next_seq as u32).wrapping_sub(other.acked as u32);
        let all_taken = unacknowledged as i32 <= 0;
        let stuck = self.acked.for_long(other.acked, all_taken, direction.repeats, (now, timeout));
        if stuck && !silent {
            tracing::warn!(
                unacknowledged,
                ?timeout,
                "a spliced flow's receiver answers but has acknowledged nothing new for the stall timeout"
            );
        }
        silent || stuck
    }
}

/// A value of a receiver that has not moved since `since`, with its
/// sender's repeats then.
#[derive(Debug, Default)]
struct StandingStill {
    value: u64,
    since: Option<Instant>,
    repeats: u64,
}

impl StandingStill {
    /// Whether `value` has stood still for the timeout while the sender's
    /// `repeats` grew; a new value, or `restart`, starts the clock again.
    fn for_long(
        &mut self,
        value: u64,
        restart: bool,
        repeats: u64,
        (now, timeout): (Instant, Duration),
    ) -> bool {
        if restart || self.since.is_none() || value != self.value {
            *self = Self { value, since: Some(now), repeats };
            return false;
        }
        let since = self.since.unwrap_or(now);
        repeats > self.repeats && now.duration_since(since) >= timeout
    }
}

/// Whether the FIN of `direction` went through and the other direction's
/// acknowledgements have passed it.
fn fin_arrived(direction: &PacketRewrite, other: &PacketRewrite) -> bool {
    let after_fin = direction.fin_seq.wrapping_add(1);
    direction.fin_seen != 0 && (other.acked as u32).wrapping_sub(after_fin) as i32 >= 0
}

/// After the end: the proxy's socket on the client's side closes at once
/// (silently, in repair mode) and the entries are marked finished, so that
/// a client reusing its port for a new connection reaches the listener
/// (the program forgets a finished entry at that SYN). The entries keep
/// rewriting for [`LINGER`], then drop the flow's late packets for
/// [`QUIET`], then go, with the upstream's socket, whose port stays taken
/// until then. Each step touches an entry only while it is still this
/// flow's (its socket's cookie): once forgotten, its key may be a new
/// connection's.
async fn retire(plane: Arc<PacketPlane>, keys: [PacketFlowKey; 2], sockets: Sockets) {
    let Sockets { client, upstream, .. } = sockets;
    let cookies = {
        let program = plane.program();
        keys.map(|key| program.flow(&key).ok().flatten().map_or(0, |flow| flow.socket_cookie))
    };
    drop(client);
    mark_ours(&plane, &keys, cookies, rewrite_flags::FINISHED);
    tokio::time::sleep(LINGER).await;
    mark_ours(&plane, &keys, cookies, rewrite_flags::ENDED);
    tokio::time::sleep(QUIET).await;
    {
        let mut program = plane.program();
        for (key, cookie) in keys.iter().zip(cookies) {
            if cookie != 0
                && program.flow(key).ok().flatten().is_some_and(|flow| flow.socket_cookie == cookie)
                && let Err(error) = program.remove_flow(key)
            {
                tracing::warn!(%error, "removing a spliced flow");
            }
        }
    }
    drop(upstream);
    plane.counters.retired.fetch_add(1, Ordering::Relaxed);
}

/// Adds `flag` to each entry of `keys` that is still the one with the
/// socket cookie of `cookies` (0: none was found, a switch's entry has no
/// cookie yet, so nothing is touched).
fn mark_ours(plane: &PacketPlane, keys: &[PacketFlowKey; 2], cookies: [u64; 2], flag: u16) {
    let mut program = plane.program();
    for (key, cookie) in keys.iter().zip(cookies) {
        if cookie != 0
            && let Ok(Some(flow)) = program.flow(key)
            && flow.socket_cookie == cookie
        {
            let marked = PacketRewrite { flags: flow.flags | flag, ..flow };
            if let Err(error) = program.set_flow(key, &marked) {
                tracing::warn!(%error, flag, "marking a spliced flow finished or ended");
            }
        }
    }
}

/// Lets go of a connection that has not ended (a stop, a stalled side):
/// its entries drop its packets from now on, so the numbers read next are
/// the last; the proxy's sockets close (silently); the entries go; and each
/// end is reset at once ([`End::reset`]), a quiet one included.
fn let_go(plane: &PacketPlane, keys: &[PacketFlowKey; 2], sockets: Sockets) {
    let flows = {
        let mut program = plane.program();
        keys.map(|key| {
            let flow = program.flow(&key).ok().flatten()?;
            let ended = PacketRewrite { flags: flow.flags | rewrite_flags::ENDED, ..flow };
            if let Err(error) = program.set_flow(&key, &ended) {
                tracing::warn!(%error, "marking a spliced flow ended");
            }
            program.flow(&key).ok().flatten()
        })
    };
    drop(sockets);
    remove(plane, keys);
    plane.counters.retired.fetch_add(1, Ordering::Relaxed);
    for flow in flows.iter().flatten() {
        if let Err(error) = End::receiving(flow).reset() {
            tracing::warn!(%error, "an end of a spliced connection could not be reset; it will be as it next sends");
        }
    }
}

fn remove(plane: &PacketPlane, keys: &[PacketFlowKey; 2]) {
    let mut program = plane.program();
    for key in keys {
        if let Err(error) = program.remove_flow(key) {
            tracing::warn!(%error, "removing a spliced flow");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A direction whose FIN (at sequence 100, when `fin`) went through and
    /// whose packets acknowledged the other direction up to 101.
    fn flow(fin: u32, rst: u32) -> Option<PacketRewrite> {
        Some(PacketRewrite {
            fin_seen: fin,
            rst_seen: rst,
            fin_seq: 100,
            acked: 101,
            ..PacketRewrite::default()
        })
    }

    #[test]
    fn a_connection_ends_on_a_fin_each_way_or_a_reset_either_way() {
        let table = [
            ([flow(0, 0), flow(0, 0)], None),
            ([flow(1, 0), flow(0, 0)], None),
            ([flow(0, 0), flow(1, 0)], None),
            ([flow(1, 0), flow(1, 0)], Some(Ending::Completed)),
            ([flow(0, 1), flow(1, 0)], Some(Ending::Reset(Side::Downstream))),
            ([flow(1, 1), flow(1, 0)], Some(Ending::Completed)),
            ([flow(1, 0), flow(0, 1)], Some(Ending::Reset(Side::Upstream))),
            ([None, flow(0, 0)], Some(Ending::Error(Side::Downstream))),
        ];
        for (flows, want) in table {
            assert_eq!(ending_of(&flows), want, "{flows:?}");
        }
        // A FIN each way, but one not yet acknowledged: a segment before it
        // may still be on its way again.
        let not_acked = Some(PacketRewrite { acked: 100, ..flow(1, 0).unwrap() });
        let table = [
            ([flow(1, 0), not_acked], None),
            ([not_acked, flow(1, 0)], None),
            ([not_acked, flow(1, 1)], Some(Ending::Reset(Side::Upstream))),
        ];
        for (flows, want) in table {
            assert_eq!(ending_of(&flows), want, "{flows:?}");
        }
    }

    #[test]
    fn a_sender_repeating_itself_to_a_silent_receiver_for_the_timeout_is_a_stall() {
        let timeout = Duration::from_secs(3);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let sender = |repeats: u64| PacketRewrite { repeats, ..PacketRewrite::default() };
        let receiver = |packets: u64| PacketRewrite { packets, ..PacketRewrite::default() };
        let mut stall = Stall::default();
        // A quiet connection: nothing repeated, never a stall.
        assert!(!stall.stalled(&sender(0), &receiver(10), at(0), timeout));
        assert!(!stall.stalled(&sender(0), &receiver(10), at(100), timeout));
        // Repeats answered by the receiver: no stall.
        assert!(!stall.stalled(&sender(2), &receiver(11), at(101), timeout));
        assert!(!stall.stalled(&sender(3), &receiver(12), at(103), timeout));
        // Repeats, the receiver silent since 103 s: a stall from 106 s.
        assert!(!stall.stalled(&sender(5), &receiver(12), at(105), timeout));
        assert!(stall.stalled(&sender(6), &receiver(12), at(106), timeout));
        // The receiver silent, but its sender repeating nothing: no stall.
        let mut stall = Stall::default();
        assert!(!stall.stalled(&sender(4), &receiver(1), at(0), timeout));
        assert!(!stall.stalled(&sender(4), &receiver(1), at(50), timeout));
    }

    #[test]
    fn a_receiver_that_answers_but_acknowledges_nothing_outstanding_for_the_timeout_is_a_stall() {
        let timeout = Duration::from_secs(3);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        // The sender has sent up to 1,000, repeating itself `repeats` times.
        let sender = |repeats: u64| PacketRewrite { next_seq: 1_000, repeats, ..PacketRewrite::default() };
        // The receiver answers (`packets` moves), acknowledging up to `acked`.
        let receiver =
            |packets: u64, acked: u64| PacketRewrite { packets, acked, ..PacketRewrite::default() };
        let mut stall = Stall::default();
        assert!(!stall.stalled(&sender(0), &receiver(1, 500), at(0), timeout));
        // New acknowledgements: no stall, however long it takes.
        assert!(!stall.stalled(&sender(2), &receiver(2, 600), at(2), timeout));
        assert!(!stall.stalled(&sender(3), &receiver(3, 700), at(4), timeout));
        // Answers acknowledging nothing new while the sender repeats: a
        // stall once the timeout has passed since the last new one.
        assert!(!stall.stalled(&sender(5), &receiver(4, 700), at(6), timeout));
        assert!(stall.stalled(&sender(6), &receiver(5, 700), at(7), timeout));
        // Everything acknowledged (a zero window answering probes): the
        // receiver is not stuck, whatever the sender repeats.
        let mut stall = Stall::default();
        for s in 0..10 {
            assert!(!stall.stalled(&sender(s), &receiver(s, 1_000), at(s * 2), timeout));
        }
        // The numbers wrap: acknowledged up to 2^32 - 100 of a sender at 50.
        let wrapped = PacketRewrite { next_seq: 50, repeats: 1, ..PacketRewrite::default() };
        let behind = |packets| receiver(packets, u64::from(u32::MAX - 100));
        let mut stall = Stall::default();
        assert!(!stall.stalled(&wrapped, &behind(1), at(0), timeout));
        let wrapped = PacketRewrite { repeats: 2, ..wrapped };
        assert!(stall.stalled(&wrapped, &behind(2), at(3), timeout));
    }
}
