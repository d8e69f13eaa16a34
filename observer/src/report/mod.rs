//! What the agent tells its users: JSON-lines events on stdout, and with `--metrics-addr`
//! Prometheus metrics and health endpoints over HTTP.
pub mod events;
pub mod health;
pub mod http;
pub mod metrics;
pub mod writer;

use std::io::{self, Write};

pub use self::events::*;

/// Writes events as JSON lines. The watch loop flushes after each poll, so a pipe reader sees a
/// poll's events together and at once, without a write per line in an alert storm.
pub struct Output<W: Write> {
    out: W,
}

impl<W: Write> Output<W> {
    pub fn new(out: W) -> Self {
        Output { out }
    }

    pub fn emit(&mut self, event: &Event) -> io::Result<()> {
        serde_json::to_writer(&mut self.out, event)?;
        self.out.write_all(b"\n")
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    #[cfg(test)]
    pub fn into_inner(self) -> W {
        self.out
    }
}
