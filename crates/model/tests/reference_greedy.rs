//! Greedy continuations and log-probs against llama.cpp (fixtures from
//! `scripts/reference/make_fixtures.py`, llama-cpp-python 0.3.36, flash attention off, f16 KV).
//!
//! The reference evaluates prompt + generated tokens as one batch at every step (llama.cpp's prompt
//! path, which our kernels reproduce bit for bit); llama.cpp's own incremental decode, which sums the
//! f16 attention products in another order, is reported beside it. The comparison and its tolerance
//! are in `greedy/mod.rs`.

use ep_model::tokenizer::Tokenizer;
use ep_model::Model;
use ep_testutil as testutil;

mod greedy;

#[test]
fn greedy_continuations_match_llama_cpp() {
    let fx = greedy::fixture("smollm2/greedy.json");
    assert!(fx.cases.len() >= 8, "fixture has {} cases", fx.cases.len());
    let model = Model::load(testutil::require_test_model(), |_, _| {}).unwrap();
    let tok = Tokenizer::from_gguf(model.gguf().expect("a GGUF model")).unwrap();
    for (ci, c) in fx.cases.iter().enumerate() {
        assert_eq!(
            tok.encode(&c.prompt, true).unwrap(),
            c.prompt_tokens,
            "case {ci}: prompt tokenisation differs"
        );
    }
    let r = greedy::compare(&model, &fx, 0.1);
    // Independent implementations with the same quantised arithmetic differ only by float summation
    // order; a wrong op shows up as differences of whole nats.
    assert!(
        r.failures.is_empty(),
        "{} of {} cases diverge away from near-ties",
        r.failures.len(),
        fx.cases.len()
    );
    assert!(
        r.max_logprob_diff < 0.25,
        "max log-prob difference {}",
        r.max_logprob_diff
    );
}
