//! memhog: the allocator of the memory tests (see `testbeds::memload`).

use clap::Parser;

fn main() {
    let cli = testbeds::memload::Cli::parse();
    if let Err(e) = testbeds::memload::run(&cli.load) {
        eprintln!("memhog: {e:#}");
        std::process::exit(1);
    }
}
