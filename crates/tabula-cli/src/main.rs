//! `tabula`: the command-line tool and the daemons (thin: parse, set up logging, run).
#![forbid(unsafe_code)]

mod cli;
mod client;
mod container_serve;
mod output;
mod serve;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
