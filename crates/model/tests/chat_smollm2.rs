//! Chat template from the real SmolLM2-135M-Instruct GGUF (skipped when the file is absent).

use ep_model::chat::{ChatMessage, ChatTemplate};
use ep_model::gguf::Gguf;
use ep_model::tokenizer::Tokenizer;
use ep_testutil::require_test_model;

#[test]
fn renders_smollm2_template() {
    let path = require_test_model();
    let g = Gguf::open(&path).unwrap();
    let tok = Tokenizer::from_gguf(&g).unwrap();
    let tmpl = ChatTemplate::from_gguf(&g, &tok)
        .unwrap()
        .expect("template present");
    assert_eq!(tmpl.bos_token(), "<|im_start|>");
    assert_eq!(tmpl.eos_token(), "<|im_end|>");
    let out = tmpl
        .render(&[ChatMessage::new("user", "What is 2+2?")], true)
        .unwrap();
    assert_eq!(
        out,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    );
    let ids = tok.encode(&out, true).unwrap();
    assert_eq!(ids.iter().filter(|&&i| i == 1).count(), 3);
    assert_eq!(ids.iter().filter(|&&i| i == 2).count(), 2);
}
