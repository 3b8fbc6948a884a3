#![no_main]
//! `cargo fuzz run chat_template`: the body is `ep_fuzzcases::chat_template` (its docs say what it checks).
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| ep_fuzzcases::run("chat_template", data));
