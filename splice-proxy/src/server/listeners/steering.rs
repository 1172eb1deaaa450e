//! `listen_sockets = "per-cpu"`: a new connection goes to the socket of
//! the worker pinned to the CPU that took its SYN.
//!
//! A classic BPF program on the listener's SO_REUSEPORT group reads the
//! CPU it runs on (the one processing the SYN, in softirq) and returns the
//! index of the group's socket whose worker is pinned there. The worker
//! that accepts and sets the connection up is then the one on the CPU that
//! took its SYN, and no worker on another CPU takes it over (the rest of
//! the handshake, and the packets after it, arrive on whichever CPU the
//! NIC or the sender puts them). A CPU no worker is
//! pinned to gets an index past the group, and the kernel falls back to
//! its hash of the addresses. Classic BPF, not a map-driven eBPF program:
//! the table is fixed when the listener starts and a few comparisons hold
//! it; the group keeps the program for as long as it lives, across a
//! graceful upgrade, until a new one replaces it or it is detached.

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _},
};

use nix::{
    libc,
    sys::socket::{setsockopt, sockopt},
};

use super::socket::Listener;

/// What the program returns for a CPU without a socket: an index past any
/// group, so the kernel's hash decides (a group's size could change).
const NO_SOCKET: u32 = u32::MAX;

/// The program for a group whose socket `i` is accepted on by a worker
/// pinned to `cpu_of_socket[i]`: the CPU's socket index, else
/// [`NO_SOCKET`] (the kernel's hash decides).
fn program(cpu_of_socket: &[usize]) -> Vec<libc::sock_filter> {
    let op = |code: u32, k: u32, jt: u8, jf: u8| libc::sock_filter { code: code as u16, jt, jf, k };
    let ancillary_cpu = (libc::SKF_AD_OFF + libc::SKF_AD_CPU) as u32;
    let mut code = vec![op(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, ancillary_cpu, 0, 0)];
    for (socket, &cpu) in cpu_of_socket.iter().enumerate() {
        // Equal: the next instruction returns this socket; else skip it.
        code.push(op(libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K, index(cpu), 0, 1));
        code.push(op(libc::BPF_RET | libc::BPF_K, index(socket), 0, 0));
    }
    code.push(op(libc::BPF_RET | libc::BPF_K, NO_SOCKET, 0, 0));
    code
}

fn index(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// CPUs a program covers at most: classic BPF runs 4096 instructions at
/// most, two per CPU here.
const CPUS_AT_MOST: usize = 2000;

/// Steers `group`'s new connections by the CPU that took their SYN;
/// `cpu_of_socket[i]` is the CPU of the worker accepting on socket `i` of
/// the group, in the order the sockets joined it.
pub(super) fn steer_by_cpu(group: &Listener, cpu_of_socket: &[usize]) -> io::Result<()> {
    let mut code = program(&cpu_of_socket[..cpu_of_socket.len().min(CPUS_AT_MOST)]);
    let len = u16::try_from(code.len()).map_err(|_| io::Error::other("steering program too long"))?;
    // The kernel copies the instructions `filter` points at during the call.
    let program = libc::sock_fprog { len, filter: code.as_mut_ptr() };
    setsockopt(group, sockopt::AttachReusePortCbpf, &program).map_err(io::Error::from)
}

/// Takes a steering program off `group` (one a process in `per-cpu` mode
/// attached before a graceful upgrade), so the kernel's hash picks again.
/// A group without one is left as it is; so is one on a kernel without
/// the option (before 5.3), which keeps a program until the group closes.
pub(super) fn stop_steering(group: &Listener) -> io::Result<()> {
    // nix has no `SO_DETACH_REUSEPORT_BPF`. The option reads no value; an
    // int is passed as the kernel expects one.
    let none: libc::c_int = 0;
    let size = libc::socklen_t::try_from(size_of::<libc::c_int>()).unwrap_or(libc::socklen_t::MAX);
    // SAFETY: `none` is a live int of `size` bytes for the whole call; the
    // descriptor is `group`'s, open while it is borrowed.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::setsockopt(
            group.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_DETACH_REUSEPORT_BPF,
            (&raw const none).cast(),
            size,
        )
    };
    let error = io::Error::last_os_error();
    match rc {
        0 => Ok(()),
        _ if matches!(error.raw_os_error(), Some(libc::ENOENT | libc::ENOPROTOOPT)) => Ok(()),
        _ => Err(error),
    }
}

#[cfg(test)]
mod tests {
    use std::{
        net::{Ipv4Addr, SocketAddr, TcpStream},
        time::Duration,
    };

    use super::{program, steer_by_cpu, stop_steering};
    use crate::{addr::ListenAddr, server::listeners::socket::Listener};

    #[test]
    fn the_program_returns_the_socket_of_each_cpu_and_past_the_group_otherwise() {
        let code = program(&[4, 7]);
        // Load the CPU; (cpu == 4 ? 0); (cpu == 7 ? 1); else past any group.
        let returns: Vec<(u32, u32)> = code.iter().map(|op| (u32::from(op.code), op.k)).collect();
        let jeq = nix::libc::BPF_JMP | nix::libc::BPF_JEQ | nix::libc::BPF_K;
        let ret = nix::libc::BPF_RET | nix::libc::BPF_K;
        assert_eq!(returns[1..], [(jeq, 4), (ret, 0), (jeq, 7), (ret, 1), (ret, u32::MAX)]);
        assert!(code.iter().filter(|op| u32::from(op.code) == jeq).all(|op| (op.jt, op.jf) == (0, 1)));
    }

    /// The group's sockets that had a connection waiting (each accepted
    /// and closed), once one has (within a second).
    fn sockets_with_a_connection(group: &[std::net::TcpListener]) -> Vec<usize> {
        for _ in 0..1000 {
            let waiting: Vec<usize> = (0..group.len()).filter(|&i| group[i].accept().is_ok()).collect();
            if !waiting.is_empty() {
                return waiting;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Vec::new()
    }

    #[tokio::test]
    async fn a_connection_goes_to_the_socket_of_the_cpu_its_syn_came_in_on() {
        let cpus = crate::cpus::allowed().unwrap();
        let first = Listener::bind_group(ListenAddr(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))).unwrap();
        let mut group = vec![first];
        while group.len() < cpus.len() {
            group.push(group[0].join().unwrap());
        }
        steer_by_cpu(&group[0], &cpus).unwrap();
        let addr = group[0].addr.0;
        let group: Vec<std::net::TcpListener> = group
            .into_iter()
            .map(|l| {
                let std = l.into_inner().into_std().unwrap();
                std.set_nonblocking(true).unwrap();
                std
            })
            .collect();
        // Several connections from each CPU (from new source ports): the
        // kernel's hash would spread them.
        for _ in 0..8 {
            for (socket, &cpu) in cpus.iter().enumerate() {
                let client = connect_from(cpu, addr);
                assert_eq!(sockets_with_a_connection(&group), [socket], "a connection from CPU {cpu}");
                drop(client);
            }
        }
        // A CPU the program does not list: the kernel's hash picks a
        // socket, the connection is not lost.
        let last = *cpus.last().unwrap();
        steer_by_cpu(&view_of(&group[0]), &cpus[..1]).unwrap();
        for _ in 0..8 {
            let _client = connect_from(last, addr);
            assert_eq!(sockets_with_a_connection(&group).len(), 1, "a connection from unlisted CPU {last}");
        }
        // Without the program the kernel's hash picks, still one socket.
        stop_steering(&view_of(&group[0])).unwrap();
        stop_steering(&view_of(&group[0])).expect("nothing to detach is no error");
        let _client = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
        assert_eq!(sockets_with_a_connection(&group).len(), 1);
    }

    /// A connection to `addr` from a thread pinned to `cpu`: loopback
    /// processes the SYN on the CPU that sends it.
    fn connect_from(cpu: usize, addr: SocketAddr) -> TcpStream {
        std::thread::spawn(move || {
            crate::cpus::pin_this_thread(cpu).unwrap();
            TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap()
        })
        .join()
        .unwrap()
    }

    /// A `Listener` on another descriptor of `socket`, to set options on.
    fn view_of(socket: &std::net::TcpListener) -> Listener {
        Listener::from_fd(std::os::fd::AsFd::as_fd(socket).try_clone_to_owned().unwrap()).unwrap()
    }
}
