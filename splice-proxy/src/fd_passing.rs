//! Descriptors passed between processes over a Unix stream socket
//! (SCM_RIGHTS): the listening sockets at an upgrade, the packet plane's
//! flow map to its reset helper.

use std::{
    io::{IoSlice, IoSliceMut},
    os::{
        fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd, RawFd},
        unix::net::UnixStream,
    },
};

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};

/// The most descriptors one message carries (an upgrade's: 64 guarded
/// listen ports and the admin endpoint).
pub const MAX_FDS: usize = 80;

/// What one message brought: its bytes, the descriptors (owned: closed when
/// dropped), and whether more descriptors were sent than [`MAX_FDS`].
#[derive(Debug)]
pub struct Received {
    pub len: usize,
    pub fds: Vec<OwnedFd>,
    pub truncated: bool,
}

/// Sends `bytes` with `fds` in one message.
pub fn send(stream: &UnixStream, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> std::io::Result<()> {
    let raw: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
    let cmsg = [ControlMessage::ScmRights(&raw)];
    sendmsg::<()>(stream.as_raw_fd(), &[IoSlice::new(bytes)], &cmsg, MsgFlags::empty(), None)?;
    Ok(())
}

/// Receives one message into `buffer`, its descriptors close-on-exec.
pub fn receive(stream: &UnixStream, buffer: &mut [u8]) -> std::io::Result<Received> {
    let mut iov = [IoSliceMut::new(buffer)];
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let msg = recvmsg::<()>(stream.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)?;
    let mut fds = Vec::new();
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(received) = cmsg {
            fds.extend(received.into_iter().map(own));
        }
    }
    Ok(Received { len: msg.bytes, fds, truncated: msg.flags.contains(MsgFlags::MSG_CTRUNC) })
}

/// A descriptor received with SCM_RIGHTS, owned (closed when dropped).
#[allow(unsafe_code)] // nix hands received descriptors over as raw ones.
fn own(fd: RawFd) -> OwnedFd {
    // SAFETY: the kernel installed `fd` in this process for the message just
    // received; nothing else refers to it.
    unsafe { OwnedFd::from_raw_fd(fd) }
}
