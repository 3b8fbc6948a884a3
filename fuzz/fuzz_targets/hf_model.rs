#![no_main]
//! `cargo fuzz run hf_model`: the body is `ep_fuzzcases::hf_model` (its docs say what it checks).
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| ep_fuzzcases::run("hf_model", data));
