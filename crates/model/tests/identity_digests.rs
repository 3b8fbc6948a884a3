//! The digests the KV content identity is built from (`Model::weights_digest`, `Tokenizer::digest`):
//! stable across loads, different when what they cover differs.

use std::path::PathBuf;

use ep_model::load_model_dir_or_gguf;
use ep_model::tokenizer::{BpeSpec, SpecialIds, Tokenizer};

fn hf(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/hf")
        .join(name)
}

#[test]
fn hf_directories_have_stable_distinct_digests() {
    let mut seen = Vec::new();
    for name in ["llama", "mistral", "qwen2"] {
        let a = load_model_dir_or_gguf(hf(name), |_, _| {}).unwrap();
        let b = load_model_dir_or_gguf(hf(name), |_, _| {}).unwrap();
        assert_eq!(a.model.weights_digest(), b.model.weights_digest(), "{name}");
        assert_eq!(a.tokenizer.digest(), b.tokenizer.digest(), "{name}");
        assert_ne!(a.tokenizer.digest(), [0; 32], "{name}: digest not set");
        let f = a.model.identity_facts();
        assert!(f.f32_activations, "{name}: HF weights use f32 activations");
        assert_eq!(f.biases, if name == "qwen2" { 0b0111 } else { 0 }, "{name}");
        seen.push((a.model.weights_digest(), a.tokenizer.digest()));
    }
    for i in 0..seen.len() {
        for j in i + 1..seen.len() {
            assert_ne!(seen[i].0, seen[j].0, "weights {i} vs {j}");
            // Llama and Mistral share tokenizer.json, but not config.json, which the tokenizer reads.
            assert_ne!(seen[i].1, seen[j].1, "tokenizer {i} vs {j}");
        }
    }
}

/// A change of any tokenizer source (a merge, a token, a type, a special id, add_bos) changes the
/// digest; equal sources give equal digests.
#[test]
fn bpe_digest_covers_its_sources() {
    let tokens: Vec<String> = ["<unk>", "<s>", "</s>", "a", "b", "ab"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let base = BpeSpec {
        tokens: tokens.iter().map(String::as_str).collect(),
        token_types: vec![2, 3, 3, 1, 1, 1],
        merges: vec!["a b"],
        pre: "smollm",
        special: SpecialIds {
            bos: Some(1),
            eos: Some(2),
            ..Default::default()
        },
        add_bos: Some(false),
        add_eos: None,
    };
    let d = |s: &BpeSpec<'_>| Tokenizer::from_bpe(s).unwrap().digest();
    let d0 = d(&base);
    assert_eq!(d0, d(&base.clone()));
    let mut variants = Vec::new();
    let mut s = base.clone();
    s.merges = vec![];
    variants.push(d(&s));
    let mut s = base.clone();
    s.tokens[5] = "ba";
    variants.push(d(&s));
    let mut s = base.clone();
    s.token_types[5] = 4;
    variants.push(d(&s));
    let mut s = base.clone();
    s.special.eos = Some(0);
    variants.push(d(&s));
    let mut s = base.clone();
    s.add_bos = None;
    variants.push(d(&s));
    let mut s = base.clone();
    s.pre = "llama-bpe";
    variants.push(d(&s));
    for (i, v) in variants.iter().enumerate() {
        assert_ne!(*v, d0, "variant {i}");
    }
}
