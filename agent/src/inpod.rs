//! The proxy's sockets inside a pod: listeners on the in-pod ports, and the upstream sockets
//! the proxy connects from, all carrying the proxy mark so capture leaves them alone.

use std::{io, net::SocketAddr};

use socket2::{Domain, Protocol, Socket, Type};

use crate::netns::PodNetns;

/// How many connections may wait in a listener's accept queue.
const BACKLOG: i32 = 1024;

/// Opens a TCP listener on `addr` inside the pod's namespace.
pub fn listen(
    netns: &PodNetns,
    addr: SocketAddr,
    mark: u32,
) -> io::Result<tokio::net::TcpListener> {
    let socket = netns.run(|| {
        let socket = new_socket(addr, mark)?;
        socket.set_reuse_address(true)?;
        socket.bind(&addr.into())?;
        socket.listen(BACKLOG)?;
        Ok(socket)
    })?;
    tokio::net::TcpListener::from_std(socket.into())
}

/// Creates an unconnected TCP socket inside the pod's namespace, ready for `connect()`.
pub fn tcp_socket(
    netns: &PodNetns,
    dst: SocketAddr,
    mark: u32,
) -> io::Result<tokio::net::TcpSocket> {
    let socket = netns.run(|| new_socket(dst, mark))?;
    socket.set_tcp_nodelay(true)?;
    Ok(tokio::net::TcpSocket::from_std_stream(socket.into()))
}

fn new_socket(addr: SocketAddr, mark: u32) -> io::Result<Socket> {
    let domain = Domain::for_address(addr);
    let socket = Socket::new(
        domain,
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )?;
    socket.set_mark(mark)?;
    Ok(socket)
}
