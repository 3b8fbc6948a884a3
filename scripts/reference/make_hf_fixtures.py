#!/usr/bin/env python3
"""Builds the Hugging Face reference fixtures in fixtures/hf/<arch>/.

For each of Llama, Mistral and Qwen2 the script makes a tiny random-weight model (seeded) with a tiny
tokenizer trained here, saves it with `save_pretrained` (safetensors), reloads it with the Auto classes
as a user would, and writes `reference.json`: tokenizations of a few strings, a rendered chat, and the
float32 logits of every position of a few prompts, computed by transformers on CPU in float32 with eager
attention.

  ~/.cache/edgeprompt/hf-venv/bin/python scripts/reference/make_hf_fixtures.py [--out fixtures/hf]

Needs torch, transformers, tokenizers and safetensors (see scripts/reference/README.md). Running it twice
gives the same files.
"""

import argparse
import json
import os
import shutil
import sys

import torch
import transformers
import tokenizers
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast
from transformers.integrations.sdpa_attention import repeat_kv

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! Hello there, how are you today?",
    "EdgePrompt runs small language models on the edge.",
    "The cat sat on the mat and the dog sat on the log.",
    "Numbers like 12345 and 2024 appear in text too.",
    "A user asks a question and the assistant answers it.",
    "What is the capital of France? Paris is the capital.",
    "Tokenizers split text into pieces called tokens.",
    "Café, naïve, déjà vu: accents are bytes as well.",
    "the the the and and of of to to in in is is it it",
]

STRINGS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    " leading space and  double  spaces",
    "Numbers 12345, accents café ü, emoji \U0001F642 and a newline\nhere",
    "unseen wordsxyz qqq",
    "",
]

PROMPTS = [
    "Hello world! How are you?",
    "The cat sat on the mat",
    "Paris is the capital of",
]

CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hello, who are you?"},
    {"role": "assistant", "content": "I am a tiny model."},
    {"role": "user", "content": "What is the capital of France?"},
]

LLAMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}<<SYS>>\n{{ message['content'] | trim }}\n<</SYS>>\n\n"
    "{% elif message['role'] == 'user' %}[INST] {{ message['content'] | trim }} [/INST]"
    "{% else %} {{ message['content'] | trim }} {{ eos_token }}{% endif %}{% endfor %}"
)

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)


def spm_style_tokenizer():
    """A Llama-2-style tokenizer: BPE with byte fallback over Metaspace pieces, <unk> <s> </s>, the 256
    byte tokens <0x00>..<0xFF> at ids 3..258, then the trained pieces."""
    tk = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(vocab_size=140, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tk.train_from_iterator(CORPUS, trainer)
    trained = json.loads(tk.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = 3 + b
    for tok, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        if tok not in vocab:
            vocab[tok] = len(vocab)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    bpe = models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    out = tokenizers.Tokenizer(bpe)
    out.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    out.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    out.add_special_tokens(
        [tokenizers.AddedToken(t, special=True, normalized=False) for t in ["<unk>", "<s>", "</s>"]]
    )
    out.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=out, bos_token="<s>", eos_token="</s>", unk_token="<unk>", chat_template=LLAMA_TEMPLATE
    )
    return fast


def byte_level_tokenizer():
    """A Qwen2-style tokenizer: byte-level BPE after Qwen2's split regex, ChatML special tokens."""
    tk = tokenizers.Tokenizer(models.BPE())
    pattern = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tk.train_from_iterator(CORPUS, trainer)
    tk.add_special_tokens(
        [tokenizers.AddedToken(t, special=True, normalized=False) for t in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]]
    )
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML_TEMPLATE
    )
    return fast


def _f16(x):
    return x.to(torch.float16).to(torch.float32)


def f16_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager causal attention with llama.cpp's CPU numerics (EdgePrompt's too): K and V stored in f16,
    Q rounded to f16 before Q.K^T, softmax in f32, probabilities rounded to f16 before P.V. The rest of
    the model stays f32, so logits computed with it isolate the effect of those roundings."""
    g = module.num_key_value_groups
    k = repeat_kv(_f16(key), g)
    v = repeat_kv(_f16(value), g)
    w = torch.matmul(_f16(query), k.transpose(2, 3)) * scaling
    n = w.shape[-1]
    w = w.masked_fill(torch.triu(torch.ones(n, n, dtype=torch.bool), 1), float("-inf"))
    p = torch.softmax(w, dim=-1, dtype=torch.float32)
    out = torch.matmul(_f16(p), v).transpose(1, 2).contiguous()
    return out, p


AttentionInterface.register("f16_attention", f16_attention)


def randomize(model, seed):
    """Weights with enough spread that the logits are well separated (HF's default init is too flat)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            r = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * r)
            elif name.endswith(".bias"):
                p.copy_(0.5 * r)
            elif "embed_tokens" in name:
                p.copy_(r)
            else:
                p.copy_(r * 1.5 / p.shape[1] ** 0.5)


def build(arch, out_dir, seed):
    torch.manual_seed(seed)
    if arch == "qwen2":
        tok = byte_level_tokenizer()
    else:
        tok = spm_style_tokenizer()
    n_vocab = len(tok)
    common = dict(
        vocab_size=n_vocab,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
    )
    if arch == "llama":
        cfg = transformers.LlamaConfig(
            **common,
            bos_token_id=1,
            eos_token_id=2,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
        )
        cls, dtype = transformers.LlamaForCausalLM, torch.float32
    elif arch == "mistral":
        cfg = transformers.MistralConfig(
            **common,
            bos_token_id=1,
            eos_token_id=2,
            tie_word_embeddings=False,
            sliding_window=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        )
        cls, dtype = transformers.MistralForCausalLM, torch.bfloat16
    else:
        cfg = transformers.Qwen2Config(
            **common,
            bos_token_id=None,
            eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
            tie_word_embeddings=True,
            use_sliding_window=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        )
        cls, dtype = transformers.Qwen2ForCausalLM, torch.float32
    model = cls(cfg).eval()
    randomize(model, seed)
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    model.to(dtype).save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "config.json")) as f:
        saved = json.load(f)
    print(arch, "saved dtype", saved.get("dtype", saved.get("torch_dtype")), file=sys.stderr)

    # The reference: reload as a user would, in float32 (bf16 weights are widened exactly).
    tok = AutoTokenizer.from_pretrained(out_dir)
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32, attn_implementation="eager").eval()
    ref = {
        "arch": arch,
        "weights_dtype": str(dtype).replace("torch.", ""),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
        "tokenize": [
            {
                "text": s,
                "ids": tok(s)["input_ids"],
                "ids_no_special": tok(s, add_special_tokens=False)["input_ids"],
            }
            for s in STRINGS
        ],
        "special_text": [
            {
                "text": t,
                "ids_no_special": tok(t, add_special_tokens=False)["input_ids"],
                "ids_split_special": tok(t, add_special_tokens=False, split_special_tokens=True)["input_ids"],
            }
            for t in ["<s>Hello</s>", "<|im_start|>user\nHi<|im_end|>"]
        ],
    }
    rendered = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    ref["chat"] = {
        "messages": CHAT,
        "add_generation_prompt": True,
        "rendered": rendered,
        "ids": tok(rendered, add_special_tokens=False)["input_ids"],
    }
    emulated = AutoModelForCausalLM.from_pretrained(
        out_dir, dtype=torch.float32, attn_implementation="f16_attention"
    ).eval()
    prompts = []
    with torch.no_grad():
        for p in PROMPTS:
            ids = tok(p)["input_ids"]
            logits = model(torch.tensor([ids])).logits[0].float()
            logits16 = emulated(torch.tensor([ids])).logits[0].float()
            prompts.append(
                {
                    "text": p,
                    "ids": ids,
                    "logits": [[float("%.7g" % x) for x in row] for row in logits.tolist()],
                    "argmax": logits.argmax(-1).tolist(),
                    "logits_f16_attention": [[float("%.7g" % x) for x in row] for row in logits16.tolist()],
                }
            )
    ref["prompts"] = prompts
    with open(os.path.join(out_dir, "reference.json"), "w") as f:
        json.dump(ref, f, ensure_ascii=False, indent=None, separators=(",", ":"))
        f.write("\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="fixtures/hf")
    args = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    for i, arch in enumerate(["llama", "mistral", "qwen2"]):
        build(arch, os.path.join(args.out, arch), seed=1234 + i)


if __name__ == "__main__":
    main()
