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
/// Pause after a batch of more than one line, so that the next gathers more
/// (see [`drain`]).
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
    drain(
        &rx,
        |batch| {
            let dropped = DROPPED.swap(0, Ordering::Relaxed);
            let mut out = stderr.lock();
            if dropped > 0 {
                let _ = writeln!(
                    out,
                    "floodwall: {dropped} log lines dropped (stderr too slow)"
                );
            }
            let _ = out.write_all(batch);
            let _ = out.flush();
        },
        || std::thread::sleep(BATCH_PAUSE),
    );
}

/// The writer thread's loop, until every sender is gone: wait for a line,
/// take whatever else is queued (up to 256 KiB), `write` it as one batch.
/// Then, only if the batch held more than one line (lines arrive faster than
/// one wake-up each), `pause` so that the next batch gathers more: under load
/// one wake-up and one write per few hundred requests. A lone line (a quiet
/// sidecar) is written at once with no pause, so it costs one wake-up, not
/// two: on this project's VMs a wake-up costs tens of microseconds of CPU.
fn drain(rx: &Receiver<Vec<u8>>, mut write: impl FnMut(&[u8]), pause: impl Fn()) {
    let mut batch: Vec<u8> = Vec::with_capacity(64 * 1024);
    while let Ok(line) = rx.recv() {
        batch.extend_from_slice(&line);
        let mut lines = 1usize;
        while batch.len() < 256 * 1024 {
            match rx.try_recv() {
                Ok(more) => {
                    batch.extend_from_slice(&more);
                    lines += 1;
                }
                Err(_) => break,
            }
        }
        write(&batch);
        batch.clear();
        if lines > 1 {
            pause();
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    /// Runs `drain` over `lines` queued before it starts; returns the
    /// batches written and the number of pauses.
    fn drained(lines: &[&str]) -> (Vec<String>, usize) {
        let (tx, rx) = sync_channel::<Vec<u8>>(16);
        for l in lines {
            tx.send(l.as_bytes().to_vec()).unwrap();
        }
        drop(tx);
        let mut batches = Vec::new();
        let pauses = Cell::new(0);
        drain(
            &rx,
            |b| batches.push(String::from_utf8(b.to_vec()).unwrap()),
            || pauses.set(pauses.get() + 1),
        );
        (batches, pauses.get())
    }

    #[test]
    fn a_lone_line_is_written_without_a_pause() {
        assert_eq!(drained(&["one\n"]), (vec!["one\n".to_string()], 0));
    }

    #[test]
    fn queued_lines_are_one_batch_followed_by_a_pause() {
        let (batches, pauses) = drained(&["a\n", "b\n", "c\n"]);
        assert_eq!(batches, vec!["a\nb\nc\n".to_string()]);
        assert_eq!(pauses, 1);
    }

    #[test]
    fn nothing_queued_writes_nothing() {
        assert_eq!(drained(&[]), (Vec::<String>::new(), 0));
    }
}
