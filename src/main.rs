//! The `invaspread` command line. Each subcommand lives in `src/cli/`.

mod cli;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};

fn main() -> ExitCode {
    // Rust ignores SIGPIPE, so printing into a closed pipe panics; a command-line tool should
    // just stop, as cat does.
    #[cfg(unix)]
    // SAFETY: called before any thread starts; SIG_DFL is a valid disposition.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let matches = cli::Cli::command().get_matches();
    let args = match cli::Cli::from_arg_matches(&matches) {
        Ok(args) => args,
        Err(e) => e.exit(),
    };
    // Every file the command reads is an input no output of it may replace.
    let _inputs = invaspread::files::InputScope::begin();
    match cli::run(args, &matches) {
        Ok(()) => ExitCode::SUCCESS,
        // Stopped by SIGINT or SIGTERM with its state saved: 128 + the signal, as shells do.
        Err(invaspread::Error::Interrupted { signal, message }) => {
            eprintln!("{message}");
            ExitCode::from(u8::try_from(128 + signal).unwrap_or(1))
        }
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}
