//! Which worker serves an accepted HBONE connection. The kernel's SO_REUSEPORT hash puts each
//! accepted connection on one of the workers' listeners at random, and a peer's agent opens
//! one pooled connection per worker of its own, carrying all of that worker's tunnels: when
//! two of them land on one worker here, every byte of both goes through one thread while the
//! other idles (four iperf3 streams across nodes: 8.1 to 8.7 Gbit/s with one of the
//! destination's workers busy and the other idle, against 10.4 with both busy). So an HBONE
//! connection is served by the worker serving the fewest, the accepting one among equals. It
//! moves once, before its TLS handshake, and its tunnels then live on the worker serving it.

use std::{
    future::Future,
    io,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use tokio::{net::TcpStream, runtime::Handle};

/// Open HBONE connections served by each worker.
#[derive(Debug)]
pub struct Spread {
    serving: Arc<[AtomicUsize]>,
}

impl Spread {
    pub fn new(workers: usize) -> Self {
        Self {
            serving: (0..workers.max(1)).map(|_| AtomicUsize::new(0)).collect(),
        }
    }

    /// The worker to serve a connection accepted on `accepting`, counted as serving it until
    /// the returned guard is dropped.
    pub fn place(&self, accepting: usize) -> Placed {
        let counts: Vec<usize> = self
            .serving
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        let worker = fewest(&counts, accepting);
        self.serving[worker].fetch_add(1, Ordering::Relaxed);
        Placed {
            serving: self.serving.clone(),
            worker,
        }
    }
}

/// The worker with the fewest connections, `accepting` when it has no more than any other.
fn fewest(counts: &[usize], accepting: usize) -> usize {
    let accepting = accepting.min(counts.len().saturating_sub(1));
    counts
        .iter()
        .enumerate()
        .min_by_key(|&(i, &n)| (n, i != accepting))
        .map_or(accepting, |(i, _)| i)
}

/// A connection counted on its worker.
#[derive(Debug)]
pub struct Placed {
    serving: Arc<[AtomicUsize]>,
    pub worker: usize,
}

impl Drop for Placed {
    fn drop(&mut self) {
        self.serving[self.worker].fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves `stream` on the runtime `to` (another worker's) with `serve`, in a task of its own
/// there. The socket leaves this runtime's reactor and joins that one's.
pub fn move_to<F, Fut>(stream: TcpStream, to: &Handle, serve: F) -> io::Result<()>
where
    F: FnOnce(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let stream = stream.into_std()?;
    to.spawn(async move {
        match TcpStream::from_std(stream) {
            // A task of its own, so that the connection's state is not nested in this one.
            Ok(stream) => drop(tokio::spawn(serve(stream))),
            Err(e) => tracing::warn!(error = %e, "cannot move a connection to another worker"),
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;
    use crate::workers::{self, Workers};

    #[test]
    fn the_accepting_worker_keeps_a_connection_unless_another_serves_fewer() {
        assert_eq!(fewest(&[0, 0], 1), 1);
        assert_eq!(fewest(&[1, 1], 0), 0);
        assert_eq!(fewest(&[1, 0], 0), 1);
        assert_eq!(fewest(&[2, 3, 1], 1), 2);
        assert_eq!(fewest(&[0], 0), 0);
        // An index past the workers (off the workers, say) falls back to a real one.
        assert_eq!(fewest(&[0, 0], 7), 1);
    }

    #[test]
    fn connections_alternate_between_workers_and_leave_their_count() {
        let spread = Spread::new(2);
        // Both accepted on worker 0: the second goes to worker 1.
        let first = spread.place(0);
        let second = spread.place(0);
        assert_eq!((first.worker, second.worker), (0, 1));
        drop(first);
        // Worker 0 serves none again: it takes one accepted on worker 1.
        let third = spread.place(1);
        assert_eq!(third.worker, 0);
        // Both serve one: the accepting worker keeps it.
        let fourth = spread.place(1);
        assert_eq!(fourth.worker, 1);
        drop((second, third, fourth));
        assert!(
            spread
                .serving
                .iter()
                .all(|c| c.load(Ordering::Relaxed) == 0)
        );
    }

    #[test]
    fn a_moved_connection_is_served_on_the_other_worker_with_its_bytes_intact() {
        let workers = Workers::start(2).expect("workers");
        let to = workers.handles()[1].clone();
        let (tx, rx) = std::sync::mpsc::channel();
        workers.handles()[0].spawn(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let addr = listener.local_addr().expect("addr");
            let client = tokio::spawn(async move {
                let mut client = TcpStream::connect(addr).await.expect("connect");
                client.write_all(b"ping").await.expect("write");
                let mut answer = [0u8; 4];
                client.read_exact(&mut answer).await.expect("read");
                answer
            });
            let (stream, _) = listener.accept().await.expect("accept");
            let accepted_on = workers::current();
            // Bytes the client sent before the move are still there after it.
            tokio::time::sleep(Duration::from_millis(20)).await;
            let served = std::sync::mpsc::channel();
            let served_tx = served.0;
            move_to(stream, &to, move |mut stream| async move {
                let mut request = [0u8; 4];
                stream.read_exact(&mut request).await.expect("read");
                assert_eq!(&request, b"ping");
                stream.write_all(b"pong").await.expect("write");
                let _ = served_tx.send(workers::current());
            })
            .expect("move");
            let answer = client.await.expect("client");
            let served_on = served
                .1
                .recv_timeout(Duration::from_secs(10))
                .expect("served");
            let _ = tx.send((accepted_on, served_on, answer));
        });
        let (accepted_on, served_on, answer) = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the exchange ends");
        assert_eq!((accepted_on, served_on), (0, 1));
        assert_eq!(&answer, b"pong");
    }
}
