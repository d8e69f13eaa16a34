//! observer: finds the TCP connections a server is stuck on, says why, and names the thread stuck
//! with them. Data flows one way: collect -> snapshot -> detect -> alerts -> output.
pub mod act;
pub mod alerts;
pub mod btf;
pub mod check;
pub mod cli;
pub mod collect;
pub mod detect;
pub mod fastmap;
pub mod kernel;
pub mod kill;
pub mod output;
pub mod policy;
pub mod probes;
pub mod procfs;
pub mod reason;
pub mod respond;
pub mod snapshot;
pub mod syscalls;
pub mod system;
pub mod threads;
pub mod watch;

use std::process::ExitCode;

/// Runs a parsed command line; errors come back for `main` to print as one line.
pub async fn run(cli: cli::Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        cli::Command::Watch(args) => watch::run(args).await.map(|()| ExitCode::SUCCESS),
        cli::Command::Kill(args) => kill::run(&args),
        cli::Command::Check(args) => {
            Ok(if check::run(&args)? { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
    }
}
