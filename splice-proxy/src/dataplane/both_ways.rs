//! What every plane does around its directions: runs both until they end
//! or one fails, carries a half-close across, and turns a failure into a
//! reset of both sockets.

use std::{
    io,
    os::fd::{AsFd, AsRawFd as _},
    pin::{Pin, pin},
    sync::atomic::AtomicU64,
    task::{Context, Poll, Waker},
};

use tokio::{io::Interest, net::TcpStream};
use tokio_util::sync::CancellationToken;

use super::transfer::{ByteProgress, Ending, Side, Sockets, Transfer};
use crate::sockopt;

/// An I/O error in one direction, by where it happened.
#[derive(Debug)]
pub(crate) enum PumpError {
    Read(io::Error),
    Write(io::Error),
}

impl PumpError {
    /// The side the error belongs to, given the sides this direction reads and writes.
    fn side(self, reads: Side, writes: Side) -> (Side, io::Error) {
        match self {
            Self::Read(e) => (reads, e),
            Self::Write(e) => (writes, e),
        }
    }
}

/// Runs the client→upstream (`up`) and upstream→client (`down`) directions
/// until both end, one fails, or `stop` is cancelled. The directions come
/// pinned by the caller: taken by value and pinned here, each would be
/// stored twice in this future (the argument and the pinned local), and an
/// idle connection holds this future for as long as it is open.
pub(crate) async fn drive(
    mut up: Pin<&mut impl Future<Output = Result<(), PumpError>>>,
    mut down: Pin<&mut impl Future<Output = Result<(), PumpError>>>,
    stop: &CancellationToken,
) -> Ending {
    let (mut up_done, mut down_done) = (false, false);
    loop {
        let result = tokio::select! {
            r = up.as_mut(), if !up_done => {
                up_done = true;
                r.map_err(|e| e.side(Side::Downstream, Side::Upstream))
            }
            r = down.as_mut(), if !down_done => {
                down_done = true;
                r.map_err(|e| e.side(Side::Upstream, Side::Downstream))
            }
            () = stop.cancelled() => return Ending::Stopped,
        };
        match result {
            Err((side, error)) => return Ending::of_error(side, &error),
            Ok(()) if up_done && down_done => return Ending::Completed,
            Ok(()) => {}
        }
    }
}

/// A connection that did not complete is closed with a reset on both sides.
pub(crate) fn finish<F: AsFd>(ending: Ending, client: &F, upstream: &F) {
    if ending != Ending::Completed {
        // Best effort: the socket may already be gone, and it is closed next anyway.
        let _ = sockopt::reset_on_close(client);
        let _ = sockopt::reset_on_close(upstream);
    }
}

/// Waits until `from` has a byte to read or its EOF: whether it has a byte.
/// Readiness alone is not enough: an accepted socket can be reported
/// readable with nothing to read (seen on every idle connection of the
/// bench), and the copy and splice planes allocate their buffer or pipe
/// only once this says there is a byte, so an idle connection holds
/// neither, and a direction that only ends (most short connections' other
/// half) never makes one.
pub(crate) async fn data_or_eof(from: &TcpStream) -> io::Result<bool> {
    from.peek(&mut [0u8; 1]).await.map(|n| n > 0)
}

/// One `recv` into `buf`, as `try_read`, except that a read that did not
/// fill `buf` also clears `from`'s read readiness, as nginx and HAProxy do:
/// such a read took all the socket held, so the next one waits for the
/// kernel's next event instead of asking again and being told `EAGAIN`
/// (one system call saved per message). Nothing is missed: tokio clears the
/// readiness only if no event came since it was read, and never clears an
/// end (`EPOLLRDHUP`), so data or a FIN that arrives after the read wakes
/// the task again.
pub(crate) fn try_read_all_there_is(from: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    let mut short = None;
    let read = from.try_io(Interest::READABLE, || {
        let n = from.try_read(buf)?;
        if n > 0 && n < buf.len() {
            short = Some(n);
            // Tells tokio the socket is drained: it clears the readiness.
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match (read, short) {
        (_, Some(n)) => Ok(n),
        (read, None) => read,
    }
}

/// `shutdown(SHUT_WR)`: the peer reads EOF once it has read everything before.
pub(crate) fn shutdown_write<F: AsFd>(socket: &F) -> io::Result<()> {
    nix::sys::socket::shutdown(socket.as_fd().as_raw_fd(), nix::sys::socket::Shutdown::Write)
        .map_err(io::Error::from)
}

/// After a read that left `*filled` bytes in `buf` without filling it:
/// whether `from`'s end comes right behind them, so that they can leave
/// with the FIN in one segment ([`send_last`]). A short answer and its
/// close (the greeting of a server that closes, a TLS answer and its
/// `close_notify`) then cost the client one packet and no separate
/// acknowledgement, as they do through HAProxy, which sends the last
/// bytes of a response it is about to close with `MSG_MORE`.
///
/// No system call unless the socket's readiness already reports a clean
/// end (a FIN arrived, `EPOLLRDHUP`, and no error); then reads once more to
/// confirm it, appending any bytes that came in between.
#[must_use]
pub(crate) fn end_follows(from: &TcpStream, buf: &mut [u8], filled: &mut usize) -> Behind {
    if *filled == buf.len() || !end_arrived(from) {
        return Behind::More;
    }
    loop {
        match from.try_read(&mut buf[*filled..]) {
            Ok(0) => return Behind::End,
            Ok(n) => {
                *filled += n;
                if *filled == buf.len() {
                    return Behind::More;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Behind::More,
            Err(e) => return Behind::Failure(e),
        }
    }
}

/// What comes right behind bytes read ([`end_follows`]).
#[derive(Debug)]
pub(crate) enum Behind {
    /// More bytes, or nothing yet: write them on and read again.
    More,
    /// The source's end: the bytes go with it ([`send_last`]).
    End,
    /// The source failed (a reset came in between): the bytes are written
    /// on first, then the error is the direction's, as the next read would
    /// have made it. Not read again: Linux reports a socket's error once,
    /// and the read after it would see a clean EOF.
    Failure(io::Error),
}

/// Whether `from`'s readiness reports a clean end (`READ_CLOSED`, which
/// tokio never clears, with no `ERROR`: a reset sets both), without
/// waiting or a system call: the readiness future is polled once, and
/// dropped if it is not ready.
fn end_arrived(from: &TcpStream) -> bool {
    let mut cx = Context::from_waker(Waker::noop());
    matches!(
        pin!(from.ready(Interest::READABLE | Interest::ERROR)).poll(&mut cx),
        Poll::Ready(Ok(ready)) if ready.is_read_closed() && !ready.is_error()
    )
}

/// Writes `data`, a direction's last bytes, and the end behind them: with
/// `MSG_MORE`, so the kernel holds them, then `shutdown(SHUT_WR)`, which
/// sends them with the FIN in one segment. Returns how many bytes were
/// written; the shutdown is done only when that is all of them (a full
/// send buffer took fewer), else it is the caller's, once the rest has
/// followed in plain writes, which send what was held.
pub(crate) fn send_last(to: &TcpStream, data: &[u8]) -> io::Result<usize> {
    use nix::{
        libc::MSG_MORE,
        sys::socket::{MsgFlags, send},
    };
    // nix names no MSG_MORE flag; the bit is the kernel's.
    let flags = MsgFlags::from_bits_retain(MSG_MORE) | MsgFlags::MSG_NOSIGNAL;
    let written =
        match to.try_io(Interest::WRITABLE, || send(to.as_raw_fd(), data, flags).map_err(io::Error::from)) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err(e),
        };
    if written == data.len() {
        shutdown_write(to)?;
    }
    Ok(written)
}

/// How a pump left its direction at the source's EOF.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PumpEnd {
    /// The end went out with the last bytes ([`send_last`]).
    Sent,
    /// The end is still to be sent: `to`'s write side is open.
    ToSend,
}

/// How one direction moves bytes through user space (a buffer, or a pipe
/// with splice(2)).
pub(crate) trait Pump: Copy {
    /// Moves `from` → `to` until EOF; adds every byte moved to `moved`.
    /// Called once `from` has a byte. The end is the caller's to send,
    /// unless the pump sent it with the last bytes.
    fn run<'a>(
        self,
        from: &'a TcpStream,
        to: &'a TcpStream,
        moved: &'a AtomicU64,
    ) -> impl Future<Output = Result<PumpEnd, PumpError>> + Send + 'a;
}

/// Forwards both directions of `sockets` with `pump`, counting into
/// `progress`, until both end, a side fails or `stop` is cancelled; then
/// closes both sockets.
pub(crate) async fn forward_in_user_space(
    sockets: Sockets,
    stop: &CancellationToken,
    progress: &ByteProgress,
    pump: impl Pump,
) -> Transfer {
    // Every field moved out (none left for `sockets` to drop at the end),
    // so the future does not keep the whole struct besides its parts.
    let Sockets { client, upstream, ends_sent, client_read: _, upstream_options_due } = sockets;
    debug_assert!(upstream_options_due.is_none(), "a plane that defers them sets them before it hands over");
    let up = pin!(one_way(pump, [&client, &upstream], &progress.client_to_upstream, ends_sent.to_upstream));
    let down = pin!(one_way(pump, [&upstream, &client], &progress.upstream_to_client, ends_sent.to_client));
    let ending = drive(up, down, stop).await;
    finish(ending, &client, &upstream);
    Transfer::counted(progress, ending)
}

/// One direction, `[from, to]`: waits for a first byte, then pumps; an EOF
/// first is carried across at once, with no pump. Nothing is read when an
/// earlier plane has sent the end already (`end_sent`: it read the EOF).
/// The pump is boxed: an idle connection holds only the wait, and the
/// buffer or pipe is allocated once there is something to move. (The
/// direction that ends last could leave its FIN to the close that follows,
/// one system call fewer, but telling it so costs every idle connection's
/// future a shared counter.)
async fn one_way(
    pump: impl Pump,
    [from, to]: [&TcpStream; 2],
    moved: &AtomicU64,
    end_sent: bool,
) -> Result<(), PumpError> {
    let end = if end_sent {
        PumpEnd::Sent
    } else if data_or_eof(from).await.map_err(PumpError::Read)? {
        Box::pin(pump.run(from, to, moved)).await?
    } else {
        PumpEnd::ToSend
    };
    if end == PumpEnd::ToSend {
        shutdown_write(to).map_err(PumpError::Write)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::{
        io::{AsyncWriteExt as _, Interest},
        net::{TcpListener, TcpStream},
        time::timeout,
    };

    use super::{end_follows, try_read_all_there_is};
    use crate::{
        dataplane::{
            both_ways::Pump as _,
            copy::{CopyPump, read_some},
        },
        tcpstat::segments_received,
    };

    /// A connected pair on loopback: (the side read here, its peer).
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let connecting = TcpStream::connect(listener.local_addr().unwrap());
        let (accepted, connected) = tokio::join!(listener.accept(), connecting);
        (accepted.unwrap().0, connected.unwrap())
    }

    async fn read_when_ready(stream: &TcpStream, buf: &mut [u8]) -> usize {
        loop {
            timeout(Duration::from_secs(5), stream.readable()).await.expect("never readable").unwrap();
            match try_read_all_there_is(stream, buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                result => return result.unwrap(),
            }
        }
    }

    #[tokio::test]
    async fn a_short_read_waits_for_the_next_bytes_and_misses_none() {
        let (stream, mut peer) = pair().await;
        let mut buf = [0u8; 64];
        peer.write_all(b"first").await.unwrap();
        assert_eq!(read_when_ready(&stream, &mut buf).await, 5);
        // Drained: not readable again until something new comes.
        assert!(timeout(Duration::from_millis(50), stream.readable()).await.is_err());
        peer.write_all(b"second").await.unwrap();
        assert_eq!(read_when_ready(&stream, &mut buf).await, 6);
        assert_eq!(&buf[..6], b"second");
    }

    #[tokio::test]
    async fn an_end_queued_behind_a_short_read_still_wakes_the_reader() {
        // Both the bytes and the FIN are there before the first read.
        let stream = ended_after(b"last").await;
        let mut buf = [0u8; 64];
        assert_eq!(read_when_ready(&stream, &mut buf).await, 4);
        assert_eq!(read_when_ready(&stream, &mut buf).await, 0, "the end is read");
    }

    /// A socket whose peer sent `bytes` and its FIN, both arrived (the
    /// readiness reports the end).
    async fn ended_after(bytes: &[u8]) -> TcpStream {
        let (stream, mut peer) = pair().await;
        peer.write_all(bytes).await.unwrap();
        peer.shutdown().await.unwrap();
        until_end_arrived(&stream).await;
        stream
    }

    /// Waits until `stream`'s readiness reports its peer's end.
    async fn until_end_arrived(stream: &TcpStream) {
        while !stream.ready(Interest::READABLE).await.unwrap().is_read_closed() {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn an_end_right_behind_the_bytes_is_found_by_one_more_read() {
        let stream = ended_after(b"last").await;
        let mut buf = [0u8; 64];
        let mut filled = read_when_ready(&stream, &mut buf).await;
        assert_eq!(filled, 4);
        assert!(matches!(end_follows(&stream, &mut buf, &mut filled), super::Behind::End));
        assert_eq!((filled, &buf[..4]), (4, &b"last"[..]));
    }

    #[tokio::test]
    async fn bytes_with_no_end_behind_them_are_not_taken_for_the_last() {
        let (stream, mut peer) = pair().await;
        peer.write_all(b"more to come").await.unwrap();
        let mut buf = [0u8; 64];
        let mut filled = read_when_ready(&stream, &mut buf).await;
        assert!(matches!(end_follows(&stream, &mut buf, &mut filled), super::Behind::More));
        assert_eq!(filled, 12);
        peer.write_all(b"!").await.unwrap();
        assert_eq!(read_when_ready(&stream, &mut buf).await, 1, "the stream goes on");
    }

    /// What a server that answers and closes sends reaches the client in
    /// one segment, bytes and FIN, through the copy plane.
    #[tokio::test]
    async fn the_last_bytes_and_the_end_reach_the_client_in_one_segment() {
        let (from_upstream, mut upstream) = pair().await;
        let (to_client, mut client) = pair().await;
        let before = segments_received(&client).unwrap();
        upstream.write_all(b"answer").await.unwrap();
        upstream.shutdown().await.unwrap();
        until_end_arrived(&from_upstream).await;
        let moved = std::sync::atomic::AtomicU64::new(0);
        let end = CopyPump { buffer_size: 1 << 16 }.run(&from_upstream, &to_client, &moved).await.unwrap();
        assert_eq!(end, super::PumpEnd::Sent);
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        loop {
            match read_some(&client, &mut buf).await.unwrap() {
                0 => break,
                n => got.extend_from_slice(&buf[..n]),
            }
        }
        assert_eq!(got, b"answer");
        assert_eq!(moved.into_inner(), 6);
        assert_eq!(segments_received(&client).unwrap() - before, 1, "bytes and FIN in one segment");
        client.shutdown().await.unwrap();
    }

    /// A source that resets right behind its last bytes: the bytes still
    /// reach the client, then the reset ends the direction.
    #[tokio::test]
    async fn bytes_right_before_a_reset_are_written_on_first() {
        let (from_upstream, mut upstream) = pair().await;
        let (to_client, mut client) = pair().await;
        upstream.write_all(b"answer").await.unwrap();
        crate::sockopt::reset_on_close(&upstream).unwrap();
        drop(upstream);
        until_end_arrived(&from_upstream).await;
        let moved = std::sync::atomic::AtomicU64::new(0);
        let pumped = CopyPump { buffer_size: 1 << 16 }.run(&from_upstream, &to_client, &moved).await;
        assert!(
            matches!(&pumped, Err(super::PumpError::Read(e)) if e.kind() == std::io::ErrorKind::ConnectionReset),
            "{pumped:?}"
        );
        let mut got = [0u8; 6];
        timeout(Duration::from_secs(5), tokio::io::AsyncReadExt::read_exact(&mut client, &mut got))
            .await
            .expect("the bytes never came")
            .unwrap();
        assert_eq!(&got, b"answer");
    }

    /// An end an earlier plane sent is not sent again: the upstream has
    /// closed too by now (the socket is closed, a second `shutdown` fails
    /// with ENOTCONN), and the connection completes.
    #[tokio::test]
    async fn an_end_sent_before_is_not_sent_again() {
        use tokio_util::sync::CancellationToken;

        use crate::dataplane::transfer::{ByteProgress, Ending, EndsSent, Sockets};
        let (from_client, mut client) = pair().await;
        let (to_upstream, mut upstream) = pair().await;
        super::shutdown_write(&to_upstream).unwrap();
        let mut rest = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut upstream, &mut rest).await.unwrap();
        upstream.shutdown().await.unwrap();
        until_end_arrived(&to_upstream).await;
        client.shutdown().await.unwrap();
        let sockets = Sockets {
            client: from_client,
            upstream: to_upstream,
            client_read: 0,
            ends_sent: EndsSent { to_upstream: true, to_client: false },
            upstream_options_due: None,
        };
        let (stop, progress) = (CancellationToken::new(), ByteProgress::default());
        let pump = CopyPump { buffer_size: 1 << 16 };
        let transfer = super::forward_in_user_space(sockets, &stop, &progress, pump).await;
        assert_eq!(transfer.ending, Ending::Completed);
    }

    #[tokio::test]
    async fn a_full_read_leaves_the_rest_readable() {
        let (stream, mut peer) = pair().await;
        peer.write_all(&[7u8; 100]).await.unwrap();
        let mut buf = [0u8; 60];
        assert_eq!(read_when_ready(&stream, &mut buf).await, 60);
        assert_eq!(try_read_all_there_is(&stream, &mut buf).unwrap(), 40, "read at once, no wait");
    }
}
