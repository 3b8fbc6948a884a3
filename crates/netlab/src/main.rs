//! `ep-netlab`: the emulated-link tool on its own (the same subcommands as `edgeprompt netlab`); it
//! is also the helper binary that tests hand to `Link::up_with`.

use std::process::ExitCode;

use clap::Parser;
use ep_netlab::cli::{run, NetlabArgs};

#[derive(Parser)]
#[command(name = "ep-netlab", about = "EdgePrompt emulated cloud–edge link")]
struct Cli {
    #[command(flatten)]
    args: NetlabArgs,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("EP_NETLAB_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    match run(Cli::parse().args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
