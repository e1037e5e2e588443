//! mistry: the client of the mistry build server.

use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "mistry", version, about = "Client of the mistry build server")]
struct Cli {}

fn main() {
    let _ = Cli::parse();
    eprintln!("mistry: the client is not built yet");
    std::process::exit(2);
}
