//! `dataplane-lab`: the lab's command line (see `lab::cli`); `cargo xtask
//! lab` is the same, and the lab's pod servers and probes run this binary.

fn main() {
    std::process::exit(lab::cli::main(std::env::args_os()));
}
