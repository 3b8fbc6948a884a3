#!/usr/bin/env python3
"""Drives an EdgePrompt edge with the official `openai` client and prints one JSON object with what it got.

Usage: openai_client.py BASE_URL API_KEY MODEL SYSTEM_OR_EMPTY USER_MESSAGE MAX_TOKENS

Runs, greedily (temperature 0): a non-streaming chat completion, the same request streaming (with
stream_options.include_usage), and lists the models. The caller (a Rust test) compares the answers with
`edgeprompt generate` and checks the usage fields.
"""

import json
import sys

import openai


def main() -> None:
    base_url, api_key, model, system, user, max_tokens = sys.argv[1:7]
    client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=300)
    messages = []
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": user})
    r = client.chat.completions.create(
        model=model, messages=messages, temperature=0, max_tokens=int(max_tokens), seed=1
    )
    full = {
        "text": r.choices[0].message.content,
        "finish_reason": r.choices[0].finish_reason,
        "prompt_tokens": r.usage.prompt_tokens,
        "completion_tokens": r.usage.completion_tokens,
        "cached_tokens": (r.usage.prompt_tokens_details.cached_tokens
                          if r.usage.prompt_tokens_details else None),
    }
    pieces = []
    usage = None
    finish = None
    stream = client.chat.completions.create(
        model=model, messages=messages, temperature=0, max_tokens=int(max_tokens), seed=1,
        stream=True, stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.usage is not None:
            usage = {"prompt_tokens": chunk.usage.prompt_tokens,
                     "completion_tokens": chunk.usage.completion_tokens}
        for c in chunk.choices:
            if c.delta.content:
                pieces.append(c.delta.content)
            if c.finish_reason:
                finish = c.finish_reason
    models = [m.id for m in client.models.list().data]
    err = None
    try:
        client.chat.completions.create(model=model, messages=[], max_tokens=4)
    except openai.BadRequestError as e:
        err = {"status": e.status_code, "type": (e.body or {}).get("type")}
    print(json.dumps({
        "full": full,
        "stream": {"text": "".join(pieces), "chunks": len(pieces), "finish_reason": finish,
                   "usage": usage},
        "models": models,
        "empty_messages_error": err,
    }))


if __name__ == "__main__":
    main()
