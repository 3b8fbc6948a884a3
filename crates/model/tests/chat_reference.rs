//! Rendered chat prompts identical to Python jinja2's for every case in `fixtures/smollm2/chat.json`.
//!
//! The fixture is committed: a missing fixture fails the test.

use std::path::PathBuf;

use ep_model::chat::{ChatMessage, ChatTemplate};
use serde_json::Value;

fn fixture() -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/smollm2/chat.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "reference fixture {} is missing or unreadable ({e}); it is generated with Python jinja2 \
             and must be committed",
            path.display()
        )
    });
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: invalid JSON: {e}", path.display()))
}

#[test]
fn rendered_prompts_match_jinja2() {
    let fx = fixture();
    let source = fx["template"]
        .as_str()
        .expect("fixture: 'template' must be a string");
    // SmolLM2's BOS / EOS texts unless the fixture names others.
    let bos = fx["bos_token"].as_str().unwrap_or("<|im_start|>");
    let eos = fx["eos_token"].as_str().unwrap_or("<|im_end|>");
    let tmpl = ChatTemplate::new(source, bos, eos).expect("template compiles");
    let cases = fx["cases"]
        .as_array()
        .expect("fixture: 'cases' must be an array");
    assert!(!cases.is_empty(), "fixture has no cases");
    let mut failures = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let messages: Vec<ChatMessage> = serde_json::from_value(case["messages"].clone())
            .unwrap_or_else(|e| panic!("case {i}: bad 'messages': {e}"));
        let agp = case["add_generation_prompt"].as_bool().unwrap_or(false);
        let want = case["text"]
            .as_str()
            .unwrap_or_else(|| panic!("case {i}: 'text' must be a string"));
        match tmpl.render(&messages, agp) {
            Ok(got) if got == want => {}
            Ok(got) => failures.push(format!("case {i}:\n  want {want:?}\n  got  {got:?}")),
            Err(e) => failures.push(format!("case {i}: render error: {e}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ from jinja2:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    eprintln!("{} cases identical to jinja2", cases.len());
}
