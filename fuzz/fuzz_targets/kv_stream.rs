#![no_main]
//! `cargo fuzz run kv_stream`: the body is `ep_fuzzcases::kv_stream` (its docs say what it checks).
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| ep_fuzzcases::run("kv_stream", data));
