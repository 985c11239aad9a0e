//! Graceful shutdown on SIGTERM, and the old process's side of a
//! zero-downtime upgrade (SIGQUIT, see docs/operations.md).
//!
//! Pingora stops accepting on SIGTERM (on SIGQUIT, once it has handed its
//! listening sockets to the new process) and waits `server.grace_period`
//! before it stops its runtimes. floodwall adds two things:
//! - streams still open near the end of the grace period are ended with a
//!   final SSE error event (`shutting_down`), so clients see why and can
//!   reconnect elsewhere, instead of a silent cut;
//! - once no request is in flight, the process exits (code 0) at once,
//!   rather than sitting out the rest of the grace period.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::sync::watch;
use tracing::info;

/// Streams are ended this long before the grace period runs out, so the
/// final event is written before Pingora stops the runtimes.
pub const STREAM_MARGIN: Duration = Duration::from_millis(500);

/// How long the process must have been idle before it exits early.
pub const QUIET: Duration = Duration::from_millis(750);

/// Shutdown state shared by the requests.
pub struct Shutdown {
    /// When open streams must be ended; `None` until SIGTERM.
    deadline: watch::Sender<Option<Instant>>,
    /// Requests in flight (held by [`InFlight`] guards).
    in_flight: AtomicUsize,
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown {
            deadline: watch::channel(None).0,
            in_flight: AtomicUsize::new(0),
        }
    }
}

/// Counts one request in flight until dropped.
#[must_use]
pub struct InFlight(Arc<Shutdown>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Shutdown {
    pub fn enter(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Resolves when shutdown is under way and the streams' deadline passed.
    pub async fn streams_must_end(&self) {
        let mut rx = self.deadline.subscribe();
        loop {
            let due = *rx.borrow_and_update();
            match due {
                Some(at) => {
                    tokio::time::sleep_until(at.into()).await;
                    return;
                }
                None => {
                    if rx.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
            }
        }
    }

    pub fn begin(&self, grace: Duration) {
        let at = Instant::now() + grace.saturating_sub(STREAM_MARGIN);
        self.deadline.send_replace(Some(at));
    }
}

/// The background service that drains the process once Pingora's shutdown begins.
pub struct ShutdownService {
    pub state: Arc<Shutdown>,
    pub grace: Duration,
}

#[async_trait]
impl BackgroundService for ShutdownService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        // Pingora broadcasts its shutdown on SIGTERM at once, and on SIGQUIT
        // (zero-downtime upgrade) only after the listening sockets were
        // handed to the new process; either way this process then drains.
        while !*shutdown.borrow() {
            if shutdown.changed().await.is_err() {
                return;
            }
        }
        info!(
            grace_ms = self.grace.as_millis() as u64,
            in_flight = self.state.in_flight(),
            "shutting down: no new connections; waiting for requests in flight"
        );
        self.state.begin(self.grace);
        let deadline = Instant::now() + self.grace;
        // Exit only after no request has been in flight for QUIET: a
        // connection accepted just before the listener closed may not have
        // had its request read yet, and must not find the process gone.
        let mut idle_since: Option<Instant> = None;
        loop {
            let now = Instant::now();
            if self.state.in_flight() == 0 {
                let since = *idle_since.get_or_insert(now);
                if now.duration_since(since) >= QUIET {
                    info!("all requests finished; exiting");
                    // Every line logged so far reaches stderr first.
                    let _ = tokio::task::spawn_blocking(crate::telemetry::writer::flush).await;
                    std::process::exit(0);
                }
            } else {
                idle_since = None;
            }
            if now >= deadline {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}
