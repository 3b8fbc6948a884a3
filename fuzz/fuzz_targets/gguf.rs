#![no_main]
//! `cargo fuzz run gguf`: the body is `ep_fuzzcases::gguf` (its docs say what it checks).
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| ep_fuzzcases::run("gguf", data));
