//! Hash stability: `BlockHash` must equal the independent Python implementation in
//! `scripts/reference/make_kv_hash_fixture.py` (fixture `fixtures/kv/hashes.json`), so cached block
//! identities stay valid across processes, machines, builds and languages.

use std::path::PathBuf;

use ep_kv::{block_hashes, BlockHash};
use serde_json::Value;

fn fixture() -> Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/kv/hashes.json");
    let s = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
    serde_json::from_str(&s).expect("fixture is JSON")
}

fn unhex(s: &str) -> Vec<u8> {
    assert!(s.len().is_multiple_of(2), "odd hex length: {s}");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

fn hash16(s: &str) -> BlockHash {
    BlockHash(unhex(s).try_into().expect("16-byte hash"))
}

fn tokens(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("token array")
        .iter()
        .map(|t| u32::try_from(t.as_u64().expect("token")).expect("u32 token"))
        .collect()
}

fn salt(v: &Value) -> Option<Vec<u8>> {
    v.as_str().map(unhex)
}

fn cases<'a>(f: &'a Value, key: &str) -> &'a Vec<Value> {
    let c = f[key].as_array().unwrap_or_else(|| panic!("{key} array"));
    assert!(!c.is_empty(), "no {key} cases");
    c
}

#[test]
fn domain_matches() {
    assert_eq!(fixture()["domain"], "edgeprompt/kv-block/v1");
}

#[test]
fn roots_match_reference() {
    let f = fixture();
    for c in cases(&f, "roots") {
        let fp = unhex(c["fingerprint"].as_str().unwrap());
        let got = BlockHash::root(&fp);
        assert_eq!(
            got.to_hex(),
            c["hash"].as_str().unwrap(),
            "root case {}",
            c["name"]
        );
        assert_eq!(got, hash16(c["hash"].as_str().unwrap()));
    }
}

#[test]
fn chains_match_reference() {
    let f = fixture();
    for c in cases(&f, "chains") {
        let parent = hash16(c["parent"].as_str().unwrap());
        let toks = tokens(&c["tokens"]);
        let s = salt(&c["salt"]);
        let got = parent.chain(&toks, s.as_deref());
        assert_eq!(
            got.to_hex(),
            c["hash"].as_str().unwrap(),
            "chain case {}",
            c["name"]
        );
    }
}

#[test]
fn block_hashes_match_reference() {
    let f = fixture();
    for c in cases(&f, "block_hashes") {
        let root = BlockHash::root(&unhex(c["fingerprint"].as_str().unwrap()));
        let toks = tokens(&c["tokens"]);
        let bt = c["block_tokens"].as_u64().unwrap() as usize;
        let public_len = c["public_len"].as_u64().unwrap() as usize;
        let s = salt(&c["salt"]);
        let got: Vec<String> = block_hashes(root, &toks, bt, public_len, s.as_deref())
            .iter()
            .map(BlockHash::to_hex)
            .collect();
        let want: Vec<&str> = c["hashes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h.as_str().unwrap())
            .collect();
        assert_eq!(got, want, "block_hashes case {}", c["name"]);
    }
}

/// Display/Debug print the same lowercase hex as the fixture.
#[test]
fn hex_formatting() {
    let h = BlockHash([
        0x00, 0x01, 0x0a, 0xff, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x80, 0x90, 0xa0, 0xb0,
        0xc0,
    ]);
    assert_eq!(h.to_hex(), "00010aff102030405060708090a0b0c0");
    assert_eq!(format!("{h}"), h.to_hex());
    assert_eq!(format!("{h:?}"), format!("BlockHash({})", h.to_hex()));
}
