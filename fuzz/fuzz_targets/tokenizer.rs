#![no_main]
//! `cargo fuzz run tokenizer`: the body is `ep_fuzzcases::tokenizer` (its docs say what it checks).
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| ep_fuzzcases::run("tokenizer", data));
