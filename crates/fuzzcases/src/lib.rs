//! The bodies of EdgePrompt's fuzz targets: one function per target, taking arbitrary bytes. Hostile
//! input must come back as an error value, never as a panic, a hang or an unbounded allocation; where
//! the code promises more (a round trip, a signature that cannot be forged, content that cannot become
//! template structure, an HTTP error that is a 4xx with an OpenAI-style body), the function checks it
//! and panics when it breaks.
//!
//! `fuzz/fuzz_targets/*.rs` (cargo fuzz, libFuzzer) call [`run`]; `tests/corpus.rs` replays every
//! committed input (`fuzz/corpus/<target>/`, `fuzz/regressions/<target>/`) and the [`seeds`] through
//! it as plain tests, so CI covers them without a sanitizer build.
//!
//! Test-only, like `ep-testutil`: nothing in the product depends on this crate.

use std::sync::{Arc, OnceLock};

use ep_edge::EdgeConfig;
use ep_engine::{AttnMode, Engine, EngineConfig};
use ep_kv::codec::{self, CODECS};
use ep_kv::wire::{Frame, Item, KvHeader, StreamReader, WireLayout};
use ep_kv::KvDtype;
use ep_model::chat::{render_prompt, ChatMessage, ChatTemplate};
use ep_model::gguf::Gguf;
use ep_model::kv::ContiguousKv;
use ep_model::tokenizer::{StreamDecoder, Tokenizer};
use ep_model::{BatchSeq, LogitsFor, Model};

pub mod seeds;

/// Every target, as `cargo fuzz list` names them.
pub const TARGETS: &[&str] = &[
    "gguf",
    "hf_model",
    "tokenizer",
    "chat_template",
    "kv_stream",
    "manifest",
    "codec",
    "edge_request",
];

/// Runs target `name` on `data`. Panics on an unknown name.
pub fn run(name: &str, data: &[u8]) {
    match name {
        "gguf" => gguf(data),
        "hf_model" => hf_model(data),
        "tokenizer" => tokenizer(data),
        "chat_template" => chat_template(data),
        "kv_stream" => kv_stream(data),
        "manifest" => manifest(data),
        "codec" => codec(data),
        "edge_request" => edge_request(data),
        other => panic!("no fuzz target named '{other}'"),
    }
}

/// The GGUF reader, then everything that reads a GGUF's contents: the model (configuration, tensor
/// types and shapes), its tokenizer and chat template, and a two-token forward pass of a small model.
pub fn gguf(data: &[u8]) {
    let Ok(g) = Gguf::from_bytes("fuzz.gguf", data) else {
        return;
    };
    for t in &g.tensors {
        assert_eq!(g.tensor_data(t).len() as u64, t.size, "tensor '{}'", t.name);
    }
    if let Ok(tok) = Tokenizer::from_gguf(&g) {
        let _ = ChatTemplate::from_gguf(&g, &tok);
        let _ = tok.encode("Hello <|im_start|>user 42 ", true);
    }
    let Ok(model) = Model::from_gguf(g, |_, _| {}) else {
        return;
    };
    let c = &model.cfg;
    // A forward pass of a model whose weights are all in the input is cheap; keep the rest out.
    if c.n_vocab == 0 || c.n_embd.saturating_mul(c.n_vocab.max(c.n_ff)) > 1 << 20 {
        return;
    }
    let mut kv = ContiguousKv::new(model.attn_shape(), 4);
    let seq = kv.add_seq();
    let tokens = [0, (c.n_vocab - 1) as u32];
    let batch = [BatchSeq {
        seq,
        tokens: &tokens,
        pos: 0,
        logits: LogitsFor::All,
    }];
    if let Ok(logits) = model.forward(&batch, &mut kv) {
        assert_eq!(logits.len(), 2 * c.n_vocab);
    }
}

/// A Hugging Face model directory: `config.json` (the input's first `u16`-length-prefixed part) and
/// `model.safetensors` (the rest).
pub fn hf_model(data: &[u8]) {
    let (config, tensors) = split_u16(data);
    let Ok(dir) = tempfile::tempdir() else {
        return;
    };
    let written = std::fs::write(dir.path().join("config.json"), config)
        .and_then(|_| std::fs::write(dir.path().join("model.safetensors"), tensors));
    if written.is_err() {
        return;
    }
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(config) {
        let _ = ep_model::hf::parse_config(&dir.path().join("config.json"), &v);
    }
    let _ = Model::load_hf_dir(dir.path(), |_, _| {});
}

/// `data` split at a little-endian `u16` length prefix: (the first part, the rest).
pub fn split_u16(data: &[u8]) -> (&[u8], &[u8]) {
    if data.len() < 2 {
        return (&[], data);
    }
    let n = (u16::from_le_bytes([data[0], data[1]]) as usize).min(data.len() - 2);
    data[2..].split_at(n)
}

/// The default model's tokenizer where the model is present (SmolLM2: byte-level BPE with merges),
/// else the tiny model's.
fn tokenizer_and_template() -> &'static (Tokenizer, ChatTemplate) {
    static TT: OnceLock<(Tokenizer, ChatTemplate)> = OnceLock::new();
    TT.get_or_init(|| {
        let g = match ep_testutil::test_model_path() {
            Some(p) => Gguf::open(p).expect("the default model opens"),
            None => Gguf::from_bytes("tiny.gguf", &ep_testutil::tiny_model_bytes(7, "llama"))
                .expect("the tiny model parses"),
        };
        let tok = Tokenizer::from_gguf(&g).expect("its tokenizer");
        let tpl = ChatTemplate::from_gguf(&g, &tok)
            .expect("its chat template")
            .expect("it has a chat template");
        (tok, tpl)
    })
}

/// Arbitrary text through the tokenizer: encoding never fails on text, decoding gives the text back,
/// and streaming detokenization of arbitrary ids equals `decode`. The round trip is checked only for
/// text without C0 control characters and without code points of planes 4–13: there llama.cpp's
/// pre-tokenizer, which ours follows token for token, drops U+001D after a letter and turns an
/// unassigned code point into three copies of its last byte (both found by this target and pinned
/// against llama.cpp in `fixtures/smollm2/tokenize.json`).
pub fn tokenizer(data: &[u8]) {
    let (tok, _) = tokenizer_and_template();
    let text = String::from_utf8_lossy(data);
    let ids = tok.encode(&text, false).expect("text always tokenizes");
    let plain = text.chars().all(|c| {
        let control = c.is_ascii_control() && !matches!(c, '\t' | '\n' | '\r');
        let unassigned_plane = ('\u{40000}'..='\u{DFFFF}').contains(&c);
        !control && !unassigned_plane
    });
    if plain {
        assert_eq!(tok.decode(&ids), text, "decode(encode(text)) is the text");
    }
    let _ = tok.encode(&text, true).expect("text always tokenizes");
    // The input's bytes as token ids (some outside the vocabulary).
    let ids: Vec<u32> = data
        .chunks(2)
        .map(|c| u32::from(c[0]) | u32::from(*c.get(1).unwrap_or(&0)) << 8)
        .collect();
    let mut sd = StreamDecoder::new(tok);
    let mut streamed = String::new();
    for &id in &ids {
        streamed.push_str(&sd.push(id));
    }
    streamed.push_str(&sd.finish());
    assert_eq!(streamed, tok.decode(&ids), "streamed text equals decode");
    let _ = tok.detokenize(&ids, false);
}

/// Hostile message content through the chat template: content can never add a special token. The
/// rendering's special tokens are a subsequence of those of the same conversation with every
/// special-token text in the content replaced by `x` (equal when the template keeps content verbatim;
/// fewer when its conservative fallback tokenizes the injected texts as text everywhere).
pub fn chat_template(data: &[u8]) {
    let (tok, tpl) = tokenizer_and_template();
    let text = String::from_utf8_lossy(data);
    const ROLES: &[&str] = &["system", "user", "assistant", "user"];
    let msgs: Vec<ChatMessage> = text
        .split('\u{0}')
        .take(8)
        .enumerate()
        .map(|(i, c)| ChatMessage::new(ROLES[(i + usize::from(i > 0)) % ROLES.len()], c))
        .collect();
    let specials_text: Vec<&str> = tok.parsed_special_tokens().map(|(_, t)| t).collect();
    let harmless: Vec<ChatMessage> = msgs
        .iter()
        .map(|m| {
            let mut c = m.content.clone();
            for t in &specials_text {
                c = c.replace(t, "x");
            }
            ChatMessage::new(m.role.clone(), c)
        })
        .collect();
    let specials =
        |ids: &[u32]| -> Vec<u32> { ids.iter().copied().filter(|&i| tok.is_special(i)).collect() };
    for gen in [false, true] {
        let Ok(hostile) = render_prompt(tok, tpl, &msgs, gen) else {
            continue;
        };
        let Ok(plain) = render_prompt(tok, tpl, &harmless, gen) else {
            continue;
        };
        let (h, p) = (specials(&hostile.tokens), specials(&plain.tokens));
        let mut rest = p.iter();
        assert!(
            h.iter().all(|t| rest.any(|u| u == t)),
            "content added special tokens: {h:?} is not a subsequence of {p:?}"
        );
        if msgs == harmless {
            assert_eq!(h, p);
        }
    }
}

/// The cloud → edge KV stream: a header and frames from arbitrary bytes fed in arbitrary pieces. A
/// decoded header re-encodes to the bytes it came from, a decoded frame too, and frames are only
/// handed out after the header.
pub fn kv_stream(data: &[u8]) {
    if let Ok((h, n)) = KvHeader::decode(data) {
        assert_eq!(h.encode(), data[..n], "a header re-encodes to its bytes");
    }
    if let Ok((f, n)) = Frame::decode(data) {
        let mut out = Vec::new();
        f.encode_into(&mut out);
        assert_eq!(out, data[..n], "a frame re-encodes to its bytes");
    }
    let piece = usize::from(data.first().copied().unwrap_or(1)).max(1);
    let mut r = StreamReader::new();
    let mut seen_header = false;
    'feed: for chunk in data.chunks(piece) {
        r.push(chunk);
        loop {
            match r.next_item() {
                Ok(Some(Item::Header(_))) => {
                    assert!(!seen_header, "a second header");
                    seen_header = true;
                }
                Ok(Some(Item::Frame(f))) => {
                    assert!(seen_header, "a frame before the header");
                    let h = r.header().expect("a header was decoded");
                    assert!(f.layer < h.layout.n_layer && f.start < f.end);
                }
                Ok(None) => break,
                Err(_) => break 'feed,
            }
        }
    }
}

/// The key the manifest seeds are signed with (fixed, so the corpus stays valid).
pub fn manifest_key() -> ed25519_dalek::SigningKey {
    ed25519_dalek::SigningKey::from_bytes(&[7u8; 32])
}

/// Signed manifests from arbitrary JSON: a signature verifies only for a manifest the key signed (the
/// seeds), and the frame-table check an edge applies never panics.
pub fn manifest(data: &[u8]) {
    let Ok(s) = serde_json::from_slice::<ep_proto::SignedManifest>(data) else {
        return;
    };
    let pinned = ep_proto::hex(manifest_key().verifying_key().as_bytes());
    if ep_proto::verify(&pinned, &s).is_ok() {
        assert!(
            seeds::signed_manifests()
                .iter()
                .any(|m| m.manifest == s.manifest),
            "a manifest the key never signed verified"
        );
    }
    for codec in CODECS {
        let _ = ep_edge::fetch::frame_table_problem(&s.manifest, 1 + (data.len() % 4), *codec);
    }
}

/// The one-layer KV layout the `codec` target's second byte picks: dtype (bits 6–7), head size
/// (bits 2–3), KV heads − 1 (bits 0–1).
pub fn codec_layout(bits: u8) -> WireLayout {
    WireLayout {
        n_layer: 1,
        n_head_kv: 1 + u32::from(bits & 3),
        head_dim: [8, 16, 32, 64][usize::from(bits >> 2) & 3],
        block_tokens: 16,
        dtype: [KvDtype::F16, KvDtype::F32, KvDtype::Bf16][usize::from(bits >> 6) % 3],
    }
}

/// The codecs' decoders on arbitrary payloads, for a layout and token count taken from the input's
/// first bytes. A decoded payload has exactly the rows the range implies; raw payloads round-trip.
pub fn codec(data: &[u8]) {
    if data.len() < 4 {
        return;
    }
    let c = CODECS[usize::from(data[0]) % CODECS.len()];
    let layout = codec_layout(data[1]);
    let n_tokens = usize::from(data[2]) + 1;
    let payload = &data[4..];
    if let Ok((k, v)) = codec::decode(c, &layout, n_tokens, payload) {
        let rows = n_tokens * layout.row_bytes() as usize;
        assert_eq!((k.len(), v.len()), (rows, rows), "decoded rows");
        if c == ep_kv::identity::CODEC_RAW {
            let again = codec::encode(c, &layout, n_tokens, &k, &v).expect("raw rows encode");
            assert_eq!(again, payload, "raw round trip");
        }
    }
}

/// A tiny-model edge in this process (no cloud), reached through its router without a socket.
struct FuzzEdge {
    rt: tokio::runtime::Runtime,
    router: axum::Router,
    _dir: tempfile::TempDir,
}

fn fuzz_edge() -> &'static FuzzEdge {
    static EDGE: OnceLock<FuzzEdge> = OnceLock::new();
    EDGE.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let (model, tok, dir) = ep_testutil::load_tiny(7);
        let g = model.gguf().expect("a GGUF model");
        let template = ChatTemplate::from_gguf(g, &tok).expect("the tiny model's template");
        let tok = Arc::new(tok);
        let ecfg = EngineConfig {
            kv_dtype: KvDtype::F16,
            block_tokens: 16,
            kv_budget_bytes: 16 << 20,
            max_seq_len: 256,
            max_step_tokens: 256,
            max_seqs: 4,
            attn_mode: AttnMode::Splice,
            ..EngineConfig::default()
        };
        let engine = Engine::start(Arc::new(model), tok.clone(), ecfg, None).expect("an engine");
        let cfg = EdgeConfig {
            model_id: "m".into(),
            ..EdgeConfig::default()
        };
        let app = Arc::new(ep_edge::App::new(
            cfg,
            Arc::new(engine),
            tok,
            template,
            None,
        ));
        let router = {
            let _g = rt.enter();
            ep_edge::server::router(app)
        };
        FuzzEdge {
            rt,
            router,
            _dir: dir,
        }
    })
}

/// The edge's routes that take a body, by the input's first byte.
const ROUTES: &[(&str, &str)] = &[
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/edge-prompts"),
    ("DELETE", "/v1/edge-prompts/x"),
];

/// The edge's answer to `data` (the first byte picks the route, the rest is the body): status and
/// body; `None` for empty input.
pub fn edge_answer(data: &[u8]) -> Option<(u16, Vec<u8>)> {
    use tower::ServiceExt;
    let (&sel, body) = data.split_first()?;
    let (method, path) = ROUTES[usize::from(sel) % ROUTES.len()];
    let e = fuzz_edge();
    let req = axum::http::Request::builder()
        .method(method)
        .uri(path)
        .header("authorization", "Bearer fuzz")
        .header("content-type", "application/json")
        .body(axum::body::Body::from(body.to_vec()))
        .expect("a request");
    Some(e.rt.block_on(async {
        let resp = e.router.clone().oneshot(req).await.expect("infallible");
        let status = resp.status().as_u16();
        let bytes = axum::body::to_bytes(resp.into_body(), 64 << 20)
            .await
            .expect("the body is read");
        (status, bytes.to_vec())
    }))
}

/// An arbitrary request body to one of the edge's routes (the first byte picks it): the answer is never
/// a 5xx, and an error is an OpenAI-style JSON body (`error.message`, `error.type`).
pub fn edge_request(data: &[u8]) {
    let Some((status, bytes)) = edge_answer(data) else {
        return;
    };
    let route = ROUTES[usize::from(data[0]) % ROUTES.len()];
    assert!(
        status < 500,
        "{route:?}: {status} {}",
        String::from_utf8_lossy(&bytes)
    );
    if status >= 400 {
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            panic!(
                "{status}: not JSON ({e}): {}",
                String::from_utf8_lossy(&bytes)
            )
        });
        assert!(
            v["error"]["message"].is_string() && v["error"]["type"].is_string(),
            "{status}: not an OpenAI-style error: {v}"
        );
    }
}
