//! How far a TCP socket has got, read with two system calls `nix` does not wrap.
//!
//! `sent_total` = `tcpi_bytes_acked` + SIOCOUTQ (unacknowledged and unsent
//! bytes) = every byte ever queued for sending on the socket, plus one for the
//! acknowledged SYN (so only differences mean anything). The sockmap data
//! plane compares it with what the verdict program redirected to the socket:
//! equal means no redirected byte is left on the kernel's psock queue.

use std::{
    io,
    os::fd::{AsFd, AsRawFd as _},
};

use nix::libc;

use crate::sockopt;

/// Offsets of `tcpi_bytes_acked` and `tcpi_bytes_received` in the kernel's
/// `struct tcp_info` (stable uapi since Linux 4.1/4.2).
const BYTES_ACKED_OFFSET: usize = 120;
const BYTES_RECEIVED_OFFSET: usize = 128;
/// Offset of `tcpi_segs_in` (a `u32`, since Linux 4.2).
const SEGMENTS_RECEIVED_OFFSET: usize = 140;

/// The `N` bytes of `struct tcp_info` at `offset`.
fn tcp_info_field<F: AsFd, const N: usize>(socket: &F, offset: usize) -> io::Result<[u8; N]> {
    let (info, len): ([u8; 256], _) = sockopt::get(socket, libc::IPPROTO_TCP, libc::TCP_INFO)?;
    info.get(offset..offset + N)
        .filter(|_| len >= offset + N)
        .and_then(|field| field.try_into().ok())
        .ok_or_else(|| io::Error::other(format!("tcp_info too short for a field at {offset}")))
}

/// `u64` field of `struct tcp_info` at `offset`.
fn tcp_info_u64<F: AsFd>(socket: &F, offset: usize) -> io::Result<u64> {
    tcp_info_field(socket, offset).map(u64::from_ne_bytes)
}

/// Segments `socket` has received (`tcpi_segs_in`), the handshake's
/// included: what tests compare to see how many packets a peer was sent.
pub fn segments_received<F: AsFd>(socket: &F) -> io::Result<u32> {
    tcp_info_field(socket, SEGMENTS_RECEIVED_OFFSET).map(u32::from_ne_bytes)
}

/// Bytes received in order on `socket` (`tcpi_bytes_received`; duplicates
/// not counted, a received FIN counts as one).
pub fn received_total<F: AsFd>(socket: &F) -> io::Result<u64> {
    tcp_info_u64(socket, BYTES_RECEIVED_OFFSET)
}

/// Bytes ever queued for sending on `socket`.
pub fn sent_total<F: AsFd>(socket: &F) -> io::Result<u64> {
    let acked = tcp_info_u64(socket, BYTES_ACKED_OFFSET)?;
    Ok(acked + unsent_bytes(socket)?)
}

/// Bytes queued on `socket` and not yet acknowledged, sent or not (SIOCOUTQ).
pub fn unsent_bytes<F: AsFd>(socket: &F) -> io::Result<u64> {
    let fd = socket.as_fd().as_raw_fd();
    let mut outq: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int through the pointer, which is valid.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &raw mut outq) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u64::try_from(outq).unwrap_or(0))
}

/// Bytes ready to be read on `socket` (SIOCINQ; for a socket in a socket
/// map, what its psock queued for user space).
pub fn readable_bytes<F: AsFd>(socket: &F) -> io::Result<u64> {
    let fd = socket.as_fd().as_raw_fd();
    let mut inq: libc::c_int = 0;
    // SAFETY: SIOCINQ writes one int through the pointer, which is valid.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::ioctl(fd, libc::FIONREAD, &raw mut inq) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u64::try_from(inq).unwrap_or(0))
}

/// The pending error of `socket` (SO_ERROR), if any; reading it clears it.
pub fn take_error<F: AsFd>(socket: &F) -> Option<io::Error> {
    match nix::sys::socket::getsockopt(socket, nix::sys::socket::sockopt::SocketError) {
        Ok(0) => None,
        Ok(errno) => Some(io::Error::from_raw_os_error(errno)),
        Err(errno) => Some(errno.into()),
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read as _, Write as _},
        net::{TcpListener, TcpStream},
    };

    use super::*;

    #[test]
    fn sent_total_counts_every_byte_written() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        // The acknowledged SYN counts as one byte, so compare with a baseline.
        let base = sent_total(&client).unwrap();
        client.write_all(&[7u8; 100_000]).unwrap();
        // Whether acknowledged yet or still queued, all of it counts.
        assert_eq!(sent_total(&client).unwrap() - base, 100_000);
        let mut buf = vec![0u8; 100_000];
        server.read_exact(&mut buf).unwrap();
        assert_eq!(sent_total(&client).unwrap() - base, 100_000);
        assert_eq!(received_total(&server).unwrap(), 100_000);
        // The FIN counts as one byte.
        client.shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!(server.read(&mut buf).unwrap(), 0);
        assert_eq!(received_total(&server).unwrap(), 100_001);
        assert!(take_error(&client).is_none());
    }
}
