//! What the switch reads from one of the proxy's live sockets, in repair
//! mode (`TCP_REPAIR`, CAP_NET_ADMIN): the queues' sequence numbers, the
//! timestamp clock, the negotiated options; whether the socket is
//! quiescent; and the mode itself (`nix` wraps none of these options:
//! `sockopt::get`/`set_int` do the raw calls).
//!
//! Repair mode does not silence a socket (docs/kernel-notes.md, *A live
//! socket, for packet splicing*): it keeps acknowledging, retransmitting
//! and probing. It stops the application's reads and writes, and makes
//! `close()` send nothing.

use std::{
    io,
    net::SocketAddrV4,
    os::fd::{AsFd, AsRawFd as _},
};

use nix::libc;

use super::rewrite::{Negotiated, SocketState};
use crate::{
    sockopt::{self, RawOption, SockoptError},
    tcpstat,
};

/// `TCP_REPAIR` values and `TCP_REPAIR_QUEUE` queues (uapi `linux/tcp.h`).
pub(super) const REPAIR_ON: libc::c_int = 1;
/// Leaves repair mode with a window probe: the peer answers it with an ACK.
const REPAIR_OFF: libc::c_int = 0;
/// Leaves repair mode without the window probe that `0` sends.
pub(super) const REPAIR_OFF_NO_WINDOW_PROBE: libc::c_int = -1;
pub(super) const RECV_QUEUE: libc::c_int = 1;
pub(super) const SEND_QUEUE: libc::c_int = 2;
/// `struct tcp_info`: the state, `tcpi_options`, the two window scales (low
/// nibble the peer's, high nibble ours), the MSSes; stable since Linux 2.6.
const TCPI_OPTIONS: usize = 5;
/// `tcpi_state`: a `TCP_*` state of `include/net/tcp_states.h`.
const TCPI_STATE: usize = 0;
const TCP_ESTABLISHED: u8 = 1;
const TCPI_WSCALES: usize = 6;
/// `tcpi_snd_mss` and `tcpi_advmss` (`u32`s).
const TCPI_SND_MSS: usize = 16;
const TCPI_ADVMSS: usize = 84;
/// `tcpi_options` bits.
const TCPI_OPT_TIMESTAMPS: u8 = 1;
const TCPI_OPT_SACK: u8 = 2;
const TCPI_OPT_WSCALE: u8 = 4;
/// Microsecond timestamps (Linux 6.7).
const TCPI_OPT_USEC_TS: u8 = 64;

/// Why a socket's state could not be read.
#[derive(Debug, thiserror::Error)]
pub enum RepairError {
    #[error("{what}: {source}")]
    Io { what: &'static str, source: io::Error },
    #[error(transparent)]
    Set(#[from] SockoptError),
    #[error("the socket is not an IPv4 connection ({0})")]
    NotIpv4(String),
}

fn io(what: &'static str) -> impl FnOnce(io::Error) -> RepairError {
    move |source| RepairError::Io { what, source }
}

/// Bytes `socket` holds unread, and bytes it holds unacknowledged or
/// unsent: the switch waits for (0, 0).
pub fn queued<F: AsFd>(socket: &F) -> Result<(u64, u64), RepairError> {
    let unread = tcpstat::readable_bytes(socket).map_err(io("SIOCINQ"))?;
    let unsent = tcpstat::unsent_bytes(socket).map_err(io("SIOCOUTQ"))?;
    Ok((unread, unsent))
}

/// Puts `socket` in repair mode.
pub fn enter<F: AsFd>(socket: &F) -> Result<(), RepairError> {
    tcp_set(socket, libc::TCP_REPAIR, REPAIR_ON, "TCP_REPAIR on")
}

/// Takes `socket` out of repair mode without a window probe (a switch
/// given up).
pub fn leave<F: AsFd>(socket: &F) -> Result<(), RepairError> {
    tcp_set(socket, libc::TCP_REPAIR, REPAIR_OFF_NO_WINDOW_PROBE, "TCP_REPAIR off")
}

/// Makes the peer of `socket` send an ACK: in and out of repair mode, whose
/// end sends a window probe (an old sequence number, no data, which the
/// peer acknowledges without taking anything).
pub fn probe<F: AsFd>(socket: &F) -> Result<(), RepairError> {
    enter(socket)?;
    tcp_set(socket, libc::TCP_REPAIR, REPAIR_OFF, "TCP_REPAIR off with a window probe")
}

/// A keepalive probe from `socket`, which is in repair mode and stays so:
/// out of repair mode with a window probe (an old sequence number, no
/// data, which the peer answers with an ACK) and straight back in.
pub fn keepalive_probe<F: AsFd>(socket: &F) -> Result<(), RepairError> {
    tcp_set(socket, libc::TCP_REPAIR, REPAIR_OFF, "TCP_REPAIR off with a window probe")?;
    enter(socket)
}

/// The state of `socket`, which is in repair mode; `peer_tsval`: the last
/// timestamp its peer sent (not readable from a socket option).
pub fn read<F: AsFd>(socket: &F, peer_tsval: u32) -> Result<SocketState, RepairError> {
    let (local, remote) = addresses(socket)?;
    tcp_set(socket, libc::TCP_REPAIR_QUEUE, SEND_QUEUE, "TCP_REPAIR_QUEUE send")?;
    let snd_nxt: u32 = tcp_get(socket, libc::TCP_QUEUE_SEQ, "TCP_QUEUE_SEQ send")?;
    tcp_set(socket, libc::TCP_REPAIR_QUEUE, RECV_QUEUE, "TCP_REPAIR_QUEUE receive")?;
    let rcv_nxt: u32 = tcp_get(socket, libc::TCP_QUEUE_SEQ, "TCP_QUEUE_SEQ receive")?;
    let tsval: u32 = tcp_get(socket, libc::TCP_TIMESTAMP, "TCP_TIMESTAMP")?;
    let (options, established) = negotiated(socket)?;
    Ok(SocketState { local, remote, snd_nxt, rcv_nxt, tsval, peer_tsval, options, established })
}

/// The options `socket` negotiated, and whether it is still established
/// (no FIN or RST received); readable outside repair mode too.
pub fn negotiated<F: AsFd>(socket: &F) -> Result<(Negotiated, bool), RepairError> {
    // The first fields of `struct tcp_info`: the state, the options, the
    // scales, the MSSes.
    let info: [u8; TCPI_ADVMSS + 4] = tcp_get(socket, libc::TCP_INFO, "TCP_INFO")?;
    let u32_at = |at: usize| u32::from_ne_bytes([info[at], info[at + 1], info[at + 2], info[at + 3]]);
    let options = info[TCPI_OPTIONS];
    let scales = if options & TCPI_OPT_WSCALE != 0 { info[TCPI_WSCALES] } else { 0 };
    let negotiated = Negotiated {
        timestamps: options & TCPI_OPT_TIMESTAMPS != 0,
        usec_timestamps: options & TCPI_OPT_USEC_TS != 0,
        sack: options & TCPI_OPT_SACK != 0,
        peer_wscale: scales & 0x0f,
        own_wscale: scales >> 4,
        send_mss: u32_at(TCPI_SND_MSS),
        advertised_mss: u32_at(TCPI_ADVMSS),
    };
    Ok((negotiated, info[TCPI_STATE] == TCP_ESTABLISHED))
}

fn addresses<F: AsFd>(socket: &F) -> Result<(SocketAddrV4, SocketAddrV4), RepairError> {
    use nix::sys::socket::{SockaddrIn, SockaddrStorage, getpeername, getsockname};
    let fd = socket.as_fd().as_raw_fd();
    let v4 = |addr: SockaddrStorage| addr.as_sockaddr_in().map(|a: &SockaddrIn| SocketAddrV4::from(*a));
    let local = getsockname::<SockaddrStorage>(fd).map_err(|e| io("getsockname")(e.into()))?;
    let remote = getpeername::<SockaddrStorage>(fd).map_err(|e| io("getpeername")(e.into()))?;
    match (v4(local), v4(remote)) {
        (Some(local), Some(remote)) => Ok((local, remote)),
        _ => Err(RepairError::NotIpv4(format!("{local} -> {remote}"))),
    }
}

pub(super) fn tcp_set<F: AsFd>(
    socket: &F,
    name: libc::c_int,
    value: libc::c_int,
    what: &'static str,
) -> Result<(), RepairError> {
    Ok(sockopt::set_int(socket, libc::IPPROTO_TCP, name, value, what)?)
}

fn tcp_get<F: AsFd, T: RawOption>(
    socket: &F,
    name: libc::c_int,
    what: &'static str,
) -> Result<T, RepairError> {
    sockopt::get(socket, libc::IPPROTO_TCP, name).map(|(value, _)| value).map_err(io(what))
}
