//! The proxy's workers: one thread each, running a single-threaded runtime. Every enrolled pod
//! has a set of listeners per worker (SO_REUSEPORT: the kernel spreads new connections among
//! them, sk_lookup's choice included), so a connection is accepted, proxied and tunnelled on
//! one thread: its tasks, its pooled HBONE connection and the tunnels the peer's agent serves
//! never wait for a wakeup on another core. The agent's own work (configuration, capture,
//! certificates, admin endpoints) runs on the main thread's runtime.

use std::{cell::Cell, io, thread::JoinHandle};

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

thread_local! {
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

/// The index of the worker running the caller; 0 off the workers.
pub fn current() -> usize {
    INDEX.get()
}

/// The running workers. Dropping them stops them: tasks still on them are dropped, closing
/// their sockets.
#[derive(Debug)]
pub struct Workers {
    handles: Vec<Handle>,
    stop: CancellationToken,
    threads: Vec<JoinHandle<()>>,
}

impl Workers {
    /// Starts `count` workers (at least one).
    pub fn start(count: usize) -> io::Result<Self> {
        let mut workers = Self {
            handles: Vec::new(),
            stop: CancellationToken::new(),
            threads: Vec::new(),
        };
        for index in 0..count.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            workers.handles.push(runtime.handle().clone());
            let stop = workers.stop.clone();
            let thread = std::thread::Builder::new()
                .name(format!("nodemesh-worker-{index}"))
                .spawn(move || {
                    INDEX.set(index);
                    runtime.block_on(async {
                        tokio::select! {
                            () = stop.cancelled() => {}
                            never = keep_a_deadline_near() => match never {},
                        }
                    });
                })?;
            workers.threads.push(thread);
        }
        Ok(workers)
    }

    /// Each worker's runtime, by index.
    pub fn handles(&self) -> &[Handle] {
        &self.handles
    }
}

/// How far ahead the worker's nearest deadline always is.
const NEAREST_DEADLINE: std::time::Duration = std::time::Duration::from_secs(1);

/// Keeps a deadline at most [`NEAREST_DEADLINE`] ahead on the worker's timers, waking it once
/// a second. Tokio wakes a runtime's driver (an eventfd write, and often one more epoll return)
/// whenever a timer is set earlier than the nearest one pending when it last went to sleep,
/// even from the runtime's own thread: without this, every HTTP request's timeout (seconds
/// ahead, set per request) was such a timer and cost its worker a system call.
async fn keep_a_deadline_near() -> std::convert::Infallible {
    let mut ticks = tokio::time::interval(NEAREST_DEADLINE);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop.cancel();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_worker_runs_its_tasks_on_its_own_thread_and_knows_its_index() {
        let workers = Workers::start(3).expect("workers");
        let seen: Vec<(usize, std::thread::ThreadId)> = workers
            .handles()
            .iter()
            .map(|handle| {
                let (tx, rx) = std::sync::mpsc::channel();
                handle.spawn(async move {
                    // A task spawned from a worker's task stays on that worker.
                    let inner = tokio::spawn(async { (current(), std::thread::current().id()) });
                    let _ = tx.send(inner.await.expect("inner task"));
                });
                rx.recv_timeout(std::time::Duration::from_secs(10))
                    .expect("the worker runs its task")
            })
            .collect();
        let indexes: Vec<usize> = seen.iter().map(|(index, _)| *index).collect();
        assert_eq!(indexes, [0, 1, 2]);
        let threads: std::collections::HashSet<_> = seen.iter().map(|(_, id)| *id).collect();
        assert_eq!(threads.len(), 3, "one thread per worker");
        assert!(
            !threads.contains(&std::thread::current().id()),
            "workers are threads of their own"
        );
    }

    #[test]
    fn stopping_the_workers_drops_what_they_still_run() {
        let workers = Workers::start(1).expect("workers");
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        workers.handles()[0].spawn(async move {
            let _held = tx;
            std::future::pending::<()>().await;
        });
        drop(workers);
        assert_eq!(
            rx.recv_timeout(std::time::Duration::from_secs(10)),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected),
            "the pending task was dropped, and what it held with it"
        );
    }
}
