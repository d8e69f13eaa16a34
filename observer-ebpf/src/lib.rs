// The library target exists so tools that build the whole workspace on the host (clippy, rust-analyzer)
// have something to check; the programs live in the `observer-probes` binary.
#![no_std]
