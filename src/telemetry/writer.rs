//! A non-blocking log writer: request threads hand finished lines to one
//! background thread, which writes them to stderr in batches.
//!
//! Writing each line with its own `write(2)` under the stderr lock made two
//! worker threads contend on every request (measured in BENCHMARKS.md). Here
//! a line is formatted into a thread-local buffer and sent over a bounded
//! channel; the writer thread coalesces whatever is queued into one write.
//! When the channel is full (stderr slower than the request rate) lines are
//! dropped rather than stalling requests, and the drop count is reported on
//! the next line that gets through.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::OnceLock;

/// Lines queued at most before new ones are dropped.
const QUEUE: usize = 16 * 1024;
/// Pause after each write, so that lines arrive in batches.
const BATCH_PAUSE: std::time::Duration = std::time::Duration::from_millis(5);

static SENDER: OnceLock<Option<SyncSender<Vec<u8>>>> = OnceLock::new();
static DROPPED: AtomicU64 = AtomicU64::new(0);

fn sender() -> Option<&'static SyncSender<Vec<u8>>> {
    SENDER
        .get_or_init(|| {
            let (tx, rx) = sync_channel::<Vec<u8>>(QUEUE);
            std::thread::Builder::new()
                .name("floodwall-log".into())
                .spawn(move || run(rx))
                .ok()
                .map(|_| tx)
        })
        .as_ref()
}

fn run(rx: Receiver<Vec<u8>>) {
    let stderr = std::io::stderr();
    let mut batch: Vec<u8> = Vec::with_capacity(64 * 1024);
    while let Ok(line) = rx.recv() {
        batch.extend_from_slice(&line);
        while batch.len() < 256 * 1024 {
            match rx.try_recv() {
                Ok(more) => batch.extend_from_slice(&more),
                Err(_) => break,
            }
        }
        let dropped = DROPPED.swap(0, Ordering::Relaxed);
        let mut out = stderr.lock();
        if dropped > 0 {
            let _ = writeln!(
                out,
                "floodwall: {dropped} log lines dropped (stderr too slow)"
            );
        }
        let _ = out.write_all(&batch);
        let _ = out.flush();
        drop(out);
        batch.clear();
        // Let lines accumulate: under load this turns one wake-up and one
        // write per request into one per few hundred requests.
        std::thread::sleep(BATCH_PAUSE);
    }
}

/// Queue one finished line (with its newline). Falls back to a direct
/// write when the writer thread could not be started.
pub fn send(line: Vec<u8>) {
    match sender() {
        Some(tx) => match tx.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                DROPPED.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Disconnected(line)) => {
                let _ = std::io::stderr().write_all(&line);
            }
        },
        None => {
            let _ = std::io::stderr().write_all(&line);
        }
    }
}

/// A `tracing_subscriber` writer: buffers one event, queues it on drop.
#[derive(Default)]
pub struct LineWriter {
    buf: Vec<u8>,
}

impl Write for LineWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        if !self.buf.is_empty() {
            send(std::mem::take(&mut self.buf));
        }
    }
}

/// `MakeWriter` for the subscriber.
#[derive(Clone, Copy, Default)]
pub struct NonBlocking;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for NonBlocking {
    type Writer = LineWriter;
    fn make_writer(&'a self) -> LineWriter {
        LineWriter {
            buf: Vec::with_capacity(256),
        }
    }
}
