//! What the switch reads from one of the proxy's live sockets, in repair
//! mode (`TCP_REPAIR`, CAP_NET_ADMIN): the queues' sequence numbers, the
//! timestamp clock, the negotiated options; whether the socket is
//! quiescent; and the mode itself. Raw `getsockopt`/`setsockopt` and
//! `ioctl`: `nix` wraps none of these options.
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

/// `TCP_REPAIR` values and `TCP_REPAIR_QUEUE` queues (uapi `linux/tcp.h`).
const REPAIR_ON: libc::c_int = 1;
/// Leaves repair mode without the window probe that `0` sends.
const REPAIR_OFF_NO_WINDOW_PROBE: libc::c_int = -1;
const RECV_QUEUE: libc::c_int = 1;
const SEND_QUEUE: libc::c_int = 2;
/// `struct tcp_info`: `tcpi_options` and the two window scales (low nibble
/// the peer's, high nibble ours), stable since Linux 2.6.
const TCPI_OPTIONS: usize = 5;
const TCPI_WSCALES: usize = 6;
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
    #[error("the socket is not an IPv4 connection ({0})")]
    NotIpv4(String),
}

fn io(what: &'static str) -> impl FnOnce(io::Error) -> RepairError {
    move |source| RepairError::Io { what, source }
}

/// Bytes `socket` holds unread, and bytes it holds unacknowledged or
/// unsent: the switch waits for (0, 0).
pub fn queued<F: AsFd>(socket: &F) -> Result<(u64, u64), RepairError> {
    let unread = ioctl_int(socket, libc::FIONREAD).map_err(io("SIOCINQ"))?;
    let unsent = ioctl_int(socket, libc::TIOCOUTQ).map_err(io("SIOCOUTQ"))?;
    Ok((unread, unsent))
}

/// Puts `socket` in repair mode.
pub fn enter<F: AsFd>(socket: &F) -> Result<(), RepairError> {
    set_int(socket, libc::TCP_REPAIR, REPAIR_ON).map_err(io("TCP_REPAIR on"))
}

/// Takes `socket` out of repair mode without a window probe (a switch
/// given up).
pub fn leave<F: AsFd>(socket: &F) -> Result<(), RepairError> {
    set_int(socket, libc::TCP_REPAIR, REPAIR_OFF_NO_WINDOW_PROBE).map_err(io("TCP_REPAIR off"))
}

/// The state of `socket`, which is in repair mode; `peer_tsval`: the last
/// timestamp its peer sent (not readable from a socket option).
pub fn read<F: AsFd>(socket: &F, peer_tsval: u32) -> Result<SocketState, RepairError> {
    let (local, remote) = addresses(socket)?;
    set_int(socket, libc::TCP_REPAIR_QUEUE, SEND_QUEUE).map_err(io("TCP_REPAIR_QUEUE send"))?;
    let snd_nxt = get_u32(socket, libc::TCP_QUEUE_SEQ).map_err(io("TCP_QUEUE_SEQ send"))?;
    set_int(socket, libc::TCP_REPAIR_QUEUE, RECV_QUEUE).map_err(io("TCP_REPAIR_QUEUE receive"))?;
    let rcv_nxt = get_u32(socket, libc::TCP_QUEUE_SEQ).map_err(io("TCP_QUEUE_SEQ receive"))?;
    let tsval = get_u32(socket, libc::TCP_TIMESTAMP).map_err(io("TCP_TIMESTAMP"))?;
    let info = tcp_info(socket).map_err(io("TCP_INFO"))?;
    let options = info[TCPI_OPTIONS];
    let scales = if options & TCPI_OPT_WSCALE != 0 { info[TCPI_WSCALES] } else { 0 };
    Ok(SocketState {
        local,
        remote,
        snd_nxt,
        rcv_nxt,
        tsval,
        peer_tsval,
        options: Negotiated {
            timestamps: options & TCPI_OPT_TIMESTAMPS != 0,
            usec_timestamps: options & TCPI_OPT_USEC_TS != 0,
            sack: options & TCPI_OPT_SACK != 0,
            peer_wscale: scales & 0x0f,
            own_wscale: scales >> 4,
        },
    })
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

fn set_int<F: AsFd>(socket: &F, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    let len = libc::socklen_t::try_from(size_of::<libc::c_int>()).expect("an int's size fits");
    // SAFETY: the fd is borrowed, so open; `value` is a valid int for the
    // length given.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::setsockopt(socket.as_fd().as_raw_fd(), libc::IPPROTO_TCP, name, (&raw const value).cast(), len)
    };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

fn get_u32<F: AsFd>(socket: &F, name: libc::c_int) -> io::Result<u32> {
    let mut value: u32 = 0;
    let mut len = libc::socklen_t::try_from(size_of::<u32>()).expect("a u32's size fits");
    // SAFETY: the fd is borrowed, so open; `value` and `len` are valid for
    // writes and `len` holds the value's size, which the kernel respects.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            libc::IPPROTO_TCP,
            name,
            (&raw mut value).cast(),
            &raw mut len,
        )
    };
    if rc == 0 { Ok(value) } else { Err(io::Error::last_os_error()) }
}

/// The first bytes of `struct tcp_info` (the options and scales).
fn tcp_info<F: AsFd>(socket: &F) -> io::Result<[u8; 8]> {
    let mut info = [0u8; 8];
    let mut len = libc::socklen_t::try_from(info.len()).expect("8 fits socklen_t");
    // SAFETY: as in `get_u32`: a buffer and its length, both valid for writes.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &raw mut len,
        )
    };
    if rc == 0 { Ok(info) } else { Err(io::Error::last_os_error()) }
}

fn ioctl_int<F: AsFd>(socket: &F, request: libc::Ioctl) -> io::Result<u64> {
    let mut value: libc::c_int = 0;
    // SAFETY: SIOCINQ and SIOCOUTQ write one int through the pointer, which is valid.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::ioctl(socket.as_fd().as_raw_fd(), request, &raw mut value) };
    if rc == 0 { Ok(u64::try_from(value).unwrap_or(0)) } else { Err(io::Error::last_os_error()) }
}
