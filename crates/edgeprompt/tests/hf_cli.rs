//! End-to-end tests of the binary on Hugging Face model directories (`fixtures/hf`, made by
//! `scripts/reference/make_hf_fixtures.py`).

use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::Value;

fn fixture(arch: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/hf")
        .join(arch)
}

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_edgeprompt"))
        .args(args)
        .env_remove("EDGEPROMPT_MODEL")
        .output()
        .expect("binary runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn reference(arch: &str) -> Value {
    let p = fixture(arch).join("reference.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

#[test]
fn generate_from_hf_directories() {
    for arch in ["llama", "mistral", "qwen2"] {
        let dir = fixture(arch);
        let r = reference(arch);
        let p = &r["prompts"][2];
        let prompt = p["text"].as_str().unwrap();
        let o = run(&[
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--raw",
            "--prompt",
            prompt,
            "--max-tokens",
            "4",
            "--temperature",
            "0",
            "--json",
        ]);
        assert!(o.status.success(), "{arch}: {}", stderr(&o));
        let out = String::from_utf8(o.stdout).unwrap();
        let j: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
        assert_eq!(j["prompt_tokens"], p["ids"], "{arch}");
        let tokens = j["tokens"].as_array().unwrap();
        assert!(!tokens.is_empty() && tokens.len() <= 4, "{arch}: {j}");
        // The first greedy token is transformers' argmax at the last prompt position.
        let argmax = p["argmax"].as_array().unwrap();
        assert_eq!(tokens[0], argmax[argmax.len() - 1], "{arch}");
    }
}

#[test]
fn generate_with_chat_template_from_hf_directory() {
    let dir = fixture("llama");
    let o = run(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        "What is the capital of France?",
        "--max-tokens",
        "4",
        "--temperature",
        "0",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn directory_without_config_is_an_error_naming_it() {
    let d = tempfile::tempdir().unwrap();
    let o = run(&[
        "generate",
        "--model",
        d.path().to_str().unwrap(),
        "--prompt",
        "hi",
        "--max-tokens",
        "1",
    ]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("config.json"), "{e}");
    assert!(!e.contains("panicked"), "{e}");
}
