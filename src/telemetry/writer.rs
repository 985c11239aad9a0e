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
//!
//! # Flush interval
//!
//! The writer wakes for the first line after a quiet spell, then sleeps
//! [`FLUSH_INTERVAL`] and writes everything that arrived meanwhile: a line
//! reaches stderr at most that long after it was logged (nginx's buffered
//! access log waits up to a second). While the writer sleeps, a request
//! thread's send is a plain queue push, with no wake-up: on this project's
//! VMs a thread wake-up costs tens of microseconds of CPU, which writing
//! every lone line at once cost each request at low concurrency. A clean
//! exit calls [`flush`], so nothing logged before it is lost; a process
//! killed with SIGKILL loses at most the last interval's lines.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender, TrySendError};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Lines queued at most before new ones are dropped.
const QUEUE: usize = 16 * 1024;
/// How long the writer gathers lines after the first one before writing
/// them (see the module's "Flush interval").
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(100);
/// A batch is written once it holds this much, even mid-interval.
const BATCH_BYTES: usize = 256 * 1024;
/// How long [`flush`] waits for the writer at most.
const FLUSH_WAIT: Duration = Duration::from_secs(2);

/// What the writer thread is sent.
enum Msg {
    /// A finished line, with its newline.
    Line(Vec<u8>),
    /// Answer on this channel once everything queued before is written.
    Flush(Sender<()>),
}

static SENDER: OnceLock<Option<SyncSender<Msg>>> = OnceLock::new();
static DROPPED: AtomicU64 = AtomicU64::new(0);
/// Bytes of lines the writer thread has written (for the tests of [`flush`]).
static WRITTEN: AtomicU64 = AtomicU64::new(0);

fn sender() -> Option<&'static SyncSender<Msg>> {
    SENDER
        .get_or_init(|| {
            let (tx, rx) = sync_channel::<Msg>(QUEUE);
            std::thread::Builder::new()
                .name("floodwall-log".into())
                .spawn(move || run(rx))
                .ok()
                .map(|_| tx)
        })
        .as_ref()
}

fn run(rx: Receiver<Msg>) {
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
            WRITTEN.fetch_add(batch.len() as u64, Ordering::Relaxed);
        },
        || std::thread::sleep(FLUSH_INTERVAL),
    );
}

/// The writer thread's loop, until every sender is gone: wait for a message;
/// after a line, `pause` (the flush interval); take whatever else is queued,
/// `write` the lines in batches of up to [`BATCH_BYTES`], then answer the
/// flush requests found, everything queued before them being written.
fn drain(rx: &Receiver<Msg>, mut write: impl FnMut(&[u8]), pause: impl Fn()) {
    let mut batch: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut answers: Vec<Sender<()>> = Vec::new();
    while let Ok(first) = rx.recv() {
        if matches!(first, Msg::Line(_)) {
            // Gather: senders meanwhile only push to the queue.
            pause();
        }
        let mut next = Some(first);
        while let Some(msg) = next.take().or_else(|| rx.try_recv().ok()) {
            match msg {
                Msg::Line(line) => {
                    batch.extend_from_slice(&line);
                    if batch.len() >= BATCH_BYTES {
                        write(&batch);
                        batch.clear();
                    }
                }
                Msg::Flush(answer) => answers.push(answer),
            }
        }
        if !batch.is_empty() {
            write(&batch);
            batch.clear();
        }
        for a in answers.drain(..) {
            let _ = a.send(());
        }
    }
}

/// Write every line queued so far to stderr before returning, waiting at
/// most [`FLUSH_WAIT`] (the writer may be in its flush interval's sleep).
/// For a clean exit: call it after the last log line.
pub fn flush() {
    let Some(Some(tx)) = SENDER.get() else {
        return;
    };
    let deadline = Instant::now() + FLUSH_WAIT;
    let (answer, done) = channel();
    let mut msg = Msg::Flush(answer);
    // The queue may be full for a moment.
    loop {
        match tx.try_send(msg) {
            Ok(()) => break,
            Err(TrySendError::Full(m)) if Instant::now() < deadline => {
                msg = m;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(_) => return,
        }
    }
    let _ = done.recv_timeout(deadline.saturating_duration_since(Instant::now()));
}

/// Queue one finished line (with its newline). Falls back to a direct
/// write when the writer thread could not be started.
pub fn send(line: Vec<u8>) {
    match sender() {
        Some(tx) => match tx.try_send(Msg::Line(line)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                DROPPED.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Disconnected(Msg::Line(line))) => {
                let _ = std::io::stderr().write_all(&line);
            }
            Err(TrySendError::Disconnected(Msg::Flush(_))) => {}
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
    use std::cell::RefCell;

    /// Runs `drain` over `msgs` queued before it starts (`None` is a flush
    /// request); returns what it did, in order: `pause`, `write TEXT` and
    /// `answered` (a flush request's answer, seen on its channel after the
    /// loop ended, in request order).
    fn drained(msgs: &[Option<&str>]) -> Vec<String> {
        let (tx, rx) = sync_channel::<Msg>(1024);
        let mut answers = Vec::new();
        for m in msgs {
            match m {
                Some(l) => tx.send(Msg::Line(l.as_bytes().to_vec())).unwrap(),
                None => {
                    let (a, done) = channel();
                    tx.send(Msg::Flush(a)).unwrap();
                    answers.push(done);
                }
            }
        }
        drop(tx);
        let events = RefCell::new(Vec::new());
        drain(
            &rx,
            |b| {
                events
                    .borrow_mut()
                    .push(format!("write {}", String::from_utf8_lossy(b)))
            },
            || events.borrow_mut().push("pause".to_string()),
        );
        let mut events = events.into_inner();
        for done in answers {
            if done.try_recv().is_ok() {
                events.push("answered".to_string());
            }
        }
        events
    }

    #[test]
    fn a_lone_line_waits_one_interval_then_is_written() {
        assert_eq!(drained(&[Some("one\n")]), ["pause", "write one\n"]);
    }

    #[test]
    fn lines_queued_during_the_interval_are_one_batch() {
        assert_eq!(
            drained(&[Some("a\n"), Some("b\n"), Some("c\n")]),
            ["pause", "write a\nb\nc\n"]
        );
    }

    #[test]
    fn a_flush_request_is_answered_once_the_lines_before_it_are_written() {
        assert_eq!(
            drained(&[Some("a\n"), None, Some("b\n")]),
            ["pause", "write a\nb\n", "answered"]
        );
    }

    #[test]
    fn a_flush_request_alone_is_answered_without_a_pause() {
        assert_eq!(drained(&[None]), ["answered"]);
    }

    #[test]
    fn a_large_backlog_is_written_in_bounded_batches() {
        let line = "x".repeat(1000) + "\n";
        let msgs: Vec<Option<&str>> = vec![Some(line.as_str()); 600];
        let writes: Vec<usize> = drained(&msgs)
            .iter()
            .filter_map(|e| e.strip_prefix("write ").map(str::len))
            .collect();
        assert_eq!(writes.iter().sum::<usize>(), 600 * 1001);
        assert!(writes.len() >= 2, "{writes:?}");
        assert!(writes.iter().all(|&n| n < BATCH_BYTES + 1001), "{writes:?}");
    }

    #[test]
    fn nothing_queued_writes_nothing() {
        assert!(drained(&[]).is_empty());
    }

    #[test]
    fn flush_returns_once_the_writer_wrote_what_was_sent_before() {
        // The process-wide writer (its lines go to this test binary's
        // stderr): the line is still in the writer's flush interval when
        // `flush` is called, and written when it returns.
        let line = b"floodwall writer test line\n".to_vec();
        let before = WRITTEN.load(Ordering::Relaxed);
        send(line.clone());
        let t = Instant::now();
        flush();
        let took = t.elapsed();
        let written = WRITTEN.load(Ordering::Relaxed) - before;
        assert!(
            written >= line.len() as u64,
            "written {written} bytes after flush"
        );
        assert!(took < FLUSH_WAIT, "flush waited its whole limit: {took:?}");
    }
}
