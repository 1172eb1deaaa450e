//! TCP socket options set on both sockets of every connection.
//!
//! Defaults keep a silent `kubectl get --watch` stream alive through the NLB's
//! 350-second idle timeout: the first keepalive probe goes out after 30 s of
//! silence, so the NLB sees traffic long before it would drop the flow, and a
//! dead peer is noticed within about a minute.

use std::{io, os::fd::AsFd, time::Duration};

use nix::sys::socket::{setsockopt, sockopt};

/// Validated TCP options (see [`crate::config`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpConfig {
    pub keepalive_idle: Duration,
    pub keepalive_interval: Duration,
    pub keepalive_count: u32,
    /// `Duration::ZERO` leaves the kernel default.
    pub user_timeout: Duration,
}

/// Which option could not be set, and why.
#[derive(Debug, thiserror::Error)]
#[error("setting {option} failed: {source}")]
pub struct SockoptError {
    option: &'static str,
    source: io::Error,
}

fn set<F: AsFd, O: nix::sys::socket::SetSockOpt>(
    fd: &F,
    opt: O,
    value: &O::Val,
    option: &'static str,
) -> Result<(), SockoptError> {
    setsockopt(fd, opt, value).map_err(|errno| SockoptError { option, source: errno.into() })
}

fn secs(d: Duration) -> u32 {
    u32::try_from(d.as_secs()).unwrap_or(u32::MAX)
}

/// The longest a connection waits before its upstream socket gets the
/// options only a connection that lives needs ([`apply_long_lived`]).
const LONG_LIVED_AFTER_AT_MOST: Duration = Duration::from_secs(1);

impl TcpConfig {
    /// How long a connection lives before its upstream socket gets
    /// keepalive and the user timeout ([`apply_long_lived`]): most
    /// connections (a kubectl request) end sooner and never pay those five
    /// system calls. A quarter of the keepalive idle time and of the user
    /// timeout at most, so that keepalive starts at most that much later
    /// than configured; the user timeout counts from the first
    /// unacknowledged retransmission, whenever it is set.
    #[must_use]
    pub fn long_lived_after(&self) -> Duration {
        let mut after = LONG_LIVED_AFTER_AT_MOST.min(self.keepalive_idle / 4);
        if !self.user_timeout.is_zero() {
            after = after.min(self.user_timeout / 4);
        }
        after
    }
}

/// TCP_NODELAY, keepalive (idle, interval, count) and TCP_USER_TIMEOUT (0:
/// the kernel's default). Set on a listening socket, they are inherited by
/// every socket it accepts from then on (Linux copies them to the new
/// socket at the handshake), so the client side of a connection costs no
/// call of its own (`accepted_sockets_inherit_the_listeners_options`).
pub fn apply<F: AsFd>(fd: &F, tcp: &TcpConfig) -> Result<(), SockoptError> {
    apply_at_connect(fd)?;
    apply_long_lived(fd, tcp)
}

/// What an upstream socket needs from its first byte: TCP_NODELAY (the
/// rest waits, see [`TcpConfig::long_lived_after`]).
pub fn apply_at_connect<F: AsFd>(fd: &F) -> Result<(), SockoptError> {
    set(fd, sockopt::TcpNoDelay, &true, "TCP_NODELAY")
}

/// Keepalive (on, idle, interval, count) and TCP_USER_TIMEOUT: what matters
/// only to a connection that lives.
pub fn apply_long_lived<F: AsFd>(fd: &F, tcp: &TcpConfig) -> Result<(), SockoptError> {
    set(fd, sockopt::KeepAlive, &true, "SO_KEEPALIVE")?;
    set(fd, sockopt::TcpKeepIdle, &secs(tcp.keepalive_idle), "TCP_KEEPIDLE")?;
    set(fd, sockopt::TcpKeepInterval, &secs(tcp.keepalive_interval), "TCP_KEEPINTVL")?;
    set(fd, sockopt::TcpKeepCount, &tcp.keepalive_count, "TCP_KEEPCNT")?;
    let millis = u32::try_from(tcp.user_timeout.as_millis()).unwrap_or(u32::MAX);
    set(fd, sockopt::TcpUserTimeout, &millis, "TCP_USER_TIMEOUT")
}

/// Fixes the receive buffer at `bytes` (the kernel doubles the value for
/// its bookkeeping), which also stops its autotuning. SO_RCVBUFFORCE first,
/// which may exceed `net.core.rmem_max` (needs CAP_NET_ADMIN, as the sockmap
/// plane does), then SO_RCVBUF; then the window clamp to `bytes` (see
/// [`set_window_clamp`]).
pub fn fix_receive_buffer<F: AsFd>(fd: &F, bytes: usize) -> Result<(), SockoptError> {
    set(fd, sockopt::RcvBufForce, &bytes, "SO_RCVBUFFORCE")
        .or_else(|_| set(fd, sockopt::RcvBuf, &bytes, "SO_RCVBUF"))?;
    set_window_clamp(fd, i32::try_from(bytes).unwrap_or(i32::MAX))
}

/// Fixes the send buffer at `bytes` (doubled by the kernel, as above).
pub fn fix_send_buffer<F: AsFd>(fd: &F, bytes: usize) -> Result<(), SockoptError> {
    set(fd, sockopt::SndBufForce, &bytes, "SO_SNDBUFFORCE")
        .or_else(|_| set(fd, sockopt::SndBuf, &bytes, "SO_SNDBUF"))
}

/// SO_LINGER 0: closing the socket sends a reset instead of a FIN. Used to
/// carry a reset from one side of a connection to the other.
pub fn reset_on_close<F: AsFd>(fd: &F) -> Result<(), SockoptError> {
    let linger = nix::libc::linger { l_onoff: 1, l_linger: 0 };
    set(fd, sockopt::Linger, &linger, "SO_LINGER")
}

/// SO_RCVLOWAT (nix has no wrapper). Setting it runs the socket's data-ready
/// path, which is how the sockmap plane gets bytes that were queued before the
/// socket entered the map read by the verdict program.
pub fn set_rcvlowat<F: AsFd>(fd: &F, bytes: i32) -> Result<(), SockoptError> {
    set_int(fd, nix::libc::SOL_SOCKET, nix::libc::SO_RCVLOWAT, bytes, "SO_RCVLOWAT")
}

/// TCP_WINDOW_CLAMP (nix has no wrapper): the largest window the socket
/// advertises. An accepted socket takes its clamp from the listener's buffer
/// at the handshake and only autotuning raises it, which
/// a fixed buffer turns off; so a buffer fixed after the handshake must raise
/// the clamp too, or the window stays at that first value (docs/kernel-notes.md, *Facts re-checked*).
pub fn set_window_clamp<F: AsFd>(fd: &F, bytes: i32) -> Result<(), SockoptError> {
    set_int(fd, nix::libc::IPPROTO_TCP, nix::libc::TCP_WINDOW_CLAMP, bytes, "TCP_WINDOW_CLAMP")
}

/// The socket's TCP_WINDOW_CLAMP.
pub fn window_clamp<F: AsFd>(fd: &F) -> Result<i32, SockoptError> {
    get::<_, i32>(fd, nix::libc::IPPROTO_TCP, nix::libc::TCP_WINDOW_CLAMP)
        .map(|(value, _)| value)
        .map_err(|source| SockoptError { option: "TCP_WINDOW_CLAMP", source })
}

/// Plain data a socket option is read into: whatever bytes the kernel
/// writes, and however few, the value is valid.
pub(crate) trait RawOption: Copy {
    const ZERO: Self;
}

impl RawOption for i32 {
    const ZERO: Self = 0;
}

impl RawOption for u32 {
    const ZERO: Self = 0;
}

impl RawOption for u64 {
    const ZERO: Self = 0;
}

impl<const N: usize> RawOption for [u8; N] {
    const ZERO: Self = [0; N];
}

/// `getsockopt(level, name)` for the options `nix` does not wrap: the
/// value (zero beyond what the kernel wrote) and how many bytes it wrote.
pub(crate) fn get<F: AsFd, T: RawOption>(
    fd: &F,
    level: nix::libc::c_int,
    name: nix::libc::c_int,
) -> io::Result<(T, usize)> {
    use std::os::fd::AsRawFd as _;
    let mut value = T::ZERO;
    let mut len = nix::libc::socklen_t::try_from(size_of::<T>()).map_err(io::Error::other)?;
    // SAFETY: the fd is borrowed, so open; `value` and `len` are valid for
    // writes, `len` holds the value's size, which the kernel respects, and
    // any bytes are a valid `T` (`RawOption`).
    #[allow(unsafe_code)]
    let rc = unsafe {
        nix::libc::getsockopt(fd.as_fd().as_raw_fd(), level, name, (&raw mut value).cast(), &raw mut len)
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((value, usize::try_from(len).unwrap_or(0)))
}

/// `setsockopt(level, name)` with an int, for the options `nix` does not wrap.
pub(crate) fn set_int<F: AsFd>(
    fd: &F,
    level: i32,
    name: i32,
    value: i32,
    option: &'static str,
) -> Result<(), SockoptError> {
    use std::os::fd::AsRawFd as _;
    let len = nix::libc::socklen_t::try_from(size_of::<i32>()).expect("4 fits socklen_t");
    // SAFETY: the fd is borrowed, so open; the value pointer and length describe `value`.
    #[allow(unsafe_code)]
    let rc =
        unsafe { nix::libc::setsockopt(fd.as_fd().as_raw_fd(), level, name, (&raw const value).cast(), len) };
    if rc != 0 {
        return Err(SockoptError { option, source: io::Error::last_os_error() });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::net::{TcpListener, TcpStream};

    use nix::sys::socket::getsockopt;

    use super::*;

    #[test]
    fn options_reach_the_socket() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let tcp = TcpConfig {
            keepalive_idle: Duration::from_secs(31),
            keepalive_interval: Duration::from_secs(7),
            keepalive_count: 4,
            user_timeout: Duration::from_millis(45_000),
        };
        apply(&stream, &tcp).unwrap();
        assert!(getsockopt(&stream, sockopt::TcpNoDelay).unwrap());
        assert!(getsockopt(&stream, sockopt::KeepAlive).unwrap());
        assert_eq!(getsockopt(&stream, sockopt::TcpKeepIdle).unwrap(), 31);
        assert_eq!(getsockopt(&stream, sockopt::TcpKeepInterval).unwrap(), 7);
        assert_eq!(getsockopt(&stream, sockopt::TcpKeepCount).unwrap(), 4);
        assert_eq!(getsockopt(&stream, sockopt::TcpUserTimeout).unwrap(), 45_000);
        reset_on_close(&stream).unwrap();
        // An accepted socket's clamp comes from the handshake; fixing its
        // buffer raises it.
        let (accepted, _) = listener.accept().unwrap();
        assert!(window_clamp(&accepted).unwrap() < 4 << 20);
        fix_receive_buffer(&accepted, 4 << 20).unwrap();
        assert!(window_clamp(&accepted).unwrap() >= 4 << 20);
        let linger = getsockopt(&stream, sockopt::Linger).unwrap();
        assert_eq!((linger.l_onoff, linger.l_linger), (1, 0));
    }

    #[test]
    fn a_connection_waits_for_its_long_lived_options_well_under_their_times() {
        let tcp = |idle, user_timeout| TcpConfig {
            keepalive_idle: Duration::from_secs(idle),
            keepalive_interval: Duration::from_secs(7),
            keepalive_count: 4,
            user_timeout: Duration::from_secs(user_timeout),
        };
        assert_eq!(tcp(30, 60).long_lived_after(), Duration::from_secs(1));
        assert_eq!(tcp(30, 0).long_lived_after(), Duration::from_secs(1));
        assert_eq!(tcp(2, 60).long_lived_after(), Duration::from_millis(500));
        assert_eq!(tcp(30, 2).long_lived_after(), Duration::from_millis(500));
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        apply_at_connect(&stream).unwrap();
        assert!(getsockopt(&stream, sockopt::TcpNoDelay).unwrap());
        assert!(!getsockopt(&stream, sockopt::KeepAlive).unwrap(), "keepalive waits");
        assert_eq!(getsockopt(&stream, sockopt::TcpUserTimeout).unwrap(), 0, "so does the user timeout");
    }

    #[test]
    fn accepted_sockets_inherit_the_listeners_options() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let plain = {
            let _client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            listener.accept().unwrap().0
        };
        assert!(!getsockopt(&plain, sockopt::TcpNoDelay).unwrap());
        assert!(!getsockopt(&plain, sockopt::KeepAlive).unwrap());
        for (idle, user_timeout) in [(31, 45_000), (90, 0)] {
            let tcp = TcpConfig {
                keepalive_idle: Duration::from_secs(idle),
                keepalive_interval: Duration::from_secs(7),
                keepalive_count: 4,
                user_timeout: Duration::from_millis(user_timeout),
            };
            apply(&listener, &tcp).unwrap();
            let _client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (accepted, _) = listener.accept().unwrap();
            assert!(getsockopt(&accepted, sockopt::TcpNoDelay).unwrap());
            assert!(getsockopt(&accepted, sockopt::KeepAlive).unwrap());
            assert_eq!(getsockopt(&accepted, sockopt::TcpKeepIdle).unwrap(), u32::try_from(idle).unwrap());
            assert_eq!(getsockopt(&accepted, sockopt::TcpKeepInterval).unwrap(), 7);
            assert_eq!(getsockopt(&accepted, sockopt::TcpKeepCount).unwrap(), 4);
            assert_eq!(
                getsockopt(&accepted, sockopt::TcpUserTimeout).unwrap(),
                u32::try_from(user_timeout).unwrap()
            );
        }
    }
}
