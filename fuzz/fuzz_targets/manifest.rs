#![no_main]
//! `cargo fuzz run manifest`: the body is `ep_fuzzcases::manifest` (its docs say what it checks).
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| ep_fuzzcases::run("manifest", data));
