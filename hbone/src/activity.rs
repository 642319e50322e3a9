//! How many streams of one HTTP/2 connection are open, so that a connection with none for a
//! while can be closed.

use std::time::Duration;

use tokio::sync::watch;

/// The open streams of one connection.
#[derive(Debug, Clone)]
pub(crate) struct Activity(watch::Sender<Streams>);

#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Streams {
    open: usize,
    /// Whether any stream was ever opened: the first may be given less time than later gaps.
    ever: bool,
}

/// One open stream; dropping it closes it.
#[derive(Debug)]
pub(crate) struct StreamGuard(watch::Sender<Streams>);

impl Activity {
    pub(crate) fn new() -> Self {
        Self(watch::Sender::new(Streams::default()))
    }

    pub(crate) fn open(&self) -> StreamGuard {
        self.0.send_modify(|s| {
            s.open += 1;
            s.ever = true;
        });
        StreamGuard(self.0.clone())
    }

    /// Resolves once the connection has had no open stream for `idle`, or for `first` when
    /// it never had one.
    pub(crate) async fn idle(&self, first: Duration, idle: Duration) {
        let mut changes = self.0.subscribe();
        loop {
            let now = *changes.borrow_and_update();
            if now.open > 0 {
                // The sender lives in `self`, so `changed` never fails here.
                let _ = changes.changed().await;
                continue;
            }
            let wait = if now.ever { idle } else { first };
            tokio::select! {
                () = tokio::time::sleep(wait) => return,
                _ = changes.changed() => {}
            }
        }
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.send_modify(|s| s.open -= 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_only_after_the_last_stream_closes_and_the_time_has_passed() {
        let activity = Activity::new();
        let started = tokio::time::Instant::now();
        activity
            .idle(Duration::from_secs(10), Duration::from_secs(60))
            .await;
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(10),
            "never used: `first`"
        );

        let stream = activity.open();
        let watcher = {
            let activity = activity.clone();
            tokio::spawn(async move {
                activity
                    .idle(Duration::from_secs(10), Duration::from_secs(60))
                    .await;
                tokio::time::Instant::now()
            })
        };
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert!(
            !watcher.is_finished(),
            "a connection with an open stream is not idle"
        );
        let closed = tokio::time::Instant::now();
        drop(stream);
        let idle_at = watcher.await.expect("watcher");
        assert_eq!(
            idle_at - closed,
            Duration::from_secs(60),
            "`idle` after the last stream"
        );
    }
}
