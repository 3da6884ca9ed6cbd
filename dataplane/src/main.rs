//! `dataplane`: the node agent (`dataplane agent`) and the debug CLI.

fn main() {
    dataplane::cli::main()
}
