//! `cargo xtask lab …`: builds what the lab runs, then hands the arguments
//! to the lab's own command line (`lab::cli`, also the `dataplane-lab`
//! binary).

use anyhow::Result;

use crate::testing::prepare_lab;

pub(crate) fn lab(args: &[String]) -> Result<()> {
    let help = args.is_empty() || args.iter().any(|a| a == "--help" || a == "-h");
    if !help {
        prepare_lab()?;
    }
    let code =
        lab::cli::main(std::iter::once("cargo xtask lab".to_owned()).chain(args.iter().cloned()));
    std::process::exit(code)
}
