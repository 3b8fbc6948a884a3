#!/usr/bin/env python3
"""Write reference fixtures for EdgePrompt from llama.cpp (llama-cpp-python 0.3.36).

Produces, in --out (default fixtures/smollm2):

  tokenize.json  token ids for hand-written strings (add_bos=False,
                 parse_special false/true), plus llama.cpp's add_bos=True
                 behaviour for b"Hello".
  greedy.json    greedy continuations of raw prompts, done by hand from the
                 raw logits (no llama-cpp-python sampler, so no penalties),
                 with the top-5 float64 log-softmax entries at every step;
                 each step evaluates the whole sequence as one batch (see
                 make_greedy), and llama.cpp's incremental (KV-cache)
                 decode of the same prompt is recorded beside it.
  chat.json      the GGUF's own tokenizer.chat_template rendered with
                 jinja2 the way Hugging Face transformers does it.

See scripts/reference/README.md for setup. Usage:

  .venv/bin/python scripts/reference/make_fixtures.py \
      [--model PATH] [--out DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
SCRIPT = "scripts/reference/make_fixtures.py"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EXPECTED_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

N_PREDICT = 32
N_CTX = 2048
N_THREADS = 2
N_BATCH = 512
TOP_K_LOGPROBS = 5

SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def chatml(*turns: tuple[str, str], generation_prompt: bool = True) -> str:
    out = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in turns)
    if generation_prompt:
        out += "<|im_start|>assistant\n"
    return out


# --------------------------------------------------------------------------
# Tokenizer cases. All strings written for this project.
# --------------------------------------------------------------------------

TOKENIZE_TEXTS: list[str] = [
    # empty / trivial
    "",
    " ",
    "a",
    "Hello",
    "Hello world",
    "Hello, world!",
    # plain English
    "The lighthouse keeper counted the ships every evening before supper.",
    "She sells sea shells by the sea shore, or so the rumour goes.",
    "Edge devices rarely have more than a few gigabytes of memory.",
    "A tokenizer should never lose a single byte of its input.",
    # ASCII control characters: llama.cpp drops U+001D after a letter (found by fuzzing the
    # tokenizer); others stay
    "oX\x1dy",
    "a\x1cb\x1dc\x1ed\x1fe",
    "x\x00y\x7fz",
    "\x1d",
    " \x1dword",
    # code points of planes 4-13 (unassigned): llama.cpp gives the last UTF-8 byte three times
    # (found by fuzzing the tokenizer); planes 3, 14-16 round-trip
    "ail\U00074d34ing",
    "\U00040000",
    "\U00030000 \U000323b0 \U000f0000 \U0010fffd \U000e0001",
    # leading / trailing whitespace
    " leading space",
    "trailing space ",
    "  two leading spaces",
    "   three leading, three trailing   ",
    "\tleading tab",
    "\nleading newline",
    "trailing newline\n",
    # whitespace runs
    "  ",
    "    ",
    "\t",
    "\t\t",
    "\n",
    "\n\n",
    "\n\n\n",
    "   \t  \n",
    "word  word   word    word",
    "line one\nline two\n\nline four",
    "a\tb\t\tc",
    "\r\n",
    "windows\r\nline endings\r\n",
    " \n \n ",
    # digits and numbers
    "0",
    "42",
    "1234567890",
    "12345678901234567890",
    "3.14159",
    "-273.15",
    "2026-11-25",
    "1,000,000",
    "0x7fffffff",
    "v0.3.36",
    "Call 555-0123 before 9:30pm.",
    "1st 2nd 3rd 4th",
    # code
    "fn main() {\n    println!(\"Hello, {}!\", name);\n}\n",
    "impl<T: Clone> Stack<T> {\n    pub fn peek(&self) -> Option<&T> {\n        self.items.last()\n    }\n}",
    "let x: Vec<u32> = (0..10).map(|i| i * i).collect();",
    "def add(a, b):\n    return a + b\n",
    "class Node:\n    def __init__(self, value):\n        self.value = value\n        self.next = None\n",
    "for i in range(10):\n\tif i % 2 == 0:\n\t\tprint(i)",
    "{\"name\": \"edge\", \"layers\": 30, \"tied\": true, \"eps\": 1e-5}",
    "{\n  \"model\": \"smollm2\",\n  \"quant\": [\"q4_1\", \"q8_0\"]\n}",
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name;",
    "<div class=\"box\">&nbsp;</div>",
    # unicode
    "café naïve résumé façade",
    "Ångström über straße",
    "e\u0301 a\u0300 o\u0308",  # combining marks (decomposed)
    "Z\u0351\u0313a\u0337\u0303l\u0318go",
    "日本語のテキストです。",
    "你好，世界！",
    "한국어 문장",
    "مرحبا بالعالم",
    "Привет, мир!",
    "Ελληνικά γράμματα",
    "हिन्दी पाठ",
    "∑ x² ≤ ∞ → √π",
    "\u00a0non-breaking\u00a0spaces\u00a0",
    "zero\u200bwidth\u200bspace",
    # emoji
    "😀",
    "I love Rust 🦀!",
    "👍🏽",
    "👨\u200d👩\u200d👧\u200d👦",
    "🏳️\u200d🌈",
    "🇫🇷🇯🇵🇧🇷",
    "❤️🔥✨",
    # contractions and case
    "don't",
    "I'LL",
    "they've",
    "It's what we'd've done, isn't it?",
    "WE'RE HERE, YOU'D KNOW",
    "O'Brien's dog",
    # punctuation runs
    "!!!",
    "...",
    "?!?!",
    "---",
    "====",
    "Wait... what?!",
    "((()))[[]]{{}}",
    "#!/usr/bin/env bash",
    "@user #tag $100 50% a&b *bold* _under_ ~tilde~ `code`",
    "~~~***___",
    # mixed
    "Price: €9.99 (≈ $10.85) — offer ends 2026-01-31!",
    "The year 1969: Apollo 11 landed; \"one small step\".",
    # special-token text (also tokenized with parse_special=true below)
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>",
    "text<|im_end|>more text",
    "<|im_start|",
    "< |im_end| >",
]

# Strings that are also tokenized with parse_special=true.
SPECIAL_TEXTS: list[str] = [
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>",
    "text<|im_end|>more text",
    "<|im_start|",
    "< |im_end| >",
    "Hello world",
    "",
]


# --------------------------------------------------------------------------
# Greedy prompts (raw text, tokenized with special=True, no BOS).
# --------------------------------------------------------------------------

LONG_PARAGRAPH = (
    "The harbour town of Kelmar sat at the mouth of a slow, brown river that "
    "carried silt down from the hills every spring. For most of the year the "
    "fishermen worked the shallow banks to the north, where the water was warm "
    "and the cod were plentiful, but when the autumn storms arrived they pulled "
    "their boats high onto the shingle and spent the long evenings mending nets "
    "in the old customs house. The building had not collected a single tax in "
    "forty years. Its ledgers were mouldy, its clock had stopped at a quarter "
    "past three, and the only official who still came by was a retired clerk "
    "named Orsolya, who liked to sit by the stove and tell stories about the "
    "smugglers of her youth. Nobody believed half of them. Still, every winter "
    "the children gathered around her chair, and every winter she began the "
    "same way: with a lantern, a rowing boat, and a crate that was far too heavy "
    "to contain only apples. One night, after the wind had finally dropped, a "
    "girl at the back of the room asked what had really been inside the crate."
)

GREEDY_PROMPTS: list[str] = [
    chatml(("system", SYSTEM), ("user", "What is the capital of France?")),
    chatml(("user", "What is 2 + 2?")),
    chatml(("system", SYSTEM), ("user", "Write a haiku about the ocean.")),
    chatml(
        ("system", SYSTEM),
        ("user", "Hi! Who are you?"),
        ("assistant", "I am SmolLM, an AI assistant. How can I help you today?"),
        ("user", "Name three primary colors."),
    ),
    chatml(("user", "Translate to French: Good morning, my friend.")),
    "The quick brown fox",
    "def fibonacci(n):\n",
    "Once upon a time",
    "Shopping list:\n1. Milk\n2. Eggs\n3.",
    LONG_PARAGRAPH,
    "Hello",
    "The",
    "fn main() {\n    let v = vec![1, 2, 3];\n",
]


# --------------------------------------------------------------------------
# Chat template conversations.
# --------------------------------------------------------------------------

CHAT_CASES: list[tuple[list[dict], bool]] = [
    ([{"role": "user", "content": "What is the capital of France?"}], True),
    ([{"role": "user", "content": "What is the capital of France?"}], False),
    (
        [
            {"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": "Say hi."},
        ],
        True,
    ),
    (
        [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "Hi! Who are you?"},
            {"role": "assistant", "content": "I am SmolLM, an AI assistant. How can I help?"},
            {"role": "user", "content": "Tell me a joke."},
        ],
        True,
    ),
    (
        [
            {"role": "user", "content": "Hi! Who are you?"},
            {"role": "assistant", "content": "I am SmolLM."},
        ],
        False,
    ),
    (
        [
            {"role": "user", "content": "Traduis « café crème » 日本語で？ 🦀\nПривет!"},
        ],
        True,
    ),
    (
        [
            {"role": "user", "content": "  leading and trailing spaces  \n\n"},
            {"role": "assistant", "content": "\n"},
            {"role": "user", "content": ""},
        ],
        True,
    ),
    ([], True),
]


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _is_scalar(x) -> bool:
    return x is None or isinstance(x, (str, int, float, bool))


def to_json(obj, indent: int = 0, step: int = 2) -> str:
    """json.dumps-compatible output, but lists of scalars (and short lists of
    scalar lists, e.g. one step of top_logprobs) stay on one line."""
    pad = " " * indent
    inner = " " * (indent + step)
    if _is_scalar(obj):
        return json.dumps(obj, ensure_ascii=False)
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [
            f"{inner}{json.dumps(k, ensure_ascii=False)}: {to_json(v, indent + step, step)}"
            for k, v in obj.items()
        ]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, (list, tuple)):
        if not obj:
            return "[]"
        if all(_is_scalar(x) for x in obj):
            return json.dumps(list(obj), ensure_ascii=False, separators=(", ", ": "))
        if all(isinstance(x, (list, tuple)) and all(_is_scalar(y) for y in x) for x in obj):
            one = json.dumps([list(x) for x in obj], ensure_ascii=False, separators=(", ", ": "))
            if len(one) <= 200:
                return one
        items = [f"{inner}{to_json(x, indent + step, step)}" for x in obj]
        return "[\n" + ",\n".join(items) + "\n" + pad + "]"
    raise TypeError(f"cannot serialise {type(obj)}")


def write_json(path: Path, obj) -> None:
    text = to_json(obj) + "\n"
    assert json.loads(text) == json.loads(json.dumps(obj)), "serialiser round-trip mismatch"
    path.write_text(text, encoding="utf-8")
    print(f"wrote {path} ({len(text)} bytes)", file=sys.stderr)


def log_softmax64(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    m = x.max()
    return x - (m + np.log(np.exp(x - m).sum()))


# --------------------------------------------------------------------------
# Fixture builders
# --------------------------------------------------------------------------


def make_tokenize(llm, generator, model_sha):
    cases = []
    for text in TOKENIZE_TEXTS:
        ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        cases.append({"text": text, "parse_special": False, "ids": [int(i) for i in ids]})
    for text in SPECIAL_TEXTS:
        ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        cases.append({"text": text, "parse_special": True, "ids": [int(i) for i in ids]})
    hello_bos = llm.tokenize(b"Hello", add_bos=True, special=False)
    # Sanity: detokenizing (special=True) must give the input bytes back.
    for c in cases:
        back = llm.detokenize(c["ids"], special=True).decode("utf-8", errors="replace")
        if back != c["text"]:
            print(f"note: detokenize differs for {c['text']!r}: {back!r}", file=sys.stderr)
    return {
        "generator": generator,
        "model_sha256": model_sha,
        "hello_add_bos_true": [int(i) for i in hello_bos],
        "cases": cases,
    }


def make_greedy(llm, llama_cpp, generator, model_sha):
    vocab = llm._model.vocab
    eos = int(llm.token_eos())

    def is_stop(tok: int) -> bool:
        return tok == eos or bool(llama_cpp.llama_vocab_is_eog(vocab, tok))

    def next_logits_batch(seq: list[int]) -> np.ndarray:
        # Evaluate the whole sequence as one batch (llama.cpp's prompt path) and take the last row.
        llm.reset()
        llm.eval(seq)
        return np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32, copy=True)

    def greedy(prompt_tokens: list[int], incremental: bool):
        tokens: list[int] = []
        top: list[list[list]] = []
        min_gap = (float("inf"), -1)
        if incremental:
            llm.reset()
            llm.eval(prompt_tokens)
        while len(tokens) < N_PREDICT:
            if incremental:
                logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32, copy=True)
            else:
                logits = next_logits_batch(prompt_tokens + tokens)
            lp = log_softmax64(logits)
            # stable sort on -lp keeps lowest id first on exact ties
            order = np.argsort(-lp, kind="stable")[:TOP_K_LOGPROBS]
            top.append([[int(i), float(lp[i])] for i in order])
            nxt = int(order[0])
            assert nxt == int(np.argmax(logits))
            gap = float(lp[order[0]] - lp[order[1]])
            if gap < min_gap[0]:
                min_gap = (gap, len(tokens))
            tokens.append(nxt)
            if is_stop(nxt):
                break
            if len(tokens) >= N_PREDICT:
                break
            if incremental:
                llm.eval([nxt])
        return tokens, top, min_gap

    cases = []
    for prompt in GREEDY_PROMPTS:
        prompt_tokens = [int(t) for t in llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)]
        # The reference: every step evaluates prompt + generated tokens as one batch. llama.cpp's
        # single-token decode path sums the f16 attention dot products in another order than its batch
        # path, so llama.cpp's own incremental decoding drifts from its batch evaluation on this model
        # (logit differences up to ~1 after a few steps). The batch path is the one we reproduce
        # bit for bit; the incremental result is recorded for information.
        tokens, top, min_gap = greedy(prompt_tokens, incremental=False)
        inc_tokens, _, _ = greedy(prompt_tokens, incremental=True)
        text = llm.detokenize(tokens, special=True).decode("utf-8", errors="replace")
        print(
            f"[greedy] {len(prompt_tokens)} prompt toks, {len(tokens)} gen, "
            f"min top1-top2 gap {min_gap[0]:.4f} at step {min_gap[1]}, "
            f"incremental decode agrees on {sum(1 for _ in zip(tokens, inc_tokens))} / "
            f"first diff at {next((i for i, (a, b) in enumerate(zip(tokens, inc_tokens)) if a != b), None)}: "
            f"{prompt[-40:]!r} -> {text!r}",
            file=sys.stderr,
        )
        cases.append(
            {
                "prompt": prompt,
                "prompt_tokens": prompt_tokens,
                "tokens": tokens,
                "top_logprobs": top,
                "incremental_tokens": inc_tokens,
            }
        )
    return {
        "generator": generator,
        "model_sha256": model_sha,
        "n_predict": N_PREDICT,
        "n_ctx": N_CTX,
        "n_threads": N_THREADS,
        "flash_attn": False,
        "evaluation": "each step evaluates prompt + generated tokens as one batch",
        "cases": cases,
    }


def make_chat(llm, llama_cpp, generator):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    template = llm.metadata["tokenizer.chat_template"]
    vocab = llm._model.vocab

    def tok_text(key: str) -> str:
        tid = llm.metadata.get(key)
        if tid is None:
            return ""
        return llama_cpp.llama_vocab_get_text(vocab, int(tid)).decode("utf-8")

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    # Same environment as transformers' chat template rendering.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    compiled = env.from_string(template)

    cases = []
    for messages, agp in CHAT_CASES:
        text = compiled.render(
            messages=messages,
            add_generation_prompt=agp,
            bos_token=tok_text("tokenizer.ggml.bos_token_id"),
            eos_token=tok_text("tokenizer.ggml.eos_token_id"),
        )
        cases.append({"messages": messages, "add_generation_prompt": agp, "text": text})
    return {"generator": generator, "template": template, "cases": cases}


def main() -> int:
    home = Path(os.environ.get("EDGEPROMPT_HOME", Path.home() / ".cache" / "edgeprompt"))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=home / MODEL_FILE)
    ap.add_argument("--out", type=Path, default=Path("fixtures/smollm2"))
    ap.add_argument("--greedy-only", type=Path, metavar="FILE",
                    help="write only the greedy fixture, to FILE (for other quantizations of the model)")
    ap.add_argument("--tokenize-only", action="store_true",
                    help="write only tokenize.json")
    ap.add_argument("--no-repack", action="store_true",
                    help="load with llama.cpp's weight repacking off (use_extra_bufts = false), so "
                         "Q4_0 / Q4_K weights run ggml's vec_dot path")
    args = ap.parse_args()

    import llama_cpp
    from llama_cpp import Llama

    if llama_cpp.__version__ != LLAMA_CPP_PYTHON_VERSION:
        print(
            f"error: llama-cpp-python {llama_cpp.__version__} installed, need {LLAMA_CPP_PYTHON_VERSION}",
            file=sys.stderr,
        )
        return 1
    if not args.model.is_file():
        print(f"error: model not found: {args.model} (see scripts/reference/README.md)", file=sys.stderr)
        return 1
    model_sha = sha256_file(args.model)
    if args.no_repack:
        # The Llama constructor has no switch for it: make the default model params carry it.
        default_params = llama_cpp.llama_model_default_params

        def no_repack_params():
            p = default_params()
            p.use_extra_bufts = False
            return p

        llama_cpp.llama_model_default_params = no_repack_params
        import llama_cpp.llama as llama_mod

        llama_mod.llama_cpp.llama_model_default_params = no_repack_params
    if model_sha != EXPECTED_SHA256 and not args.greedy_only:
        print(f"warning: model sha256 {model_sha} != expected {EXPECTED_SHA256}", file=sys.stderr)

    llm = Llama(
        model_path=str(args.model),
        n_ctx=N_CTX,
        n_threads=N_THREADS,
        n_threads_batch=N_THREADS,
        n_batch=N_BATCH,
        n_gpu_layers=0,
        logits_all=True,
        flash_attn=False,  # -> LLAMA_FLASH_ATTN_TYPE_DISABLED
        type_k=None,  # default f16 KV cache
        type_v=None,
        seed=0,
        verbose=False,
    )
    cp = llm.context_params
    assert cp.flash_attn_type == llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED, cp.flash_attn_type
    assert cp.type_k == llama_cpp.GGML_TYPE_F16 and cp.type_v == llama_cpp.GGML_TYPE_F16, (cp.type_k, cp.type_v)
    assert llm.n_ctx() == N_CTX

    generator = {"llama_cpp_python": LLAMA_CPP_PYTHON_VERSION, "script": SCRIPT}
    if args.greedy_only:
        greedy = make_greedy(llm, llama_cpp, generator, model_sha)
        greedy["model"] = args.model.name
        greedy["repack"] = not args.no_repack
        args.greedy_only.parent.mkdir(parents=True, exist_ok=True)
        write_json(args.greedy_only, greedy)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "tokenize.json", make_tokenize(llm, generator, model_sha))
    if args.tokenize_only:
        return 0
    write_json(args.out / "chat.json", make_chat(llm, llama_cpp, generator))
    write_json(args.out / "greedy.json", make_greedy(llm, llama_cpp, generator, model_sha))
    return 0


if __name__ == "__main__":
    sys.exit(main())
