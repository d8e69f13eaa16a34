use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // Usage errors exit 2 with clap's message and a pointer to --help.
    let cli = observer::cli::Cli::parse();
    observer::system::map_large_allocations();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .target(env_logger::Target::Stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("observer: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(observer::run(cli)) {
        Ok(code) => code,
        Err(err) => {
            // One line, whole cause chain, no backtrace.
            eprintln!("observer: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
