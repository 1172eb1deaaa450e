//! The switch: from the proxy's two sockets to the program.
//!
//! 0. The options both handshakes negotiated must allow it.
//! 1. Both flows are watched by the program: every packet still reaches the
//!    proxy's socket, and each teaches the entry the hop back to its sender
//!    and its newest TSval.
//! 2. What the sockets still hold unread is relayed by hand, without
//!    blocking (what the other socket does not take now waits for the next
//!    look); what they sent is waited for until acknowledged. A peer that
//!    closed or reset meanwhile ends the switch, its FIN or error left for
//!    the next plane. A side whose peer sent nothing yet
//!    is probed once (a window probe draws an ACK), so the hop is learned.
//!    A connection that keeps streaming is held (step 3) before it is
//!    quiescent, so that it becomes so: after [`WATCH_BYTES`] relayed, or
//!    [`WATCH_TIME`]. A held socket still waiting for its peer's
//!    acknowledgement asks for it ([`ASK_AFTER`]); a hold that has not made
//!    the connection quiescent within [`HOLD_LIMIT`] is lifted and the
//!    watch goes on, to be held again, until [`SWITCH_TIMEOUT`].
//! 3. Both flows are held: whatever would move a sequence number forward is
//!    dropped (its sender retransmits it later, into the spliced flow), pure
//!    ACKs still reach the sockets. For a connection that went quiet while
//!    watched, the hold lasts only for the reads below, so that little is
//!    dropped (a drop costs its sender a loss probe or a retransmission
//!    timeout, which would slow every connection's set-up). Both sockets
//!    go into repair mode and are read: quiescent again, still
//!    established (one that received a packet since leaves repair mode,
//!    and the watch of step 2 goes on). Their keepalive is off first,
//!    since repair mode does not stop it.
//! 4. Each direction's rewrite replaces its hold, with the cookie of the
//!    proxy's socket there: what that socket still sends is dropped on its
//!    way out (`packet_silence`).
//! 5. A packet that passed the program just before the hold may still be on
//!    its way up the stack at step 3. Once every CPU has left the receive
//!    path it was on (an RCU grace period, [`super::grace`]), the sockets
//!    are looked at again by the follower ([`super::flow`]): one that
//!    received anything after all ends the connection with both ends reset,
//!    never a byte silently lost.
//!
//! Anything else gives up: entries removed, repair mode left, keepalive as
//! it was; the packets dropped meanwhile come again to the sockets.

use std::{
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd as _},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use nix::{
    errno::Errno,
    sys::socket::{MsgFlags, recv, send},
};
use proxy_common::{PacketFlowKey, PacketRewrite, packet::rewrite_flags};
use tokio::{io::Interest, net::TcpStream};

use super::{
    PacketPlane,
    fallback::Fallback,
    repair,
    rewrite::{Hop, arriving, compatible, rewrites},
};
use crate::{
    dataplane::transfer::{ByteProgress, Sockets},
    kernel::socket_cookie,
    sockopt, tcpstat,
};

/// How long the switch waits for both sockets to become quiescent and both
/// peers to be seen, over several holds; a connection busy for longer
/// stays on the next plane.
const SWITCH_TIMEOUT: Duration = Duration::from_secs(2);
/// While the flows are watched, a connection that relayed this much by hand
/// is streaming: it is held, so that it becomes quiescent.
const WATCH_BYTES: u64 = 64 << 10;
/// A connection not quiescent after this long watched is held too.
const WATCH_TIME: Duration = Duration::from_millis(20);
/// A held socket still waiting for its peer's acknowledgement after this
/// long asks for it (a window probe): the peer may have sent it only on
/// its data, which the hold drops, and would otherwise send it again only
/// after a retransmission timeout.
const ASK_AFTER: Duration = Duration::from_millis(2);
/// A hold that has not made the connection quiescent after this long is
/// lifted: the flows are watched and relayed again, and held once more
/// later, rather than the connection stalled (a slow reader's socket, say,
/// drains meanwhile).
const HOLD_LIMIT: Duration = Duration::from_millis(100);
/// How often the switch looks again while it waits, when no socket became
/// readable.
const SWITCH_POLL: Duration = Duration::from_millis(1);
/// Bytes relayed by hand per read while the flows are watched.
const RELAY_BUFFER: usize = 64 << 10;

/// Step 0: whether the connection can be joined at all, from its addresses
/// and what its handshakes settled: its flow keys (client → upstream
/// first), or why not. Nothing is watched for a connection that cannot be
/// joined anyway.
pub(super) fn joinable(sockets: &Sockets) -> Result<[PacketFlowKey; 2], Fallback> {
    let keys = [key_of(&sockets.client)?, key_of(&sockets.upstream)?];
    let (client, _) = repair::negotiated(&sockets.client).map_err(failed("reading the client's options"))?;
    let (upstream, _) =
        repair::negotiated(&sockets.upstream).map_err(failed("reading the upstream's options"))?;
    compatible(&client, &upstream)?;
    Ok(keys)
}

/// Joins the connection of `keys` ([`joinable`]) in the program, or says
/// why not (nothing of the switch is left behind then).
pub(super) async fn switch(
    plane: &Arc<PacketPlane>,
    sockets: &Sockets,
    progress: &ByteProgress,
    keys: [PacketFlowKey; 2],
) -> Result<[PacketFlowKey; 2], Fallback> {
    watch(plane, &keys)?;
    let keepalive = [keepalive(&sockets.client), keepalive(&sockets.upstream)];
    let joined = join(plane, sockets, progress, &keys).await;
    if joined.is_err() {
        let mut program = plane.program();
        for key in &keys {
            if let Err(error) = program.remove_flow(key) {
                tracing::warn!(%error, "removing a watched or held flow");
            }
        }
        drop(program);
        for (socket, on) in [&sockets.client, &sockets.upstream].into_iter().zip(keepalive) {
            let _ = repair::leave(socket);
            if on {
                let _ = set_keepalive(socket, true);
            }
        }
    }
    joined.map(|()| keys)
}

/// Steps 2 to 4 of the switch.
async fn join(
    plane: &Arc<PacketPlane>,
    sockets: &Sockets,
    progress: &ByteProgress,
    keys: &[PacketFlowKey; 2],
) -> Result<(), Fallback> {
    let deadline = Instant::now() + SWITCH_TIMEOUT;
    let held = loop {
        let held = settle(plane, sockets, progress, keys, deadline).await?;
        for socket in [&sockets.client, &sockets.upstream] {
            set_keepalive(socket, false).map_err(failed("keepalive off"))?;
            repair::enter(socket).map_err(failed("repair mode"))?;
        }
        // A packet that passed the program just before the hold may have
        // reached a socket since it was last looked at: then the watch goes
        // on. One still on its way up the stack is caught by the look
        // after a grace period.
        let mut quiescent = true;
        for socket in [&sockets.client, &sockets.upstream] {
            quiescent &= repair::queued(socket).map_err(failed("queues"))? == (0, 0);
        }
        if quiescent {
            break held;
        }
        for socket in [&sockets.client, &sockets.upstream] {
            repair::leave(socket).map_err(failed("leaving repair mode"))?;
        }
        mark(plane, keys, rewrite_flags::WATCH)?;
        if Instant::now() >= deadline {
            return Err(Fallback::NotQuiescent);
        }
    };
    let client =
        repair::read(&sockets.client, held[0].peer_tsval).map_err(failed("reading the client socket"))?;
    let upstream =
        repair::read(&sockets.upstream, held[1].peer_tsval).map_err(failed("reading the upstream socket"))?;
    let [(up_key, up), (down_key, down)] = rewrites(&client, &upstream, hop(&held[0]), hop(&held[1]))?;
    // What the sockets still send is dropped on its way out from now on.
    let up = PacketRewrite { socket_cookie: socket_cookie(&sockets.client).map_err(failed("cookie"))?, ..up };
    let down =
        PacketRewrite { socket_cookie: socket_cookie(&sockets.upstream).map_err(failed("cookie"))?, ..down };
    let mut program = plane.program();
    for (key, rewrite) in [(up_key, up), (down_key, down)] {
        program.set_flow(&key, &rewrite).map_err(failed("installing a rewrite"))?;
    }
    Ok(())
}

/// Relays what the sockets hold and waits until both are quiescent and both
/// peers were seen, then holds both flows; the held entries (client's,
/// upstream's), or why not by `deadline`.
async fn settle(
    plane: &PacketPlane,
    sockets: &Sockets,
    progress: &ByteProgress,
    keys: &[PacketFlowKey; 2],
    deadline: Instant,
) -> Result<[PacketRewrite; 2], Fallback> {
    let relayed = || {
        progress.client_to_upstream.load(Ordering::Relaxed)
            + progress.upstream_to_client.load(Ordering::Relaxed)
    };
    let mut watch =
        Watch { since: Instant::now(), relayed_before: relayed(), held_since: None, asked: [false; 2] };
    let mut probed = [false; 2];
    let mut buffer = vec![0; RELAY_BUFFER];
    loop {
        relay(&sockets.client, &sockets.upstream, &progress.client_to_upstream, &mut buffer)?;
        relay(&sockets.upstream, &sockets.client, &progress.upstream_to_client, &mut buffer)?;
        // A FIN or RST that arrived: the next plane sees it (nothing here
        // read the end or the error).
        for socket in [&sockets.client, &sockets.upstream] {
            if !repair::negotiated(socket).map_err(failed("TCP_INFO"))?.1 {
                return Err(Fallback::PeerClosed);
            }
        }
        let watched = {
            let program = plane.program();
            let read = |key| program.flow(key).ok().flatten().ok_or(Fallback::SwitchFailed);
            [read(&keys[0])?, read(&keys[1])?]
        };
        let seen = [watched[0].ifindex != 0, watched[1].ifindex != 0];
        for ((socket, seen), probed) in
            [&sockets.client, &sockets.upstream].into_iter().zip(seen).zip(&mut probed)
        {
            if !seen && !*probed {
                repair::probe(socket).map_err(failed("window probe"))?;
                *probed = true;
            }
        }
        let queued = queues(sockets)?;
        if seen == [true, true] && queued == [(0, 0); 2] {
            // Quiescent while held: what the entries learned is all the
            // switch needs. Quiescent while watched: held now, and looked
            // at once more, since a packet may have arrived since.
            if watch.held_since.is_some() {
                return Ok(watched);
            }
            let held = mark(plane, keys, rewrite_flags::HOLD)?;
            if queues(sockets)? == [(0, 0); 2] {
                return Ok(held);
            }
            watch.held_since = Some(Instant::now());
            watch.asked = [false; 2];
            continue;
        }
        match watch.held_since.map(|since| since.elapsed()) {
            None if relayed() - watch.relayed_before >= WATCH_BYTES
                || watch.since.elapsed() >= WATCH_TIME =>
            {
                mark(plane, keys, rewrite_flags::HOLD)?;
                watch.held_since = Some(Instant::now());
                watch.asked = [false; 2];
            }
            Some(held) if held >= HOLD_LIMIT => {
                mark(plane, keys, rewrite_flags::WATCH)?;
                watch = Watch { since: Instant::now(), relayed_before: relayed(), held_since: None, ..watch };
            }
            Some(held) if held >= ASK_AFTER => {
                for ((socket, (_, unacknowledged)), asked) in
                    [&sockets.client, &sockets.upstream].into_iter().zip(queued).zip(&mut watch.asked)
                {
                    if unacknowledged > 0 && !*asked {
                        repair::probe(socket).map_err(failed("window probe"))?;
                        *asked = true;
                    }
                }
            }
            _ => {}
        }
        if Instant::now() >= deadline {
            tracing::debug!(
                ?queued,
                held = watch.held_since.is_some(),
                ?seen,
                "the switch gave up waiting: (unread, unacknowledged) bytes of the client's and the upstream's socket"
            );
            return Err(if seen == [true, true] { Fallback::NotQuiescent } else { Fallback::PeerNotSeen });
        }
        next_look(sockets).await;
    }
}

/// What each socket (the client's, the upstream's) holds unread, and sent
/// or queued but not acknowledged.
fn queues(sockets: &Sockets) -> Result<[(u64, u64); 2], Fallback> {
    Ok([
        repair::queued(&sockets.client).map_err(failed("queues"))?,
        repair::queued(&sockets.upstream).map_err(failed("queues"))?,
    ])
}

/// Until either socket has something new to read (bytes, an end, an
/// error), or [`SWITCH_POLL`] for what readiness does not tell: the ACKs
/// that make a socket quiescent, the hop a probe's answer teaches.
async fn next_look(sockets: &Sockets) {
    tokio::select! {
        _ = sockets.client.readable() => {}
        _ = sockets.upstream.readable() => {}
        () = tokio::time::sleep(SWITCH_POLL) => {}
    }
}

/// Moves what `from` holds unread to `to`, as far as `to` takes it now and
/// at most one buffer, counting it in `moved`; the rest waits for the next
/// call (so a connection that streams is held after [`WATCH_BYTES`], not
/// carried by hand to its end). Never blocks,
/// and never reads past the bytes `SIOCINQ` counts, so an end of stream or
/// a pending error stays on the socket for the next plane to see; bytes
/// are peeked and consumed only once written, so none is lost when `to`
/// is full or fails.
fn relay(from: &TcpStream, to: &TcpStream, moved: &AtomicU64, buffer: &mut [u8]) -> Result<(), Fallback> {
    let (from_fd, to_fd) = (from.as_fd().as_raw_fd(), to.as_fd().as_raw_fd());
    let unread = tcpstat::readable_bytes(from).map_err(failed("SIOCINQ"))?;
    let want = usize::try_from(unread).unwrap_or(usize::MAX).min(buffer.len());
    // Read here past tokio: its readiness is cleared by hand when nothing
    // is left to move now, so the next look waits for new bytes or the
    // poll rather than spinning (an event after this stays).
    let wait = || {
        let _ = from.try_io(Interest::READABLE, || Err::<(), _>(std::io::ErrorKind::WouldBlock.into()));
    };
    if want == 0 {
        wait();
        return Ok(());
    }
    let peeked = match recv(from_fd, &mut buffer[..want], MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT) {
        Ok(n) => n,
        Err(Errno::EAGAIN | Errno::EINTR) => return Ok(()),
        Err(_) => return Err(Fallback::PeerClosed),
    };
    let written = match send(to_fd, &buffer[..peeked], MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL) {
        Ok(n) => n,
        Err(Errno::EAGAIN) => {
            wait();
            return Ok(());
        }
        Err(Errno::EINTR) => return Ok(()),
        Err(_) => return Err(Fallback::PeerClosed),
    };
    // Consume exactly what was written: it is there (peeked above).
    match recv(from_fd, &mut buffer[..written], MsgFlags::MSG_DONTWAIT) {
        Ok(n) if n == written => {}
        _ => return Err(Fallback::SwitchFailed),
    }
    moved.fetch_add(written as u64, Ordering::Relaxed);
    Ok(())
}

/// Both keys watched (a fresh entry each, so nothing learned before counts).
fn watch(plane: &PacketPlane, keys: &[PacketFlowKey; 2]) -> Result<(), Fallback> {
    let watched = PacketRewrite { flags: rewrite_flags::WATCH, ..PacketRewrite::default() };
    let mut program = plane.program();
    for (i, key) in keys.iter().enumerate() {
        if let Err(error) = program.set_flow(key, &watched) {
            for earlier in &keys[..i] {
                let _ = program.remove_flow(earlier);
            }
            tracing::debug!(%error, "watching a flow");
            return Err(Fallback::FlowTableFull);
        }
    }
    Ok(())
}

/// Where the watch of [`settle`] is: since when the flows are watched (or
/// watched again after a hold), what had been relayed by hand then, since
/// when they are held, and which held socket asked its peer for an
/// acknowledgement.
struct Watch {
    since: Instant,
    relayed_before: u64,
    held_since: Option<Instant>,
    asked: [bool; 2],
}

/// Both entries marked with `flag` (held, or watched again), keeping what
/// they learned; the marked entries (client's, upstream's). A packet
/// learned from between the read and the write is forgotten: it came by
/// the same hop, and the mapping anchors at any TSval the peer sent.
fn mark(plane: &PacketPlane, keys: &[PacketFlowKey; 2], flag: u16) -> Result<[PacketRewrite; 2], Fallback> {
    let mut program = plane.program();
    let mut marked = [PacketRewrite::default(); 2];
    for (key, marked) in keys.iter().zip(&mut marked) {
        let learned = program.flow(key).ok().flatten().ok_or(Fallback::SwitchFailed)?;
        *marked = PacketRewrite { flags: flag, ..learned };
        program.set_flow(key, marked).map_err(failed("holding or watching a flow"))?;
    }
    Ok(marked)
}

/// The key of the packets that arrive for `socket`.
fn key_of(socket: &TcpStream) -> Result<PacketFlowKey, Fallback> {
    match (socket.local_addr(), socket.peer_addr()) {
        (Ok(SocketAddr::V4(_)), Ok(SocketAddr::V4(remote))) if remote.ip().is_loopback() => {
            Err(Fallback::Loopback)
        }
        (Ok(SocketAddr::V4(local)), Ok(SocketAddr::V4(remote))) => Ok(arriving(local, remote)),
        (Ok(_), Ok(_)) => Err(Fallback::NotIpv4),
        _ => Err(Fallback::PeerClosed),
    }
}

/// The hop a watched entry learned back to its peer.
fn hop(watched: &PacketRewrite) -> Hop {
    Hop { ifindex: watched.ifindex, src_mac: watched.src_mac, dst_mac: watched.dst_mac }
}

fn keepalive<F: AsFd>(socket: &F) -> bool {
    sockopt::get::<_, i32>(socket, nix::libc::SOL_SOCKET, nix::libc::SO_KEEPALIVE)
        .is_ok_and(|(on, _)| on != 0)
}

fn set_keepalive<F: AsFd>(socket: &F, on: bool) -> Result<(), sockopt::SockoptError> {
    sockopt::set_int(socket, nix::libc::SOL_SOCKET, nix::libc::SO_KEEPALIVE, i32::from(on), "SO_KEEPALIVE")
}

/// A failed step of the switch, logged, as its fallback.
fn failed<E: std::fmt::Display>(step: &'static str) -> impl FnOnce(E) -> Fallback {
    move |error| {
        tracing::warn!(%error, step, "the switch to packet splicing failed");
        Fallback::SwitchFailed
    }
}
