//! `mistry-sandbox`: `mistryd sandbox run` as a small program of its own, for one-shot starts.
//!
//! The same options and exit codes as `mistryd sandbox run` (`mistry::sandbox_cli`), in a
//! binary that links only the sandbox: a one-shot start pays the dynamic loader's relocations
//! of this program (about 3,000), not the whole daemon's (about 42,000: a millisecond more per
//! start, a third of bubblewrap's whole start; docs/benchmarks.md).

use clap::Parser;
use mistry::sandbox_cli::{self, RunArgs};

/// Run one command in a sandbox (the options of `mistryd sandbox run`).
#[derive(Debug, Parser)]
#[command(name = "mistry-sandbox", version)]
struct Cli {
    #[command(flatten)]
    run: RunArgs,
}

fn main() {
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    sandbox_cli::hold_shared();
    std::process::exit(sandbox_cli::run_as("mistry-sandbox", cli.run));
}
