//! construir: the submitter's client. Submits jobs to a construir server, follows their
//! consoles, shows and lists them, fetches their output (unpacked safely) and cancels them, and
//! verifies a fetched result offline against its signed receipt; its exit code is the job's own
//! when it waits for one (see [`exit`]).

mod cli;
mod commands;
mod config;
mod escape;
mod exit;
mod format;
mod http;
mod paths;

use clap::Parser;

fn main() {
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version are no errors; bad usage has its own code, not clap's 2
            // (which a job may exit with).
            let code = if e.exit_code() == 0 { 0 } else { exit::USAGE };
            let _ = e.print();
            std::process::exit(code.into());
        }
    };
    match commands::run(cli) {
        Ok(code) => std::process::exit(code.into()),
        Err(e) => {
            let code = exit_code(&e);
            if code != 0 {
                // Errors quote the server's words, which can quote a job's.
                eprintln!("construir: error: {}", escape::printable(&format!("{e:#}")));
            }
            std::process::exit(code.into());
        }
    }
}

/// The exit code for a command's error: the code its failure carries, else a local failure.
/// Stdout closed under us (`construir list | head`) is the reader's choice, no failure.
fn exit_code(e: &anyhow::Error) -> u8 {
    for cause in e.chain() {
        if let Some(h) = cause.downcast_ref::<http::HttpError>() {
            return h.exit_code();
        }
        if let Some(f) = cause.downcast_ref::<exit::Failure>() {
            return f.code;
        }
        if cause.is::<config::UsageError>() {
            return exit::USAGE;
        }
    }
    let broken_pipe = e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    });
    if broken_pipe { 0 } else { exit::LOCAL }
}
