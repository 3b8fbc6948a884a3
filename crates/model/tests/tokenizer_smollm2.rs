//! Tokenizer tests against the real SmolLM2-135M-Instruct GGUF (skipped when the file is absent).

use std::time::Instant;

use ep_model::gguf::Gguf;
use ep_model::tokenizer::{StreamDecoder, Tokenizer};
use ep_testutil::require_test_model;

fn load() -> Option<Tokenizer> {
    let path = require_test_model();
    let g = Gguf::open(&path).expect("open model");
    let t0 = Instant::now();
    let tok = Tokenizer::from_gguf(&g).expect("build tokenizer");
    eprintln!("tokenizer built in {:?}", t0.elapsed());
    Some(tok)
}

const SAMPLES: &[&str] = &[
    "Hello, world!",
    "hello",
    " leading space and trailing space ",
    "The year 2024 had 366 days; 3.14159 is π.",
    "Multiple   spaces\tand\ttabs\n\nand newlines\r\n",
    "Émojis 😀🎉👍🏽 and CJK 中文字符 and Русский текст",
    "code: fn main() { println!(\"{}\", x + 1); }",
    "It's, they're, we've, I'm, he'll, she'd",
    "<|im_start|>user\nHi<|im_end|>",
    "\u{0}\u{1}\u{7f} control chars",
    "a\u{00a0}b\u{3000}c",
];

#[test]
fn metadata() {
    let Some(tok) = load() else { return };
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.bos_id(), Some(1));
    assert_eq!(tok.eos_id(), Some(2));
    assert!(!tok.add_bos());
    assert_eq!(tok.pre(), "smollm");
    assert_eq!(tok.token_to_id("<|im_start|>"), Some(1));
    assert_eq!(tok.token_to_id("<|im_end|>"), Some(2));
    assert!(tok.is_eog(2) && tok.is_eog(0));
    assert!(!tok.is_eog(1));
    assert!((0..17).all(|id| tok.is_special(id)));
    assert!(!tok.is_special(17));
    assert_eq!(tok.token_bytes(2), b"<|im_end|>");
}

#[test]
fn round_trips() {
    let Some(tok) = load() else { return };
    for s in SAMPLES {
        for parse_special in [false, true] {
            let ids = tok.encode(s, parse_special).unwrap();
            assert_eq!(
                &tok.decode(&ids),
                s,
                "round trip of {s:?} (parse_special {parse_special})"
            );
        }
    }
    assert!(tok.encode("", true).unwrap().is_empty());
}

#[test]
fn special_tokens_parsed_only_on_request() {
    let Some(tok) = load() else { return };
    assert_eq!(tok.encode("<|im_start|>", true).unwrap(), vec![1]);
    let plain = tok.encode("<|im_start|>", false).unwrap();
    assert!(plain.len() > 1 && !plain.contains(&1), "{plain:?}");
    let ids = tok
        .encode("<|im_start|>user\nHi<|im_end|>\n", true)
        .unwrap();
    assert_eq!(ids[0], 1);
    assert!(ids.contains(&2));
    assert_eq!(ids.iter().filter(|&&i| tok.is_special(i)).count(), 2);
}

#[test]
fn bos_not_added() {
    let Some(tok) = load() else { return };
    let ids = tok.encode("hello", false).unwrap();
    assert!(!ids.is_empty() && ids[0] != 1);
    assert_eq!(ids, tok.encode("hello", true).unwrap());
}

#[test]
fn stream_decoder_matches_decode() {
    let Some(tok) = load() else { return };
    for s in SAMPLES {
        let ids = tok.encode(s, true).unwrap();
        let mut sd = StreamDecoder::new(&tok);
        let mut out = String::new();
        for &id in &ids {
            out.push_str(&sd.push(id));
        }
        out.push_str(&sd.finish());
        assert_eq!(&out, s);
    }
}

#[test]
fn build_is_fast() {
    let path = require_test_model();
    let g = Gguf::open(&path).unwrap();
    let t0 = Instant::now();
    let _tok = Tokenizer::from_gguf(&g).unwrap();
    let dt = t0.elapsed();
    eprintln!("from_gguf: {dt:?}");
    // Well under a second in release; generous bound for debug builds.
    let limit = if cfg!(debug_assertions) { 20.0 } else { 1.0 };
    assert!(dt.as_secs_f64() < limit, "tokenizer build took {dt:?}");
}
