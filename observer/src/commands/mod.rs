//! The commands, each a function of plain options (the command line builds them in `cli`).
pub mod check;
pub mod kill;
pub mod monitor;
pub mod top;
pub mod watch;
