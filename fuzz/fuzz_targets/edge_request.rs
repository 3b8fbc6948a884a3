#![no_main]
//! `cargo fuzz run edge_request`: the body is `ep_fuzzcases::edge_request` (its docs say what it checks).
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| ep_fuzzcases::run("edge_request", data));
