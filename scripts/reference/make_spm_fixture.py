#!/usr/bin/env python3
"""Build a small SentencePiece-style ("llama") vocabulary and llama.cpp reference tokenizations.

Writes, into --out (default fixtures/spm):

  vocab.json     the vocabulary: token texts, scores, token types and the scalar tokenizer metadata,
                 plus named metadata variants. EdgePrompt's test (crates/model/tests/tokenizer_spm.rs)
                 builds the vocab-only GGUF from this file with ep_model::gguf::writer (`*.gguf` is
                 git-ignored, so the GGUF itself is not committed).
  tokenize.json  for each case (variant, text, add_bos, parse_special): the ids llama.cpp gives
                 (llama-cpp-python `Llama.tokenize`), and `Llama.detokenize` of those ids with
                 special=False ("detok") and special=True ("detok_special").

The vocabulary is learned here, by a plain BPE count over SentencePiece-style words ("▁" + word),
from text this script writes itself plus any --train-text files (read, never copied). Scores are
-0.5 * (merge index // 2), so pairs of pieces share a score and llama.cpp's tie-break (leftmost pair
first) is exercised; a few pieces are added by hand to probe specific rules (see HAND_PIECES).

The GGUF for each variant is written with the PyPI `gguf` package to a temporary directory and loaded
by llama.cpp with vocab_only=True.

Usage (repo venv with llama-cpp-python==0.3.36, see scripts/reference/README.md; plus `pip install gguf`):

  .venv/bin/python scripts/reference/make_spm_fixture.py \\
      --train-text ../shared/datasets/documents/sonnet.txt [--out fixtures/spm] [--merges 2400]
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import random
import sys
import tempfile
from pathlib import Path

SPACE = "\u2581"

# GGUF token types (llama.cpp LLAMA_TOKEN_TYPE_*).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# ---------------------------------------------------------------------------------------------------
# Training text written by this script
# ---------------------------------------------------------------------------------------------------

OWN_TEXT = """\
The small tokenizer in this test learns its pieces from a few paragraphs of plain text.
Every word starts with a space mark, so the pieces it learns look like the ones a real model has.
A tokenizer should never lose a byte of its input; when a character is unknown, it falls back to bytes.
Numbers such as 2024, 1999, 42 and 3.14159 appear here, and so do dates like 2023-11-05.
Code appears too: fn main() { println!("hello"); } and def add(a, b): return a + b.
    Indented lines keep their spaces; tabs are rarer.
The café on the corner serves crème brûlée, and the naïve visitor orders a façade of politeness.
In German, Straße and über and Äpfel and schön are common words; in Spanish, niño and mañana.
Chinese text: 中文字符 and 测试 appear a few times: 中文 中文 中文 文字 文字.
Russian text: Русский текст, привет мир, текст текст.
The quick brown fox jumps over the lazy dog while the slow green turtle watches the river.
She said that they would meet at the station at noon, but the train was late again.
We measured the temperature every hour and wrote the results in a notebook with a blue cover.
When the weather is good, the children play outside in the garden until the sun goes down.
It's true that they're here, we've seen them, I'm sure, he'll come, she'd know.
"""

SUBJECTS = ["the model", "a reader", "the writer", "our team", "the system", "this program",
            "the engine", "a student", "the teacher", "every user", "the server", "my friend"]
VERBS = ["reads", "writes", "checks", "builds", "tests", "prints", "sends", "keeps", "finds",
         "loads", "counts", "splits", "joins", "sorts", "returns", "learns"]
OBJECTS = ["the tokens", "a long sentence", "the numbers", "each word", "the file", "some text",
           "the results", "a short message", "the vocabulary", "every line", "the report",
           "the answer", "the request", "its output"]
COMMON = """about above across after against along among around because before behind below beneath
beside between beyond during except inside instead little market mountain number orange paper people
picture planet problem question reason science second simple single socket station string summer
system table thought through toward under until water window winter within without wonder yellow
account address animal answer balance basket battery bridge bright broken button camera candle
channel chapter circle climate coffee column comfort company compare contain control correct cotton
country custom damage danger decide degree depend design detail device differ dinner direct doctor
double driver editor effort engine enough escape evening except expect factor family farmer father
figure finger finish flower follow forest format future garden gather gentle global golden ground
growth handle happen harbor health height hidden history holiday honest hunger island jacket jungle
kernel kitchen ladder leader letter liquid listen little lively manner margin master matter memory
method middle minute mirror modern moment mother motion native nature needle normal notice object
office online option orange output packet parent pencil period person pocket policy portal powder
prefer pretty prince public puzzle rabbit random reader record region remote repeat report result
return ribbon river rocket runner safety sample scheme screen season secret select server shadow
signal silver sister spirit spring square stable stream street studio submit sudden supply switch
symbol tablet target teacher temple tender thread ticket timber tomato travel tunnel unique update
useful valley vector velvet victory vision volume wallet weekly window winner wisdom wooden writer""".split()
TAILS = ["quickly", "again", "before noon", "with care", "in order", "at night", "every day",
         "without errors", "for the test", "in the morning", "one by one", "twice"]


def own_text() -> str:
    rng = random.Random(20240517)
    lines = [OWN_TEXT]
    for _ in range(1500):
        s = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(TAILS)}"
        lines.append(s[0].upper() + s[1:] + rng.choice([".", ".", ".", "!", "?", ","]))
    for _ in range(1200):
        lines.append(" ".join(rng.choice(COMMON) for _ in range(rng.randint(4, 9))) + ".")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------
# Vocabulary learning
# ---------------------------------------------------------------------------------------------------

# Longest learned piece in UTF-8 bytes (llama-cpp-python's detokenize reads pieces into 32 bytes).
MAX_PIECE_BYTES = 16


def words_of(text: str) -> collections.Counter:
    """SentencePiece-style words: each line gets a leading space, spaces become ▁, and a word is a ▁
    followed by non-space characters (runs of spaces give lone ▁ words)."""
    counts: collections.Counter = collections.Counter()
    for line in text.split("\n"):
        line = line.replace("\t", " ").strip("\r")
        if not line.strip():
            continue
        esc = SPACE + line.replace(" ", SPACE)
        word = ""
        for c in esc:
            if c == SPACE and word:
                counts[word] += 1
                word = ""
            word += c
        if word:
            counts[word] += 1
    return counts


def learn_bpe(words: collections.Counter, n_merges: int) -> tuple[list[str], list[str]]:
    """Plain BPE: repeatedly merge the most frequent adjacent pair (ties: smallest pair text).
    Returns (characters by frequency, merged pieces in merge order)."""
    chars: collections.Counter = collections.Counter()
    for w, n in words.items():
        for c in w:
            chars[c] += n
    # Characters seen at least twice; the rest go to byte fallback.
    alphabet = sorted((c for c, n in chars.items() if n >= 2), key=lambda c: (-chars[c], c))
    known = set(alphabet)
    seqs = {w: [c if c in known else None for c in w] for w in words}
    merged: list[str] = []
    for _ in range(n_merges):
        pairs: collections.Counter = collections.Counter()
        for w, seq in seqs.items():
            n = words[w]
            for a, b in zip(seq, seq[1:]):
                if a is not None and b is not None and len((a + b).encode()) <= MAX_PIECE_BYTES:
                    pairs[(a, b)] += n
        if not pairs:
            break
        (a, b), freq = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        if freq < 2:
            break
        ab = a + b
        merged.append(ab)
        for w, seq in seqs.items():
            i, out = 0, []
            while i < len(seq):
                if i + 1 < len(seq) and seq[i] == a and seq[i + 1] == b:
                    out.append(ab)
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seqs[w] = out
    return alphabet, merged


# Hand-made pieces: (text, score, type). Scores are exact in f32.
HAND_PIECES = [
    # Equal scores on overlapping pairs: the leftmost pair wins ("жфц" -> "жф" "ц").
    ("ж", -9000.0, NORMAL), ("ф", -9000.0, NORMAL), ("ц", -9000.0, NORMAL),
    ("жф", -1.0, NORMAL), ("фц", -1.0, NORMAL), ("цж", -0.5, NORMAL),
    # Unreachable: neither "zq"+"x" nor "z"+"qx" exists, so "zqx" is never produced.
    ("zqx", 10.0, NORMAL),
    # Runs of spaces (code indentation), reachable through each other.
    (SPACE * 2, -2.0, NORMAL), (SPACE * 3, -3.0, NORMAL), (SPACE * 4, -2.5, NORMAL),
    (SPACE * 8, -4.0, NORMAL),
    # Extra special tokens: chat markers (control; "<|im_end|>" is end-of-generation by its text),
    # a user-defined token (matched even without parse_special) and an unused one.
    ("<|im_start|>", 0.0, CONTROL), ("<|im_end|>", 0.0, CONTROL),
    ("<tool>", 0.0, USER_DEFINED), ("<unused0>", 0.0, UNUSED),
]


def build_vocab(train: str, n_merges: int) -> dict:
    alphabet, merged = learn_bpe(words_of(train), n_merges)
    tokens: list[str] = []
    scores: list[float] = []
    types: list[int] = []

    def add(text: str, score: float, ty: int) -> None:
        assert text not in index, f"duplicate token {text!r}"
        index[text] = len(tokens)
        tokens.append(text)
        scores.append(score)
        types.append(ty)

    index: dict[str, int] = {}
    add("<unk>", 0.0, UNKNOWN)
    add("<s>", 0.0, CONTROL)
    add("</s>", 0.0, CONTROL)
    for b in range(256):
        add(f"<0x{b:02X}>", 0.0, BYTE)
    for i, piece in enumerate(merged):
        add(piece, -0.5 * (i // 2), NORMAL)
    base = -0.5 * (len(merged) // 2) - 1.0
    for i, c in enumerate(alphabet):
        if c not in index:
            add(c, base - i, NORMAL)
    for text, score, ty in HAND_PIECES:
        if text in index:  # learned already: keep the learned entry, adjust its score
            scores[index[text]] = score
        else:
            add(text, score, ty)
    # The unreachable piece must stay unreachable.
    for cut in range(1, len("zqx")):
        assert not ("zqx"[:cut] in index and "zqx"[cut:] in index), "zqx became reachable"
    return {"tokens": tokens, "scores": scores, "token_types": types}


# Scalar metadata of the base vocabulary, as {key: [gguf type, value]}; variants override keys (a
# null value removes the key).
BASE_METADATA = {
    "general.architecture": ["string", "llama"],
    "general.name": ["string", "edgeprompt-tiny-spm"],
    "llama.context_length": ["u32", 512],
    "llama.embedding_length": ["u32", 64],
    "llama.block_count": ["u32", 1],
    "llama.feed_forward_length": ["u32", 128],
    "llama.attention.head_count": ["u32", 4],
    "llama.attention.layer_norm_rms_epsilon": ["f32", 1e-5],
    "tokenizer.ggml.model": ["string", "llama"],
    "tokenizer.ggml.bos_token_id": ["u32", 1],
    "tokenizer.ggml.eos_token_id": ["u32", 2],
    "tokenizer.ggml.unknown_token_id": ["u32", 0],
    "tokenizer.ggml.add_bos_token": ["bool", True],
}

VARIANTS = {
    # add_space_prefix absent: llama.cpp's SPM default (true).
    "base": {},
    # No space prefix, no BOS, EOS appended.
    "no_prefix_eos": {
        "tokenizer.ggml.add_space_prefix": ["bool", False],
        "tokenizer.ggml.add_bos_token": ["bool", False],
        "tokenizer.ggml.add_eos_token": ["bool", True],
    },
    # Neither add_bos_token nor add_space_prefix present: both default to true.
    "defaults": {"tokenizer.ggml.add_bos_token": None},
}


def variant_metadata(name: str) -> dict:
    meta = dict(BASE_METADATA)
    for k, v in VARIANTS[name].items():
        if v is None:
            meta.pop(k, None)
        else:
            meta[k] = v
    return meta


def write_gguf(path: Path, vocab: dict, meta: dict) -> None:
    import gguf  # PyPI `gguf`

    w = gguf.GGUFWriter(str(path), arch=meta["general.architecture"][1])
    for key, (ty, value) in meta.items():
        if key == "general.architecture":
            continue  # written by GGUFWriter
        {"string": w.add_string, "u32": w.add_uint32, "bool": w.add_bool, "f32": w.add_float32}[ty](
            key, value
        )
    w.add_token_list(vocab["tokens"])
    w.add_token_scores(vocab["scores"])
    w.add_token_types(vocab["token_types"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ---------------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------------

LONG = (
    "When the weather is good, the children play outside in the garden until the sun goes down. "
    "The model reads the tokens quickly, and the writer checks each word again before noon; "
    "numbers like 1234567890 and 3.14159 and dates like 2023-11-05 follow.\n"
    "    def add(a, b):\n        return a + b\n"
    "Straße über Äpfel, café naïve, 中文字符 测试, Русский текст, and an emoji 😀 at the end."
)

TEXTS = [
    "", " ", "  ", "   ", "\n", "\n\n", " \n ", "\t", "\r\n",
    "Hello", "Hello world", " Hello world", "Hello world ", "Hello  world", "  leading two",
    "trailing two  ", "a", "I", " a", "the", "The quick brown fox jumps over the lazy dog.",
    "line one\nline two", "line\r\nwindows", "tab\tseparated\tvalues",
    "1234567890", "3.14159", "2023-11-05", "The year 1999 was 365 days long.",
    'fn main() { println!("hello"); }', "def add(a, b):\n    return a + b\n",
    "if (a && b) || c { x += 1; }", "        eight spaces", "\tindented tab", "x=1;y=2",
    "ALL CAPS TEXT", "MiXeD CaSe wOrDs",
    "It's true that they're here, we've seen them, I'm sure.",
    "café naïve façade crème brûlée", "Straße über Äpfel schön", "中文字符 测试", "日本語のテキスト",
    "Русский текст", "жфц", "фцж", "жфцж", "цжфц", " жфц",
    "emoji 😀 here", "😀", "🎉👍🏽", "a\u00a0b\u3000c", "\u0000 nul \u0001", "\u007f del",
    "zqx", " zqx", "\u2581", "a\u2581b", "\u2581\u2581 marks", "<0x41> literal",
    "<s>", "</s>", "<unk>", "<s>hello</s>", "hello<s>world", " <s> spaced </s> ",
    "<s><s>", "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "a<tool>b", "<tool> x", "<tool>", "<unused0>", "x<|im_end|>", "<|im_end|> y",
    LONG,
]

SPECIAL_MARKERS = ("<s>", "</s>", "<unk>", "<|im_", "<tool>", "<unused0>")


def make_cases(llm_by_variant: dict) -> list[dict]:
    plan = []
    for t in TEXTS:
        plan.append(("base", t, True, False))
        if any(m in t for m in SPECIAL_MARKERS):
            plan.append(("base", t, True, True))
    for t in TEXTS[:30] + [t for t in TEXTS if any(m in t for m in SPECIAL_MARKERS)]:
        plan.append(("base", t, False, t in ("<s>hello</s>", " <s> spaced </s> ", "a<tool>b")))
    for t in ["", " ", "Hello world", " Hello world", "  leading two", "\n", "жфц",
              "emoji 😀 here", "<s>hello</s>", "hello<s>world", "<tool> x", LONG]:
        for add_bos in (True, False):
            for parse_special in (False, True):
                plan.append(("no_prefix_eos", t, add_bos, parse_special))
    for t in ["", "Hello world", " Hello world", "<s>hello</s>"]:
        plan.append(("defaults", t, True, True))

    cases = []
    for variant, text, add_bos, parse_special in plan:
        llm = llm_by_variant[variant]
        ids = [int(x) for x in llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=parse_special)]
        detok = llm.detokenize(ids, special=False)
        detok_special = llm.detokenize(ids, special=True)
        for b in (detok, detok_special):
            b.decode("utf-8")  # all cases decode to valid UTF-8
        cases.append({
            "variant": variant,
            "text": text,
            "add_bos": add_bos,
            "parse_special": parse_special,
            "ids": ids,
            "detok": detok.decode("utf-8"),
            "detok_special": detok_special.decode("utf-8"),
        })
    return cases


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-text", type=Path, action="append", default=[],
                    help="extra training text (read only; may repeat)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[2] / "fixtures" / "spm")
    ap.add_argument("--merges", type=int, default=2400)
    args = ap.parse_args()

    import llama_cpp

    train = own_text()
    sources = [{"name": "make_spm_fixture.py built-in text", "sha256": hashlib.sha256(train.encode()).hexdigest()}]
    for p in args.train_text:
        t = p.read_text(encoding="utf-8")
        train += "\n" + t
        sources.append({"name": p.name, "sha256": hashlib.sha256(t.encode()).hexdigest()})

    vocab = build_vocab(train, args.merges)
    generator = (
        f"scripts/reference/make_spm_fixture.py, llama-cpp-python {llama_cpp.__version__} "
        f"(llama.cpp llm_tokenizer_spm), merges={args.merges}"
    )
    print(f"vocabulary: {len(vocab['tokens'])} tokens", file=sys.stderr)

    llms = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in VARIANTS:
            path = Path(tmp) / f"tiny-spm-{name}.gguf"
            write_gguf(path, vocab, variant_metadata(name))
            if name == "base":
                print(f"base GGUF: {path.stat().st_size} bytes", file=sys.stderr)
            llms[name] = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
        cases = make_cases(llms)

    args.out.mkdir(parents=True, exist_ok=True)
    vocab_doc = {
        "generator": generator,
        "training_text": sources,
        "metadata": BASE_METADATA,
        "variants": VARIANTS,
        **vocab,
    }
    (args.out / "vocab.json").write_text(json.dumps(vocab_doc, ensure_ascii=False) + "\n", encoding="utf-8")
    tok_doc = {"generator": generator, "cases": cases}
    (args.out / "tokenize.json").write_text(
        json.dumps(tok_doc, ensure_ascii=False, indent=1) + "\n", encoding="utf-8"
    )
    print(f"wrote {len(cases)} cases to {args.out / 'tokenize.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
