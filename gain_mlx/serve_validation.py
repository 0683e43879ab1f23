"""Request validation of ``gain_mlx.serve``: the JSON body, the OpenAI fields of
completions and chat requests, prompts and messages. Each problem is an
:class:`APIError` naming the field at fault, answered as OpenAI's error object.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .serve_engine import BASE_ALIASES, DEFAULT_MAX_PROMPT_TOKENS, DEFAULT_MAX_TOKENS, Job, Params

MAX_PROMPTS = 256  # prompts in one completions request
MAX_LOGIT_BIAS = 1024  # entries in one logit_bias
MAX_SEED = 2**64 - 1  # mx.random.seed's range


class APIError(Exception):
    """An error answered to the client as ``{"error": {...}}`` in OpenAI's shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


MISSING = object()


def get_field(body, name, types, default=MISSING, lo=None, hi=None, nullable=True):
    """``body[name]`` checked: of ``types`` (bool is not a number), within ``[lo, hi]``."""
    value = body.get(name, MISSING)
    if value is MISSING or (value is None and nullable):
        if default is MISSING:
            raise APIError(400, f"'{name}' is required", param=name, code="missing_required_parameter")
        return default
    types = types if isinstance(types, tuple) else (types,)
    if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
        names = " or ".join({int: "integer", float: "number", str: "string", bool: "boolean", list: "array", dict: "object"}[t] for t in types)
        raise APIError(400, f"'{name}' must be {'an' if names[0] in 'aeiou' else 'a'} {names}, got {json.dumps(value)[:60]}", param=name, code="invalid_type")
    if isinstance(value, float) and not math.isfinite(value):
        raise APIError(400, f"'{name}' must be a finite number, got {value}", param=name, code="invalid_value")
    if lo is not None and value < lo:
        raise APIError(400, f"'{name}' must be >= {lo}, got {value}", param=name, code="invalid_value")
    if hi is not None and value > hi:
        raise APIError(400, f"'{name}' must be <= {hi}, got {value}", param=name, code="invalid_value")
    return value


# The fields each endpoint implements; any other field is refused by name, never ignored.
_COMMON_FIELDS = {
    "model", "adapters", "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "logit_bias",
    "repetition_penalty", "presence_penalty", "frequency_penalty", "logprobs", "stop", "stream",
    "stream_options", "n", "user", "ignore_eos",
}
COMPLETION_FIELDS = _COMMON_FIELDS | {"prompt", "echo", "best_of", "suffix"}
CHAT_FIELDS = _COMMON_FIELDS | {"messages", "max_completion_tokens", "top_logprobs"}


def check_fields(body: dict, known) -> None:
    """Refuse fields this server does not implement (and no-op values of OpenAI's)."""
    for name in body:
        if name not in known:
            raise APIError(400, f"'{name}' is not supported by this server", param=name, code="unsupported_parameter")
    if get_field(body, "best_of", int, 1) != 1:
        raise APIError(400, "'best_of' is not supported by this server (only 1)", param="best_of", code="unsupported_parameter")
    if get_field(body, "suffix", str, ""):
        raise APIError(400, "'suffix' is not supported by this server", param="suffix", code="unsupported_parameter")
    get_field(body, "user", str, None)
    opts = get_field(body, "stream_options", dict, {})
    for k in opts:
        if k != "include_usage":
            raise APIError(400, f"'stream_options.{k}' is not supported by this server", param="stream_options", code="unsupported_parameter")
    get_field(opts, "include_usage", bool, False)


def parse_params(body: dict, default_max_tokens: int, chat: bool, vocab_size: int = None) -> Params:
    """A request's sampling fields, each checked for type, range and finiteness
    (``max_tokens`` 0 passes here: only an echo may use it)."""
    max_tokens = get_field(body, "max_completion_tokens", int, None, lo=1) if chat else None
    if max_tokens is None:
        max_tokens = get_field(body, "max_tokens", int, default_max_tokens, lo=0 if not chat else 1)
    n = get_field(body, "n", int, 1)
    if n != 1:
        raise APIError(400, "only n=1 is supported: send one request per completion", param="n", code="invalid_value")
    p = Params(
        max_tokens=max_tokens,
        temperature=float(get_field(body, "temperature", (int, float), 0.0, lo=0, hi=2)),
        top_p=float(get_field(body, "top_p", (int, float), 1.0, lo=0, hi=1)),
        top_k=get_field(body, "top_k", int, 0, lo=0, hi=vocab_size) % (vocab_size or 2**62),  # the whole vocabulary: no top-k
        min_p=float(get_field(body, "min_p", (int, float), 0.0, lo=0, hi=1)),
        seed=get_field(body, "seed", int, None, lo=0, hi=MAX_SEED),
        repetition_penalty=float(get_field(body, "repetition_penalty", (int, float), 0.0, lo=0, hi=10)),
        presence_penalty=float(get_field(body, "presence_penalty", (int, float), 0.0, lo=-2, hi=2)),
        frequency_penalty=float(get_field(body, "frequency_penalty", (int, float), 0.0, lo=-2, hi=2)),
        ignore_eos=get_field(body, "ignore_eos", bool, False),
    )
    bias = get_field(body, "logit_bias", dict, None)
    if bias:
        p.logit_bias = parse_logit_bias(bias, vocab_size)
    if chat:
        p.logprobs = get_field(body, "logprobs", bool, False)
        p.top_logprobs = get_field(body, "top_logprobs", int, 0, lo=0, hi=20)
    else:
        k = get_field(body, "logprobs", int, None, lo=0, hi=20)
        p.logprobs, p.top_logprobs = k is not None, k or 0
    return p


def parse_logit_bias(bias: dict, vocab_size: int = None) -> dict:
    """``{"token id": bias}`` -> ``{id: bias}``: ids within the vocabulary, biases in [-100, 100]."""
    if len(bias) > MAX_LOGIT_BIAS:
        raise APIError(400, f"'logit_bias' has {len(bias)} entries (at most {MAX_LOGIT_BIAS})", param="logit_bias", code="invalid_value")
    out = {}
    for k, v in bias.items():
        if not (k.isascii() and k.isdigit()) or (vocab_size is not None and int(k) >= vocab_size):
            raise APIError(400, f"'logit_bias' key {k[:40]!r} is not a token id in [0, {vocab_size})", param="logit_bias", code="invalid_value")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not -100 <= v <= 100:
            raise APIError(400, f"'logit_bias' values must be numbers in [-100, 100], got {json.dumps(v)[:40]}", param="logit_bias", code="invalid_value")
        out[int(k)] = float(v)
    return out


def parse_stop(body) -> list:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise APIError(400, "'stop' must be a string or an array of up to 4 non-empty strings", param="stop", code="invalid_type")
    return stop


def parse_messages(body) -> list:
    messages = get_field(body, "messages", list)
    if not messages:
        raise APIError(400, "'messages' must be a non-empty array", param="messages", code="invalid_value")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(400, f"messages[{i}] must be an object with a string 'role'", param=f"messages[{i}]", code="invalid_type")
        content = m.get("content", "")
        if content is None:
            content = ""
        if isinstance(content, list):
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise APIError(400, f"messages[{i}].content: only text parts are supported", param=f"messages[{i}].content", code="invalid_value")
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string or an array of text parts", param=f"messages[{i}].content", code="invalid_type")
        out.append({**{k: v for k, v in m.items() if k not in ("content",)}, "content": content})
    return out


def chat_prompt(tokenizer, messages) -> list:
    """Token ids of a chat: the tokenizer's chat template, else mlx_lm.server's plain format."""
    if getattr(tokenizer, "has_chat_template", False) or getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return list(ids["input_ids"] if isinstance(ids, dict) else ids)
    from mlx_lm.server import convert_chat

    return tokenizer.encode(convert_chat(messages))


def _is_ids(x) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


def text_prompts(tokenizer, prompt, token_limit=None) -> list:
    """Token ids of each completions prompt, as OpenAI's legacy API takes them: a string,
    an array of strings, an array of token ids, or an array of arrays of token ids.
    Strings are encoded as mlx_lm.generate does; token ids are used as given."""
    if isinstance(prompt, str) or _is_ids(prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and (all(isinstance(p, str) for p in prompt) or all(_is_ids(p) for p in prompt)):
        prompts = prompt
    else:
        raise APIError(400, "'prompt' must be a string, an array of strings, an array of token ids or an array of arrays of token ids",
                       param="prompt", code="invalid_type" if not isinstance(prompt, list) or prompt else "invalid_value")
    if len(prompts) > MAX_PROMPTS:
        raise APIError(400, f"'prompt' holds {len(prompts)} prompts (at most {MAX_PROMPTS} in one request)", param="prompt", code="invalid_value")
    limit = token_limit or getattr(tokenizer, "vocab_size", None) or len(tokenizer)
    out = []
    for p in prompts:
        if isinstance(p, str):
            bos = getattr(tokenizer, "bos_token", None)
            out.append(list(tokenizer.encode(p, add_special_tokens=bos is None or not p.startswith(bos))))
        elif any(t < 0 or t >= limit for t in p):
            raise APIError(400, f"'prompt' token ids must be in [0, {limit})", param="prompt", code="invalid_value")
        else:
            out.append(list(p))
    return out


def adapter_of(body, e) -> Optional[str]:
    """The adapter a request names in 'model' or mlx_lm.server's 'adapters' (None: the base)."""
    model = get_field(body, "model", str, None)
    adapters = get_field(body, "adapters", str, None)
    by_model = None
    if model is not None and model != e.base_name and model not in BASE_ALIASES and model != str(e.model_spec):
        if model not in e.adapter_names():
            raise APIError(404, f"the model '{model}' does not exist: GET /v1/models lists the base and its adapters", param="model", code="model_not_found")
        by_model = model
    if adapters is None:
        return by_model
    names = e.adapter_names()
    by_path = {i["path"]: i["id"] for i in e.adapter_info()} | {i["resolved_path"]: i["id"] for i in e.adapter_info()}
    try:
        resolved = str(Path(adapters).resolve()) if adapters not in names else None
    except (ValueError, OSError):
        resolved = None
    name = adapters if adapters in names else by_path.get(adapters) or by_path.get(resolved)
    if name is None:
        raise APIError(404, f"adapter '{adapters[:200]}' is not loaded: load it with POST /v1/adapters", param="adapters", code="model_not_found")
    if by_model is not None and by_model != name:
        raise APIError(400, f"'model' names adapter '{by_model}' but 'adapters' names '{name}'", param="adapters", code="invalid_value")
    return name


@dataclass
class Request:
    """A checked completions or chat request: its jobs (one per prompt) and output options."""

    jobs: list
    adapter: Optional[str]
    params: Params
    stop: list
    echo: bool
    stream: bool
    include_usage: bool


def parse_request(body: dict, e, chat: bool, default_max_tokens: int) -> Request:
    """A completions (or chat) request checked against the engine ``e``: one job per prompt,
    each within the model's prompt and context limits."""
    check_fields(body, CHAT_FIELDS if chat else COMPLETION_FIELDS)
    stream = get_field(body, "stream", bool, False)
    include_usage = stream and bool((get_field(body, "stream_options", dict, {}) or {}).get("include_usage"))
    adapter = adapter_of(body, e)
    params = parse_params(body, default_max_tokens, chat, e.vocab_size)
    stop = parse_stop(body)
    echo = not chat and get_field(body, "echo", bool, False)
    if chat:
        prompts = [chat_prompt(e.tokenizer, parse_messages(body))]
    else:
        prompts = text_prompts(e.tokenizer, get_field(body, "prompt", (str, list)), e.token_limit)
    field_ = "messages" if chat else "prompt"
    if params.max_tokens == 0 and not echo:
        raise APIError(400, "'max_tokens' must be >= 1 (0 only with 'echo')", param="max_tokens", code="invalid_value")
    if stream and (echo or len(prompts) > 1):
        raise APIError(400, "'stream' takes one prompt without 'echo'", param="stream", code="invalid_value")
    jobs = []
    for ids in prompts:
        if not ids:
            raise APIError(400, "the prompt is empty", param=field_, code="invalid_value")
        if len(ids) > e.max_prompt_tokens:
            raise APIError(400, f"this model's maximum prompt length is {e.max_prompt_tokens} tokens, the prompt has {len(ids)}",
                           param=field_, code="context_length_exceeded")
        p = params
        # a model that does not say: a bound all the same
        context = e.context_length or max(DEFAULT_MAX_PROMPT_TOKENS, e.max_prompt_tokens + DEFAULT_MAX_TOKENS)
        room = context - len(ids)
        if p.max_tokens > room:  # capped by the context
            if room < 1 and not echo:
                raise APIError(400, f"the prompt fills this model's context of {context} tokens: no room to generate",
                               param=field_, code="context_length_exceeded")
            p = Params(**{**vars(params), "max_tokens": max(room, 0)})
        jobs.append(Job(prompt=ids, adapter=adapter, params=p, score=echo and p.logprobs))
    return Request(jobs, adapter, params, stop, echo, stream, include_usage)


def parse_body(raw: bytes) -> dict:
    """A request body as a JSON object: strict JSON (no NaN or Infinity), nesting within
    Python's limits, text that is valid Unicode (no lone surrogates)."""

    def no_constant(name):
        raise ValueError(f"{name} is not JSON")

    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=no_constant)
        json.dumps(body, ensure_ascii=False).encode("utf-8")  # lone surrogates fail here
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as e:
        raise APIError(400, f"request body is not valid JSON: {e}"[:300], code="invalid_json") from None
    except UnicodeEncodeError:
        raise APIError(400, "request body holds text that is not valid Unicode (a lone surrogate)", code="invalid_json") from None
    except RecursionError:
        raise APIError(400, "request body is nested too deeply", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    return body
