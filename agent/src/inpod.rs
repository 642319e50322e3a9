//! The proxy's sockets inside a pod: listeners on the in-pod ports, the upstream sockets the
//! proxy connects from, and the transparent sockets that reach the application with the
//! client's address as source. All carry one of the proxy's marks, so capture leaves them
//! alone.

mod routing;

use std::{
    io,
    net::{IpAddr, SocketAddr},
};

use socket2::{Domain, Protocol, Socket, Type};

pub use self::routing::{RoutingError, install_routing, remove_routing};
use crate::netns::PodNetns;

/// How many connections may wait in a listener's accept queue.
const BACKLOG: i32 = 1024;

/// Opens a TCP listener on `addr` inside the pod's namespace, one of a SO_REUSEPORT group:
/// each proxy worker has its own, and the kernel spreads new connections among them. Not yet
/// registered with a runtime: the worker that serves it does that.
pub fn listen(netns: &PodNetns, addr: SocketAddr, mark: u32) -> io::Result<std::net::TcpListener> {
    let socket = netns.run(|| {
        let socket = new_socket(addr, mark)?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.bind(&addr.into())?;
        socket.listen(BACKLOG)?;
        Ok(socket)
    })?;
    Ok(socket.into())
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

/// Creates a socket inside the pod's namespace bound to `source`, an address that belongs to
/// another pod (IP_TRANSPARENT), to connect to the application in this pod. The pod's routing
/// rule for `mark` brings the application's replies back to it.
pub fn transparent_socket(
    netns: &PodNetns,
    source: IpAddr,
    mark: u32,
) -> io::Result<tokio::net::TcpSocket> {
    let local = SocketAddr::new(source, 0);
    let socket = netns.run(|| {
        let socket = new_socket(local, mark)?;
        socket.set_ip_transparent_v4(true)?;
        socket.bind(&local.into())?;
        Ok(socket)
    })?;
    socket.set_tcp_nodelay(true)?;
    Ok(tokio::net::TcpSocket::from_std_stream(socket.into()))
}

fn new_socket(addr: SocketAddr, mark: u32) -> io::Result<Socket> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )?;
    socket.set_mark(mark)?;
    Ok(socket)
}
