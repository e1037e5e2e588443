//! mistryd: the mistry build server.

use clap::{Parser, Subcommand};
use mistry::image_cli::{self, ImageCommand};
use mistry::sandbox_cli::{self, RunArgs};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(
    name = "mistryd",
    version,
    about = "A rootless, Docker-free build server compatible with mistry"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run commands in the rootless sandbox jobs use (debugging, benchmarks).
    #[command(subcommand)]
    Sandbox(SandboxCommand),
    /// Build images into the layer store, collect garbage (debugging, benchmarks).
    #[command(subcommand)]
    Image(ImageCommand),
    /// Image-tree operations run inside the sandbox's user namespace (used by mistryd itself).
    #[command(hide = true)]
    Internal {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
}

#[derive(Debug, Subcommand)]
enum SandboxCommand {
    /// Run one command in a fresh sandbox on a root filesystem directory.
    Run(RunArgs),
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("MISTRY_LOG").unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Sandbox(SandboxCommand::Run(args))) => {
            std::process::exit(sandbox_cli::run(args))
        }
        Some(Command::Image(cmd)) => match image_cli::run(cmd) {
            Ok(code) => std::process::exit(code),
            Err(e) => {
                eprintln!("mistryd: {e:#}");
                std::process::exit(1);
            }
        },
        Some(Command::Internal { args }) => std::process::exit(images::tools::helper_main(&args)),
        None => {
            eprintln!(
                "mistryd: the jobs server is not built yet; try `mistryd sandbox run --help`"
            );
            std::process::exit(2);
        }
    }
}
