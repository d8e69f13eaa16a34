//! `observer kill`: end one stuck connection by hand, printing one `action` line.
use std::{process::ExitCode, time::SystemTime};

pub use crate::act::manual::Request as Options;
use crate::{
    act::{Outcome, manual},
    report::{ActionEvent, Event, Output},
};

pub fn run(args: &Options) -> anyhow::Result<ExitCode> {
    let (identity, result) = manual::end(args);
    if let Some(error) = &result.error {
        log::error!("{error}");
    }
    let ok = result.outcome == Outcome::Ok;
    let event =
        ActionEvent::new(SystemTime::now(), args.mode, args.dry_run, result, identity, None);
    let mut out = Output::new(std::io::stdout().lock());
    out.emit(&Event::Action(event))?;
    out.flush()?;
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
