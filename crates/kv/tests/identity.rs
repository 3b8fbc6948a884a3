//! The KV content identity (`ep_kv::identity`): stable, sensitive to every weight byte, equal to the
//! independent Python implementation (`scripts/reference/make_identity_fixture.py`,
//! `fixtures/kv/identity.json`).

use std::path::PathBuf;
use std::time::Instant;

use ep_kv::identity::{cache_root, dtype_from_code, hex, ContentIdentity, NUMERICS_VERSION};
use ep_kv::KvDtype;
use ep_model::gguf::Gguf;
use ep_model::tokenizer::Tokenizer;
use ep_model::{load_model_dir_or_gguf, Model};
use ep_testutil::{test_model_path, tiny_model_bytes};
use serde_json::Value;

/// The seed of `fixtures/kv/tiny.gguf`.
const TINY_SEED: u64 = 7;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/kv")
}

fn fixture() -> Value {
    let p = fixtures().join("identity.json");
    let s = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
    serde_json::from_str(&s).expect("fixture is JSON")
}

fn unhex32(s: &str) -> [u8; 32] {
    let v: Vec<u8> = (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect();
    v.try_into().expect("32 bytes")
}

fn identity_from_fields(f: &Value) -> ContentIdentity {
    let u = |k: &str| u32::try_from(f[k].as_u64().unwrap_or_else(|| panic!("{k}"))).unwrap();
    // Floats travel as their f32 bit patterns, so no decimal rounding is involved.
    let fl = |k: &str| f32::from_bits(u(k));
    ContentIdentity {
        arch: f["arch"].as_str().unwrap().to_string(),
        n_layer: u("n_layer"),
        n_embd: u("n_embd"),
        n_ff: u("n_ff"),
        n_head: u("n_head"),
        n_head_kv: u("n_head_kv"),
        head_dim: u("head_dim"),
        n_vocab: u("n_vocab"),
        rope_neox: f["rope_neox"].as_bool().unwrap(),
        rope_dims: u("rope_dims"),
        rope_base: fl("rope_base_bits"),
        rope_freq_scale: fl("rope_freq_scale_bits"),
        rms_eps: fl("rms_eps_bits"),
        biases: u8::try_from(u("biases")).unwrap(),
        f32_activations: f["f32_activations"].as_bool().unwrap(),
        numerics_version: u("numerics_version"),
        backend: f["backend"].as_str().unwrap().to_string(),
        tokenizer: unhex32(f["tokenizer"].as_str().unwrap()),
        weights: unhex32(f["weights"].as_str().unwrap()),
    }
}

fn check_case(c: &Value, id: &ContentIdentity) {
    let name = &c["name"];
    assert_eq!(
        hex(&id.encode()),
        c["encoding"].as_str().unwrap(),
        "encoding of {name}"
    );
    assert_eq!(
        hex(&id.digest()),
        c["digest"].as_str().unwrap(),
        "digest of {name}"
    );
    assert_eq!(id.to_hex(), c["hex"].as_str().unwrap(), "hex of {name}");
    let roots = c["roots"].as_array().unwrap();
    assert!(!roots.is_empty());
    for r in roots {
        let dtype = dtype_from_code(r["dtype"].as_u64().unwrap() as u8).unwrap();
        let bt = r["block_tokens"].as_u64().unwrap() as usize;
        let codec = r["codec"].as_u64().unwrap() as u8;
        let got = cache_root(&id.digest(), dtype, bt, codec);
        assert_eq!(
            got.to_hex(),
            r["root"].as_str().unwrap(),
            "root of {name} {r}"
        );
        assert_eq!(got, id.cache_root(dtype, bt, codec));
    }
}

#[test]
fn golden_encodings_match_reference() {
    let f = fixture();
    assert_eq!(f["domain"], "edgeprompt/content-identity/v1");
    let cases = f["cases"].as_array().unwrap();
    assert!(cases.len() >= 3);
    for c in cases {
        check_case(c, &identity_from_fields(&c["fields"]));
    }
}

fn load_tiny(path: &std::path::Path) -> (Model, Tokenizer) {
    let m = Model::load(path, |_, _| {}).unwrap();
    let t = Tokenizer::from_gguf(m.gguf().unwrap()).unwrap();
    (m, t)
}

/// The committed tiny GGUF is the tiny test model of seed 7 (`EP_WRITE_FIXTURES=1` rewrites it).
#[test]
fn tiny_gguf_fixture_is_the_tiny_model() {
    let p = fixtures().join("tiny.gguf");
    let want = tiny_model_bytes(TINY_SEED, "llama");
    if std::env::var_os("EP_WRITE_FIXTURES").is_some() {
        std::fs::write(&p, &want).unwrap();
    }
    let have = std::fs::read(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
    assert!(
        have == want,
        "fixtures/kv/tiny.gguf differs from tiny_model_bytes({TINY_SEED})"
    );
}

/// The whole identity of a real GGUF file — weights digest (tensor order), tokenizer digest and the
/// facts read from metadata — equals the Python reimplementation's.
#[test]
fn tiny_gguf_identity_matches_reference() {
    let f = fixture();
    let c = &f["tiny_gguf"];
    let (m, t) = load_tiny(&fixtures().join("tiny.gguf"));
    assert_eq!(
        hex(&m.weights_digest()),
        c["fields"]["weights"].as_str().unwrap(),
        "weights digest"
    );
    assert_eq!(
        hex(&t.digest()),
        c["fields"]["tokenizer"].as_str().unwrap(),
        "tokenizer digest"
    );
    let id = ContentIdentity::of(&m, &t);
    assert_eq!(id, identity_from_fields(&c["fields"]));
    check_case(c, &id);
}

#[test]
fn two_loads_give_equal_identities() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.gguf"), dir.path().join("b.gguf"));
    let bytes = tiny_model_bytes(3, "llama");
    std::fs::write(&a, &bytes).unwrap();
    std::fs::write(&b, &bytes).unwrap();
    let (ma, ta) = load_tiny(&a);
    let (ma2, ta2) = load_tiny(&a);
    let (mb, tb) = load_tiny(&b);
    let ia = ContentIdentity::of(&ma, &ta);
    assert_eq!(ia, ContentIdentity::of(&ma2, &ta2));
    assert_eq!(ia, ContentIdentity::of(&mb, &tb));
    assert_eq!(ia.to_hex(), ContentIdentity::of(&mb, &tb).to_hex());
    assert_eq!(ia.numerics_version, NUMERICS_VERSION);
    assert_eq!(ia.backend, "cpu-ggml");
    assert!(ia.to_hex().starts_with("epci1-") && ia.to_hex().len() == 6 + 64);
    // Another seed: other weights, same everything else.
    let c = dir.path().join("c.gguf");
    std::fs::write(&c, tiny_model_bytes(4, "llama")).unwrap();
    let (mc, tc) = load_tiny(&c);
    let ic = ContentIdentity::of(&mc, &tc);
    assert_ne!(ia.weights, ic.weights);
    assert_eq!(ia.tokenizer, ic.tokenizer);
    assert_ne!(ia.digest(), ic.digest());
}

/// One byte flipped in the middle of the largest tensor — outside the first, middle and last 4 KiB that
/// the sampled fingerprint this identity replaced looked at — changes the identity.
#[test]
fn one_flipped_weight_byte_changes_the_identity() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.gguf"), dir.path().join("b.gguf"));
    let bytes = tiny_model_bytes(3, "llama");
    std::fs::write(&a, &bytes).unwrap();
    let g = Gguf::open(&a).unwrap();
    let big = g.tensors.iter().max_by_key(|t| t.size).unwrap();
    assert!(
        big.size > 3 * 4096 + 2,
        "{} is too small for the demonstration",
        big.name
    );
    let data_start = g.file_len() - g.data_section().len();
    // A quarter in: outside the three 4 KiB samples of the old fingerprint.
    let at = data_start + big.offset as usize + big.size as usize / 4;
    let name = big.name.clone();
    drop(g);
    let mut flipped = bytes.clone();
    flipped[at] ^= 0x10;
    std::fs::write(&b, &flipped).unwrap();
    let (ma, ta) = load_tiny(&a);
    let (mb, tb) = load_tiny(&b);
    let (ia, ib) = (ContentIdentity::of(&ma, &ta), ContentIdentity::of(&mb, &tb));
    assert_ne!(ia.weights, ib.weights, "flip in {name} at byte {at}");
    assert_ne!(ia.digest(), ib.digest());
    assert_eq!(ia.tokenizer, ib.tokenizer);
}

#[test]
fn cache_roots_differ_by_dtype_block_size_and_codec() {
    let f = fixture();
    let id = identity_from_fields(&f["cases"][0]["fields"]);
    let d = id.digest();
    let mut roots = Vec::new();
    for dtype in [KvDtype::F32, KvDtype::F16, KvDtype::Bf16] {
        for bt in [8, 16, 32, 256] {
            for codec in [0u8, 1, 2] {
                roots.push(cache_root(&d, dtype, bt, codec));
            }
        }
    }
    let n = roots.len();
    roots.sort();
    roots.dedup();
    assert_eq!(
        roots.len(),
        n,
        "every (dtype, block size, codec) has its own root"
    );
    // And another identity never shares a root with this one.
    let mut other = id.clone();
    other.numerics_version += 1;
    assert_ne!(other.digest(), d);
    assert_ne!(
        other.cache_root(KvDtype::F16, 16, 0),
        id.cache_root(KvDtype::F16, 16, 0)
    );
}

/// Every field takes part in the encoding.
#[test]
fn every_field_changes_the_digest() {
    let f = fixture();
    let base = identity_from_fields(&f["cases"][0]["fields"]);
    let mut variants: Vec<ContentIdentity> = Vec::new();
    let mut v = |g: &dyn Fn(&mut ContentIdentity)| {
        let mut x = base.clone();
        g(&mut x);
        variants.push(x);
    };
    v(&|x| x.arch.push('x'));
    v(&|x| x.n_layer += 1);
    v(&|x| x.n_embd += 1);
    v(&|x| x.n_ff += 1);
    v(&|x| x.n_head += 1);
    v(&|x| x.n_head_kv += 1);
    v(&|x| x.head_dim += 1);
    v(&|x| x.n_vocab += 1);
    v(&|x| x.rope_neox = !x.rope_neox);
    v(&|x| x.rope_dims += 1);
    v(&|x| x.rope_base = f32::from_bits(x.rope_base.to_bits() ^ 1));
    v(&|x| x.rope_freq_scale = f32::from_bits(x.rope_freq_scale.to_bits() ^ 1));
    v(&|x| x.rms_eps = f32::from_bits(x.rms_eps.to_bits() ^ 1));
    v(&|x| x.biases ^= 1);
    v(&|x| x.f32_activations = !x.f32_activations);
    v(&|x| x.numerics_version += 1);
    v(&|x| x.backend.push('x'));
    v(&|x| x.tokenizer[31] ^= 1);
    v(&|x| x.weights[0] ^= 1);
    let mut digests: Vec<[u8; 32]> = variants.iter().map(ContentIdentity::digest).collect();
    digests.push(base.digest());
    let n = digests.len();
    digests.sort();
    digests.dedup();
    assert_eq!(digests.len(), n);
}

/// The default model's identity, as computed by
/// `python3 scripts/reference/make_identity_fixture.py --identity-of SmolLM2-135M-Instruct.Q4_1.gguf`
/// (tied output, 30 layers: the tensor order on a real file). Skipped when the model is absent.
#[test]
fn default_model_identity_matches_reference() {
    let Some(path) = test_model_path() else {
        eprintln!("default model absent: skipped");
        return;
    };
    if path.file_name().and_then(|n| n.to_str()) != Some(ep_model::paths::DEFAULT_MODEL_FILE) {
        eprintln!("not the default model: skipped");
        return;
    }
    let b = load_model_dir_or_gguf(&path, |_, _| {}).unwrap();
    let id = ContentIdentity::of(&b.model, &b.tokenizer);
    assert_eq!(
        id.to_hex(),
        "epci1-2a660486ac137d1bb548fad1ad5fa7c991b296c02b40862c0bf05127850b7819"
    );
}

/// The cost of `ContentIdentity::of` on the default model (skipped when it is absent). Run with
/// `cargo test --release -p ep-kv --test identity -- --nocapture identity_cost`.
#[test]
fn identity_cost_on_default_model() {
    let Some(path) = test_model_path() else {
        eprintln!("default model absent: skipped");
        return;
    };
    let b = load_model_dir_or_gguf(&path, |_, _| {}).unwrap();
    let first = Instant::now();
    let id = ContentIdentity::of(&b.model, &b.tokenizer);
    let first = first.elapsed();
    let mut times = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let again = ContentIdentity::of(&b.model, &b.tokenizer);
        times.push(t.elapsed());
        assert_eq!(again, id);
    }
    times.sort();
    let t = Instant::now();
    let w = b.model.weights_digest();
    let weights = t.elapsed();
    assert_eq!(w, id.weights);
    let single = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let t = Instant::now();
    let w1 = single.install(|| b.model.weights_digest());
    let one_thread = t.elapsed();
    assert_eq!(w1, w);
    eprintln!(
        "identity {}: first (cold pages) {:.1} ms, median of 5 {:.1} ms, weights digest {:.1} ms, \
         weights digest on 1 thread {:.1} ms, rayon threads {}",
        id.to_hex(),
        first.as_secs_f64() * 1e3,
        times[2].as_secs_f64() * 1e3,
        weights.as_secs_f64() * 1e3,
        one_thread.as_secs_f64() * 1e3,
        rayon::current_num_threads(),
    );
}
