//! Events reach stdout through a bounded queue and a thread of their own, so that a reader that
//! pauses (a log shipper under load, a full container log pipe, `| less`) never stops polling or
//! signal handling.
//!
//! While the writer makes progress, a full queue makes the poll wait for room: a burst of alerts
//! is delivered whole, at the reader's pace. Once the writer has been stuck in one write for
//! [`STALL`], events that do not fit are dropped and counted (`events_dropped` in `stats`), with
//! one line on stderr when dropping starts and one when the reader is back.
use std::{
    io::{self, Write},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc::{Receiver, SyncSender, TrySendError, sync_channel},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use super::{Event, Output};

/// Events the queue holds: a few polls' worth of a busy server's alerts.
pub const QUEUE: usize = 4096;
/// How long the writer may be stuck in one write before the reader counts as gone for now.
pub const STALL: Duration = Duration::from_millis(250);

/// State the poll side and the writer thread share.
#[derive(Default)]
struct Shared {
    dropped: AtomicU64,
    /// Nanoseconds since `epoch` at which the writer entered the write it is in; 0 when it is
    /// not writing.
    writing_since: AtomicU64,
    /// stdout is closed (the reader is gone for good): the agent stops.
    closed: AtomicBool,
    /// Stop waiting for room: the agent is shutting down.
    shutting_down: AtomicBool,
}

/// The poll side: queues events.
#[derive(Clone)]
pub struct EventSink {
    tx: SyncSender<Event>,
    shared: Arc<Shared>,
    epoch: Instant,
    /// Whether events are being dropped now (one stderr line per episode).
    dropping: Arc<AtomicBool>,
}

/// The writer thread.
pub struct Writer {
    thread: JoinHandle<()>,
    shared: Arc<Shared>,
}

/// Starts a writer of JSON lines to `out` on a thread of its own.
pub fn spawn<W: Write + Send + 'static>(out: W) -> io::Result<(EventSink, Writer)> {
    let (tx, rx) = sync_channel(QUEUE);
    let shared = Arc::new(Shared::default());
    let epoch = Instant::now();
    let progress = Progress { inner: out, shared: shared.clone(), epoch };
    let thread_shared = shared.clone();
    let thread = std::thread::Builder::new()
        .name("observer-out".into())
        .spawn(move || write_all(rx, progress, &thread_shared))?;
    let sink = EventSink { tx, shared: shared.clone(), epoch, dropping: Default::default() };
    Ok((sink, Writer { thread, shared }))
}

impl EventSink {
    /// Queues `event`; waits for room while the writer makes progress, drops it (counted) once
    /// the writer has been stuck for [`STALL`] or the agent is shutting down.
    pub fn send(&self, event: Event) {
        let mut event = event;
        loop {
            match self.tx.try_send(event) {
                Ok(()) => {
                    if self.dropping.swap(false, Ordering::Relaxed) {
                        log::warn!(
                            "stdout is read again; {} events were dropped in all while it was not",
                            self.dropped()
                        );
                    }
                    return;
                }
                Err(TrySendError::Disconnected(_)) => return, // stdout closed: counted below
                Err(TrySendError::Full(back)) => event = back,
            }
            let since = self.shared.writing_since.load(Ordering::Relaxed);
            let now = self.epoch.elapsed().as_nanos() as u64;
            let stuck = since != 0 && now.saturating_sub(since) >= STALL.as_nanos() as u64;
            if stuck || self.shared.shutting_down.load(Ordering::Relaxed) {
                self.shared.dropped.fetch_add(1, Ordering::Relaxed);
                if !self.dropping.swap(true, Ordering::Relaxed) {
                    log::warn!(
                        "stdout is not being read (a write has blocked for {}+ ms): events that \
                         do not fit the queue of {QUEUE} are dropped and counted in stats \
                         (events_dropped) until it is",
                        STALL.as_millis()
                    );
                }
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Events dropped since the start.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Whether stdout was closed by its reader.
    pub fn closed(&self) -> bool {
        self.shared.closed.load(Ordering::Relaxed)
    }
}

impl Writer {
    /// Delivers what is queued within `deadline`, then returns whether all of it was written.
    /// A writer stuck on a reader that does not read is left behind (the process is exiting).
    pub fn finish(self, sink: EventSink, deadline: Duration) -> bool {
        self.shared.shutting_down.store(true, Ordering::Relaxed);
        drop(sink);
        let end = Instant::now() + deadline;
        while !self.thread.is_finished() {
            if Instant::now() >= end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        !self.shared.closed.load(Ordering::Relaxed)
    }
}

/// The writer thread: writes events as they come, flushing whenever the queue is empty, so a
/// reader sees each poll's events at once.
fn write_all<W: Write>(rx: Receiver<Event>, out: Progress<W>, shared: &Shared) {
    let mut out = Output::new(io::BufWriter::with_capacity(64 * 1024, out));
    while let Ok(first) = rx.recv() {
        let mut written = out.emit(&first);
        while written.is_ok()
            && let Ok(next) = rx.try_recv()
        {
            written = out.emit(&next);
        }
        if written.and_then(|()| out.flush()).is_err() {
            // EPIPE and the like: the reader is gone for good.
            shared.closed.store(true, Ordering::Relaxed);
            return;
        }
    }
}

/// Marks when a write to the real output starts and ends, for the poll side to tell a slow
/// reader from a stopped one.
struct Progress<W> {
    inner: W,
    shared: Arc<Shared>,
    epoch: Instant,
}

impl<W: Write> Write for Progress<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let started = (self.epoch.elapsed().as_nanos() as u64).max(1);
        self.shared.writing_since.store(started, Ordering::Relaxed);
        let result = self.inner.write(buf);
        self.shared.writing_since.store(0, Ordering::Relaxed);
        result
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Condvar, Mutex};

    use super::*;

    /// Whether the reader is paused, and what it has read.
    type ReaderState = Mutex<(bool, Vec<u8>)>;

    /// An output whose reader can be paused: writes block while `paused`.
    #[derive(Clone, Default)]
    struct Pausable {
        state: Arc<(ReaderState, Condvar)>,
    }

    impl Pausable {
        fn pause(&self, paused: bool) {
            self.state.0.lock().unwrap().0 = paused;
            self.state.1.notify_all();
        }

        fn lines(&self) -> usize {
            self.state.0.lock().unwrap().1.iter().filter(|&&b| b == b'\n').count()
        }
    }

    impl Write for Pausable {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let (lock, wake) = &*self.state;
            let mut state = wake.wait_while(lock.lock().unwrap(), |s| s.0).unwrap();
            state.1.extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn event(pid: u32) -> Event {
        Event::TargetExited { ts: "t".into(), pid }
    }

    #[test]
    fn a_burst_larger_than_the_queue_is_delivered_whole_to_a_reader_that_reads() {
        let out = Pausable::default();
        let (sink, writer) = spawn(out.clone()).unwrap();
        for pid in 0..(3 * QUEUE as u32) {
            sink.send(event(pid));
        }
        let dropped = sink.dropped();
        assert!(writer.finish(sink, Duration::from_secs(10)));
        assert_eq!((out.lines(), dropped), (3 * QUEUE, 0));
    }

    #[test]
    fn a_paused_reader_costs_dropped_events_not_a_stuck_poll_and_the_rest_arrive() {
        let out = Pausable::default();
        out.pause(true);
        let (sink, writer) = spawn(out.clone()).unwrap();
        let started = Instant::now();
        let sent = 2 * QUEUE as u32;
        for pid in 0..sent {
            sink.send(event(pid));
        }
        // Waited at most about one stall for room, then dropped what did not fit.
        assert!(started.elapsed() < STALL * 20, "{:?}", started.elapsed());
        let dropped = sink.dropped();
        assert!(dropped > 0 && dropped < u64::from(sent), "{dropped}");
        out.pause(false);
        assert!(writer.finish(sink, Duration::from_secs(10)));
        assert_eq!(out.lines() as u64 + dropped, u64::from(sent), "every event written or counted");
    }

    #[test]
    fn a_stuck_writer_does_not_hold_up_shutting_down() {
        let out = Pausable::default();
        out.pause(true);
        let (sink, writer) = spawn(out.clone()).unwrap();
        sink.send(event(1));
        let started = Instant::now();
        assert!(!writer.finish(sink, Duration::from_millis(200)));
        assert!(started.elapsed() < Duration::from_secs(1));
        out.pause(false);
    }
}
