"""The OpenAI Batch API format: request lines -> flat rows and the checks a request must pass;
output rows -> batch output lines whose bodies validate as OpenAI's ChatCompletion / Completion.

A request is served as it asks or refused with the reason (status_code 400): its url, model, `n`,
logprobs, response_format and sampling settings are honoured; a body key batchllm cannot serve
(tools, audio, ...) refuses the request instead of being ignored.
"""
from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"
SUPPORTED_URLS = (CHAT_URL, COMPLETIONS_URL)
# body keys copied to the row as they are (checked by SamplingParams when the row is prepared)
BODY_SETTINGS = ("max_tokens", "temperature", "top_p", "seed", "stop", "n", "presence_penalty",
                 "frequency_penalty")
# body keys that change the answer and that batchllm does not serve, with the value that is
# harmless (the request is refused when the key holds anything else)
UNSERVED: dict[str, Any] = {"tools": None, "functions": None, "tool_choice": "none",
                            "function_call": "none", "audio": None, "modalities": ["text"],
                            "prediction": None, "web_search_options": None, "echo": False,
                            "suffix": None, "best_of": 1}
# reader errors of lines that are not requests at all (no custom_id can be read from them)
LINE_ERRORS = ("malformed JSON line", "line is JSON but not an object")
FINISH_REASONS = ("stop", "length")
CREATED = "_batchllm_created"  # an output row's commit time (Unix seconds), given by finalize


def flatten_openai_request(obj: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """{custom_id, method, url, body{messages|prompt, ...}} -> a flat row, or (row, error)."""
    body = obj.get("body")
    flat: dict[str, Any] = {"custom_id": obj.get("custom_id"), "method": obj.get("method"),
                            "url": obj.get("url")}
    if not isinstance(body, dict):
        return flat, "OpenAI batch line has no `body` object"
    if "messages" in body:
        flat["messages"] = body["messages"]
    elif "prompt" in body:
        flat["prompt"] = body["prompt"]
    for key in BODY_SETTINGS:
        if key in body:
            flat[key] = body[key]
    if "max_completion_tokens" in body and "max_tokens" not in body:
        flat["max_tokens"] = body["max_completion_tokens"]
    for key in ("model", "response_format", "logprobs", "top_logprobs", "logit_bias"):
        if body.get(key) is not None:
            flat[key] = body[key]
    unserved = [k for k, fine in UNSERVED.items() if body.get(k) is not None and body[k] != fine]
    if unserved:
        flat["unserved"] = unserved
    return flat, None


@lru_cache(maxsize=16)
def model_names(model: str) -> frozenset[str]:
    """The names a request's `model` may give for the job's model (compared in lower case): the
    job's own string, its folder or file name, and a known model's aliases."""
    from batchllm.hub import known_model

    names = {model, Path(model).name, Path(model).stem}
    known = known_model(model)
    if known is not None:
        names.update(known.aliases)
        names.add(known.key)
    names.update({n.rsplit("/", 1)[-1] for n in list(names)})
    return frozenset(n.lower() for n in names if n)


def request_problem(row: dict[str, Any], job_model: str | None) -> str | None:
    """Why a flat request cannot be served as asked (None when it can). `job_model`: the job's
    model, which a request's `model` must name (None: any `model` is answered)."""
    url = row.get("url")
    if url not in SUPPORTED_URLS:
        return (f"url {url!r} is not supported: batchllm serves POST {CHAT_URL} (messages) and "
                f"POST {COMPLETIONS_URL} (prompt)")
    if row.get("method") not in (None, "POST"):
        return f"method {row['method']!r} is not supported: batch requests are POST"
    chat = url == CHAT_URL
    if chat and "messages" not in row:
        return f"a {CHAT_URL} request needs body.messages"
    if not chat and "prompt" not in row:
        return f"a {COMPLETIONS_URL} request needs body.prompt"
    for key in row.get("unserved", []):
        return (f"body.{key} is not supported by batchllm; the request is refused rather than "
                "answered without it")
    model = row.get("model")
    if job_model is not None and model is not None and (
            not isinstance(model, str) or (model.lower() not in model_names(job_model)
                                           and model.rsplit("/", 1)[-1].lower()
                                           not in model_names(job_model))):
        return (f"body.model {model!r} is not the model this job runs ({job_model!r}); set "
                "input.openai_model_mismatch: ignore to answer it with the job's model")
    return None


def request_logprobs(row: dict[str, Any]) -> int | None:
    """SamplingParams.logprobs for a request's logprobs settings (chat: logprobs true +
    top_logprobs k; completions: logprobs k); None when it asks for none. Raises ValueError."""
    asked, top = row.get("logprobs"), row.get("top_logprobs")
    if row.get("url") == CHAT_URL:
        if asked is not None and not isinstance(asked, bool):
            raise ValueError(f"body.logprobs={asked!r}: expected true or false")
        if top is not None and (not isinstance(top, int) or isinstance(top, bool)
                                or not 0 <= top <= 20):
            raise ValueError(f"body.top_logprobs={top!r}: expected an integer in [0, 20]")
        if top is not None and not asked:
            raise ValueError("body.top_logprobs needs body.logprobs: true")
        return (top or 0) if asked else None
    if asked is not None and (not isinstance(asked, int) or isinstance(asked, bool)
                              or not 0 <= asked <= 20):
        raise ValueError(f"body.logprobs={asked!r}: expected an integer in [0, 20] "
                         "(a completion's number of top log-probabilities)")
    return asked


def token_logprobs(steps: list[tuple[int, float, list[tuple[int, float, str | None]]]], k: int,
                   token_text: Callable[[int], str]) -> list[dict[str, Any]]:
    """Per output token (id, log p, alternatives as (id, log p, text or None)): {token, logprob,
    top_logprobs: [{token, logprob}] (the k most likely)}; a missing text comes from token_text."""
    out = []
    for token, logprob, alts in steps:
        text = {t: s for t, _, s in alts if s is not None}
        best = sorted(alts, key=lambda a: -a[1])[:k]
        out.append({"token": text.get(token) or token_text(token), "logprob": float(logprob),
                    "top_logprobs": [{"token": s if s is not None else token_text(t),
                                      "logprob": float(v)} for t, v, s in best]})
    return out


def openai_lines(rows: list[dict[str, Any]], model: str) -> list[dict[str, Any]]:
    """OpenAI batch output lines (one per request, samples as its choices) from output rows in
    input order. Each row may carry CREATED (Unix seconds; default 0)."""
    by_request: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        by_request.setdefault((r["input_file"], r["input_row"]), []).append(r)
    return [_line(key, samples, model) for key, samples in by_request.items()]


def _line(key: tuple[str, int], samples: list[dict[str, Any]], model: str) -> dict[str, Any]:
    first = samples[0]
    tag = hashlib.sha256(f"{key[0]}\0{key[1]}".encode()).hexdigest()[:24]
    line: dict[str, Any] = {"id": f"batch_req_{tag}", "custom_id": first["id"]}
    error = first["error"]
    if error is not None and error.startswith(LINE_ERRORS):
        line.update(response=None, error={"code": "invalid_json_line", "message": error})
        return line
    request_id = f"req_{tag}"
    if error is not None or first["finish_reason"] in ("error", "skipped"):
        message = error or ("skipped: the prompt is too long for the model "
                            "(limits.prompt_too_long: skip)")
        body: dict[str, Any] = {"error": {"message": message, "type": "invalid_request_error",
                                          "param": None, "code": None}}
        line.update(response={"status_code": 400, "request_id": request_id, "body": body},
                    error=None)
        return line
    chat = first.get("url") != COMPLETIONS_URL
    choices = [_choice(s, chat) for s in sorted(samples, key=lambda s: s.get("sample_index") or 0)]
    prompt = first["num_prompt_tokens"] or 0
    completion = sum(s["num_output_tokens"] or 0 for s in samples)
    body = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{tag}",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(first.get(CREATED) or 0), "model": model, "choices": choices,
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                      "total_tokens": prompt + completion}}
    line.update(response={"status_code": 200, "request_id": request_id, "body": body}, error=None)
    return line


def _choice(s: dict[str, Any], chat: bool) -> dict[str, Any]:
    reason = s["finish_reason"] if s["finish_reason"] in FINISH_REASONS else "stop"
    steps = s.get("openai_logprobs")
    text = s["text"] or ""
    if chat:
        logprobs = None if steps is None else {"content": [_chat_step(x) for x in steps],
                                               "refusal": None}
        return {"index": s.get("sample_index") or 0, "finish_reason": reason, "logprobs": logprobs,
                "message": {"role": "assistant", "content": text, "refusal": None}}
    logprobs = None
    if steps is not None:
        offsets, at = [], 0
        for x in steps:
            offsets.append(at)
            at += len(x["token"])
        logprobs = {"tokens": [x["token"] for x in steps],
                    "token_logprobs": [x["logprob"] for x in steps],
                    "top_logprobs": [{t["token"]: t["logprob"] for t in x["top_logprobs"]}
                                     for x in steps], "text_offset": offsets}
    return {"index": s.get("sample_index") or 0, "finish_reason": reason, "text": text,
            "logprobs": logprobs}


def _chat_step(x: dict[str, Any]) -> dict[str, Any]:
    return {"token": x["token"], "logprob": x["logprob"], "bytes": list(x["token"].encode()),
            "top_logprobs": [{"token": t["token"], "logprob": t["logprob"],
                              "bytes": list(t["token"].encode())} for t in x["top_logprobs"]]}
