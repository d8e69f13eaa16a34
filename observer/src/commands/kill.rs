//! `observer kill`: end one stuck connection by hand, printing one `action` line.
use std::{process::ExitCode, time::SystemTime};

use crate::{
    act::{
        Outcome,
        manual::{self, Request},
    },
    report::{ActionEvent, Event, Output},
    snapshot::WorkloadOptions,
};

/// Which connection to end and how, and what names its container, pod and node in the
/// `action` line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    pub request: Request,
    pub workloads: WorkloadOptions,
}

pub fn run(options: &Options) -> anyhow::Result<ExitCode> {
    let args = &options.request;
    let (identity, result) = manual::end(args, &options.workloads);
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
