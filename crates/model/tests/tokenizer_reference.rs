//! Token ids identical to llama.cpp's for every case in `fixtures/smollm2/tokenize.json`
//! (generated with llama.cpp from the SmolLM2-135M-Instruct GGUF).
//!
//! The fixture is committed: a missing fixture fails the test. The model file is not: without it the
//! test is skipped with a message.

use std::path::PathBuf;

use ep_model::gguf::Gguf;
use ep_model::tokenizer::Tokenizer;
use ep_testutil::require_test_model;
use serde_json::Value;

fn fixture() -> Value {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/smollm2/tokenize.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "reference fixture {} is missing or unreadable ({e}); it is generated from llama.cpp and \
             must be committed",
            path.display()
        )
    });
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: invalid JSON: {e}", path.display()))
}

fn ids_of(v: &Value, what: &str) -> Vec<u32> {
    v.as_array()
        .unwrap_or_else(|| panic!("{what}: expected an array of token ids"))
        .iter()
        .map(|x| {
            x.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .unwrap_or_else(|| panic!("{what}: bad token id {x}"))
        })
        .collect()
}

fn tokenizer() -> Option<Tokenizer> {
    let path = require_test_model();
    let g = Gguf::open(&path).expect("open model");
    Some(Tokenizer::from_gguf(&g).expect("build tokenizer"))
}

fn describe(tok: &Tokenizer, ids: &[u32]) -> String {
    let pieces: Vec<String> = ids
        .iter()
        .map(|&id| format!("{id}:{:?}", String::from_utf8_lossy(tok.token_bytes(id))))
        .collect();
    pieces.join(" ")
}

#[test]
fn token_ids_match_llama_cpp() {
    let fx = fixture();
    let Some(tok) = tokenizer() else { return };
    let cases = fx["cases"]
        .as_array()
        .expect("fixture: 'cases' must be an array");
    assert!(!cases.is_empty(), "fixture has no cases");
    let mut failures = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let text = case["text"]
            .as_str()
            .unwrap_or_else(|| panic!("case {i}: 'text' must be a string"));
        let parse_special = case["parse_special"].as_bool().unwrap_or(false);
        let want = ids_of(&case["ids"], &format!("case {i}"));
        let got = tok.encode(text, parse_special).expect("encode");
        if got != want {
            let first = got
                .iter()
                .zip(&want)
                .position(|(a, b)| a != b)
                .unwrap_or(got.len().min(want.len()));
            failures.push(format!(
                "case {i} text {text:?} parse_special {parse_special}: first difference at {first}\n  \
                 want {}\n  got  {}",
                describe(&tok, &want),
                describe(&tok, &got)
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ from llama.cpp:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    eprintln!("{} cases identical to llama.cpp", cases.len());
}

#[test]
fn add_bos_follows_metadata() {
    let fx = fixture();
    let Some(tok) = tokenizer() else { return };
    let want = ids_of(&fx["hello_add_bos_true"], "hello_add_bos_true");
    // llama-cpp-python's tokenize(b"Hello", add_bos=True): llama.cpp adds BOS only when the vocabulary
    // asks for it (SmolLM2: tokenizer.ggml.add_bos_token = false), so the ids are the plain ones.
    assert!(!tok.add_bos());
    assert_eq!(tok.encode("Hello", false).unwrap(), want);
}
