//! Every committed fuzz input and every seed replayed through its target as a plain test (CI runs no
//! sanitizer build): `fuzz/corpus/<target>/*` — what the fuzzer kept, minimised — and
//! `fuzz/regressions/<target>/*` — the inputs that once crashed, each kept after its fix.

use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    v.retain(|p| p.is_file());
    v.sort();
    v
}

fn replay(target: &str) {
    let corpus = files(&fuzz_dir().join("corpus").join(target));
    assert!(
        !corpus.is_empty(),
        "fuzz/corpus/{target}/ is empty or missing (cargo run -p ep-fuzzcases --bin fuzz-seeds)"
    );
    let regressions = files(&fuzz_dir().join("regressions").join(target));
    for p in corpus.iter().chain(&regressions) {
        let data = std::fs::read(p).unwrap();
        let r = std::panic::catch_unwind(|| ep_fuzzcases::run(target, &data));
        assert!(r.is_ok(), "{target}: {} fails", p.display());
    }
    for (name, data) in ep_fuzzcases::seeds::of(target) {
        let r = std::panic::catch_unwind(|| ep_fuzzcases::run(target, &data));
        assert!(r.is_ok(), "{target}: seed {name} fails");
    }
}

#[test]
fn every_target_has_a_test_here() {
    let src = include_str!("corpus.rs");
    for t in ep_fuzzcases::TARGETS {
        assert!(
            src.contains(&format!("fn {t}() {{")),
            "no replay test for {t}"
        );
        assert!(
            fuzz_dir()
                .join("fuzz_targets")
                .join(format!("{t}.rs"))
                .is_file(),
            "no fuzz/fuzz_targets/{t}.rs"
        );
    }
}

#[test]
fn gguf() {
    replay("gguf");
}

#[test]
fn hf_model() {
    replay("hf_model");
}

#[test]
fn tokenizer() {
    replay("tokenizer");
}

#[test]
fn chat_template() {
    replay("chat_template");
}

#[test]
fn kv_stream() {
    replay("kv_stream");
}

#[test]
fn manifest() {
    replay("manifest");
}

#[test]
fn codec() {
    replay("codec");
}

#[test]
fn edge_request() {
    replay("edge_request");
}

/// The seeds are inputs the code accepts (so the fuzzer starts deep inside each format).
#[test]
fn seeds_are_valid_inputs() {
    use ep_model::gguf::Gguf;
    let g = &ep_fuzzcases::seeds::of("gguf")[0].1;
    let g = Gguf::from_bytes("seed.gguf", g).unwrap();
    ep_model::Model::from_gguf(g, |_, _| {}).unwrap();

    for (name, hf) in ep_fuzzcases::seeds::of("hf_model") {
        let (config, tensors) = ep_fuzzcases::split_u16(&hf);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), config).unwrap();
        std::fs::write(dir.path().join("model.safetensors"), tensors).unwrap();
        let m = ep_model::Model::load_hf_dir(dir.path(), |_, _| {});
        assert!(m.is_ok(), "{name}: {:?}", m.err());
    }

    for (name, s) in ep_fuzzcases::seeds::of("kv_stream") {
        let mut r = ep_kv::wire::StreamReader::new();
        r.push(&s);
        let mut frames = 0;
        while let Some(item) = r.next_item().unwrap() {
            frames += usize::from(matches!(item, ep_kv::wire::Item::Frame(_)));
        }
        assert_eq!(r.pending_bytes(), 0, "{name}");
        assert!(frames >= 3, "{name}: {frames} frames");
    }

    let pinned = ep_proto::hex(ep_fuzzcases::manifest_key().verifying_key().as_bytes());
    for (name, m) in ep_fuzzcases::seeds::of("manifest") {
        let s: ep_proto::SignedManifest = serde_json::from_slice(&m).unwrap();
        ep_proto::verify(&pinned, &s).unwrap();
        let codec = s.manifest.frames[0].codec;
        let n_layer = s.manifest.layout.n_layer as usize;
        assert_eq!(
            ep_edge::fetch::frame_table_problem(&s.manifest, n_layer, codec),
            None,
            "{name}"
        );
    }

    // The edge answers the first seeds (valid requests) with 200, the bad ones with 4xx.
    let reqs = ep_fuzzcases::seeds::of("edge_request");
    let status: Vec<u16> = reqs
        .iter()
        .map(|(_, b)| ep_fuzzcases::edge_answer(b).unwrap().0)
        .collect();
    assert_eq!(&status[..3], &[200, 200, 200], "{status:?}");
    assert!(
        status[3..6].iter().all(|s| (400..500).contains(s)),
        "{status:?}"
    );
}
