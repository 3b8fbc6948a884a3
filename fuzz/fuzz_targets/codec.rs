#![no_main]
//! `cargo fuzz run codec`: the body is `ep_fuzzcases::codec` (its docs say what it checks).
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| ep_fuzzcases::run("codec", data));
