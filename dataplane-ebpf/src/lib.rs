// The library target only exists so that the user crate can name this package
// as a build dependency (its build script then reruns when these sources
// change); the programs are in the `dataplane` binary target.
#![no_std]
