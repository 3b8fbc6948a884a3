//! Reading the tokenizer files of a Hugging Face model directory (see
//! [`crate::tokenizer::Tokenizer::from_hf_dir`]).

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;

use crate::hf::{token_ids, token_text};
use crate::tokenizer::{Tokenizer, TokenizerError};

/// How a normal token's text maps back to bytes, from the `decoder` of `tokenizer.json`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PieceStyle {
    /// GPT-2 byte-level alphabet (`ByteLevel` decoder).
    ByteLevel,
    /// SentencePiece: `▁` is a space, `<0xNN>` a byte (`Metaspace` / `ByteFallback` / `Replace`).
    Spm,
    /// The text as it is.
    Plain,
}

fn file_err(path: &Path, what: impl Into<String>) -> TokenizerError {
    TokenizerError::File {
        path: path.to_path_buf(),
        what: what.into(),
    }
}

fn read_json(path: &Path) -> Result<Value, TokenizerError> {
    let text = std::fs::read_to_string(path).map_err(|e| file_err(path, e.to_string()))?;
    serde_json::from_str(&text).map_err(|e| file_err(path, format!("invalid JSON: {e}")))
}

/// A JSON file that may be absent.
fn read_optional(path: &Path) -> Result<Option<Value>, TokenizerError> {
    if path.is_file() {
        read_json(path).map(Some)
    } else {
        Ok(None)
    }
}

fn piece_style(decoder: Option<&Value>) -> PieceStyle {
    let d = decoder.map(Value::to_string).unwrap_or_default();
    if d.contains("\"ByteLevel\"") {
        PieceStyle::ByteLevel
    } else if d.contains("\"ByteFallback\"") || d.contains("\"Metaspace\"") || d.contains('▁') {
        PieceStyle::Spm
    } else {
        PieceStyle::Plain
    }
}

pub(crate) fn build(dir: &Path) -> Result<Tokenizer, TokenizerError> {
    let tj_path = dir.join("tokenizer.json");
    if !tj_path.is_file() {
        return Err(file_err(
            &tj_path,
            "missing (only tokenizer.json tokenizers are supported for model directories)",
        ));
    }
    let text = std::fs::read_to_string(&tj_path).map_err(|e| file_err(&tj_path, e.to_string()))?;
    let tj: Value = serde_json::from_str(&text)
        .map_err(|e| file_err(&tj_path, format!("invalid JSON: {e}")))?;
    let hf: tokenizers::Tokenizer = text
        .parse()
        .map_err(|e| file_err(&tj_path, format!("cannot build the tokenizer: {e}")))?;
    let tc_path = dir.join("tokenizer_config.json");
    let tc = read_optional(&tc_path)?;
    let gen = read_optional(&dir.join("generation_config.json"))?;
    let cfg = read_optional(&dir.join("config.json")).unwrap_or(None);

    // Vocabulary with added tokens, by id.
    let vocab = hf.get_vocab(true);
    let n = vocab.values().map(|&id| id as usize + 1).max().unwrap_or(0);
    if n == 0 {
        return Err(file_err(&tj_path, "empty vocabulary"));
    }
    if n > vocab.len().saturating_mul(2).max(1024) {
        return Err(file_err(
            &tj_path,
            format!("token ids up to {} for {} tokens", n - 1, vocab.len()),
        ));
    }
    let mut texts: Vec<Option<String>> = vec![None; n];
    for (t, &id) in &vocab {
        texts[id as usize] = Some(t.clone());
    }
    let added: HashMap<u32, bool> = hf
        .get_added_tokens_decoder()
        .into_iter()
        .map(|(id, t)| (id, t.special))
        .collect();

    let lookup = |key: &str| -> Result<Option<u32>, TokenizerError> {
        let Some(text) = tc.as_ref().and_then(|c| token_text(c.get(key))) else {
            return Ok(None);
        };
        hf.token_to_id(&text).map(Some).ok_or_else(|| {
            file_err(
                &tc_path,
                format!("{key} '{text}' is not in the vocabulary of tokenizer.json"),
            )
        })
    };
    let id_from = |v: Option<&Value>, key: &str| {
        v.and_then(|c| token_ids(c.get(key)).first().copied())
            .filter(|&id| (id as usize) < n)
    };
    let bos = match lookup("bos_token")? {
        Some(id) => Some(id),
        None if tc.as_ref().is_some_and(|c| c.get("bos_token").is_some()) => None,
        None => id_from(gen.as_ref(), "bos_token_id").or(id_from(cfg.as_ref(), "bos_token_id")),
    };
    let eos = match lookup("eos_token")? {
        Some(id) => Some(id),
        None => id_from(gen.as_ref(), "eos_token_id").or(id_from(cfg.as_ref(), "eos_token_id")),
    };
    let unk = lookup("unk_token")?.or_else(|| {
        tj.pointer("/model/unk_token")
            .and_then(Value::as_str)
            .and_then(|t| hf.token_to_id(t))
    });
    let mut extra_eog = gen
        .as_ref()
        .map(|g| token_ids(g.get("eos_token_id")))
        .unwrap_or_default();
    if let Some(c) = &cfg {
        extra_eog.extend(token_ids(c.get("eos_token_id")));
    }
    let flag = |key: &str| -> Result<Option<bool>, TokenizerError> {
        match tc.as_ref().and_then(|c| c.get(key)) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(file_err(
                &tc_path,
                format!("'{key}' = {v} is not a boolean"),
            )),
        }
    };
    let (add_bos, add_eos) = (flag("add_bos_token")?, flag("add_eos_token")?);
    let mut digest = crate::tokenizer::DigestStream::new("hf");
    digest.file(Some(text.as_bytes()));
    for name in [
        "tokenizer_config.json",
        "generation_config.json",
        "config.json",
    ] {
        let p = dir.join(name);
        let bytes = if p.is_file() {
            Some(std::fs::read(&p).map_err(|e| file_err(&p, e.to_string()))?)
        } else {
            None
        };
        digest.file(bytes.as_deref());
    }
    let mut tok = Tokenizer::from_hf_parts(
        hf,
        texts,
        &added,
        piece_style(tj.get("decoder")),
        bos,
        eos,
        &extra_eog,
        add_bos,
        add_eos,
        unk,
    )
    .map_err(|e| match e {
        TokenizerError::File { .. } => e,
        other => file_err(&tj_path, other.to_string()),
    })?;
    tok.set_digest(digest.finish());
    Ok(tok)
}

/// A chat template's source with the config's `bos_token` / `eos_token` texts.
pub(crate) type TemplateSource = (String, Option<String>, Option<String>);

/// The chat template of a directory: `chat_template` of `tokenizer_config.json` (a string, or a list of
/// `{name, template}` of which "default" or else the first is used), else the file
/// `chat_template.jinja`; with the config's `bos_token` / `eos_token` texts.
pub(crate) fn chat_template_source(dir: &Path) -> Result<Option<TemplateSource>, TokenizerError> {
    let tc_path = dir.join("tokenizer_config.json");
    let tc = read_optional(&tc_path)?;
    let bos = tc.as_ref().and_then(|c| token_text(c.get("bos_token")));
    let eos = tc.as_ref().and_then(|c| token_text(c.get("eos_token")));
    let from_config = match tc.as_ref().and_then(|c| c.get("chat_template")) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Array(list)) => {
            let named = |want: Option<&str>| {
                list.iter()
                    .find(|e| want.is_none_or(|w| e.get("name").and_then(Value::as_str) == Some(w)))
            };
            let entry = named(Some("default")).or_else(|| named(None));
            match entry
                .and_then(|e| e.get("template"))
                .and_then(Value::as_str)
            {
                Some(t) => Some(t.to_string()),
                None => {
                    return Err(file_err(
                        &tc_path,
                        "chat_template list has no {name, template} entry",
                    ))
                }
            }
        }
        Some(v) => {
            return Err(file_err(
                &tc_path,
                format!("chat_template is {v}, expected a string or a list"),
            ))
        }
    };
    let source = match from_config {
        Some(s) => Some(s),
        None => {
            let p = dir.join("chat_template.jinja");
            if p.is_file() {
                Some(std::fs::read_to_string(&p).map_err(|e| file_err(&p, e.to_string()))?)
            } else {
                None
            }
        }
    };
    Ok(source.map(|s| (s, bos, eos)))
}
