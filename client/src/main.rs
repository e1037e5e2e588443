//! mistry: the client of the mistry build server.

#![forbid(unsafe_code)]

use clap::{CommandFactory, Parser, Subcommand};
use mistry_client::{BuildArgs, ExecCommand, PipelineCommand};

#[derive(Debug, Parser)]
#[command(name = "mistry", version, about = "Client of the mistry build server")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build a project on the server and fetch its artifacts.
    Build(BuildArgs),
    /// Run or list the server's pipelines.
    #[command(subcommand)]
    Pipeline(PipelineCommand),
    /// Build a project's image and run its job on this machine, no server (through mistryd).
    Exec(ExecCommand),
    /// Print a shell completion script.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// Every failure exits 1, as mistry's client does (mistry-api.md), usage errors included (clap's
/// own code for them is 2); `--help` and `--version` exit 0.
fn parse() -> Cli {
    match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.exit_code() == 0 { 0 } else { 1 };
            // Printing can only fail on a closed stdout or stderr: nothing is left to tell.
            let _ = e.print();
            std::process::exit(code);
        }
    }
}

fn main() {
    let cli = parse();
    let code = match cli.command {
        Command::Build(args) => match mistry_client::build(args) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("{e:#}");
                1
            }
        },
        Command::Pipeline(cmd) => match mistry_client::pipeline(cmd) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("{e:#}");
                1
            }
        },
        Command::Exec(args) => match mistry_client::exec(args) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("mistry exec: {e:#}");
                1
            }
        },
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "mistry", &mut std::io::stdout());
            0
        }
    };
    std::process::exit(code);
}
