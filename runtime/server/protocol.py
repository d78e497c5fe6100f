"""The OpenAI wire format `r1c serve` speaks: request models (pydantic), their sampling parameters, and the
JSON of responses, stream chunks and errors.

Follows the OpenAI API reference for `/v1/completions` and `/v1/chat/completions` (one prompt, n = 1), with the
extensions vLLM also accepts (top_k, min_p, repetition_penalty, stop_token_ids, ignore_eos); each choice also
carries `token_ids`, the generated ids (an extension: without a tokenizer they are the only output). JSON is
written compact with sorted keys, the way nlohmann::json writes it, so the C++ example's bytes match.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from r1c.errors import RuntimeInputError
from r1c.runtime.serving import RequestOutput, SamplingParams, TokenEvent


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True, ensure_ascii=False)


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    user: str | None = None

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))

    def check_common(self) -> None:
        if self.n != 1:
            raise RuntimeInputError("n must be 1 (one choice per request)")

    def sampling(self, max_tokens: int | None, logprobs: int | None, default_max: int) -> SamplingParams:
        return SamplingParams.make(
            max_tokens=max_tokens if max_tokens is not None else default_max, temperature=self.temperature,
            top_p=self.top_p, top_k=self.top_k, min_p=self.min_p, repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty, seed=self.seed,
            stop=self.stop, stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos, logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens)


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None
    logit_bias: dict[str, float] | None = None

    def prompt_value(self) -> str | list[int]:
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise RuntimeInputError("send one prompt per request (a string or one list of token ids)")
            p = p[0]
        if isinstance(p, list) and not p:
            raise RuntimeInputError("the prompt is empty (it needs at least one token)")
        return p  # type: ignore[return-value]

    def params(self) -> SamplingParams:
        self.check_common()
        if self.echo:
            raise RuntimeInputError("echo is not supported")
        if self.best_of not in (None, 1):
            raise RuntimeInputError("best_of must be 1")
        if self.suffix:
            raise RuntimeInputError("suffix is not supported")
        if self.logit_bias:
            raise RuntimeInputError("logit_bias is not supported")
        return self.sampling(self.max_tokens, self.logprobs, 16)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None

    def as_dict(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if any(part.get("type") != "text" for part in content):
                raise RuntimeInputError("only text message content is supported")
            content = "".join(str(part.get("text", "")) for part in content)
        return {**(self.model_extra or {}), "role": self.role, "content": content or ""}


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None

    def params(self, default_max: int) -> SamplingParams:
        self.check_common()
        n = (self.top_logprobs or 0) if self.logprobs else None
        return self.sampling(self.max_completion_tokens or self.max_tokens, n, default_max)


class Formatter:
    """Builds one request's response JSON (whole or as stream chunks) from its events."""

    def __init__(self, kind: Literal["completion", "chat"], model: str, token_str: Any) -> None:
        self.kind = kind
        self.model = model
        self.id = ("cmpl-" if kind == "completion" else "chatcmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.token_str = token_str  # id -> the token's text for logprobs
        self.offset = 0  # text offset for completions logprobs

    def _head(self, chunk: bool) -> dict[str, Any]:
        obj = "text_completion" if self.kind == "completion" else (
            "chat.completion.chunk" if chunk else "chat.completion")
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _logprobs(self, ids: list[int], lps: list[float] | None, tops: list[list[tuple[int, float]]] | None,
                  texts: list[str]) -> dict[str, Any] | None:
        if lps is None:
            return None
        if self.kind == "completion":
            offsets = []
            for t in texts:
                offsets.append(self.offset)
                self.offset += len(t)
            return {"tokens": [self.token_str(i) for i in ids], "token_logprobs": lps,
                    "top_logprobs": None if tops is None else [{self.token_str(i): v for i, v in top}
                                                               for top in tops],
                    "text_offset": offsets}
        content = []
        for k, (i, v) in enumerate(zip(ids, lps)):
            s = self.token_str(i)
            top = tops[k] if tops is not None else []
            content.append({"token": s, "logprob": v, "bytes": list(s.encode()),
                            "top_logprobs": [{"token": self.token_str(j), "logprob": w,
                                              "bytes": list(self.token_str(j).encode())} for j, w in top]})
        return {"content": content}

    def chunk(self, ev: TokenEvent, first: bool) -> dict[str, Any]:
        """One stream chunk for one token event (a cancelled request's final event has token_id -1)."""
        ids = [ev.token_id] if ev.token_id >= 0 else []
        lp = None
        if ev.logprob is not None and ids:
            tops = [ev.top_logprobs] if ev.top_logprobs is not None else None
            lp = self._logprobs(ids, [ev.logprob], tops, [ev.text])
        choice: dict[str, Any] = {"index": 0, "finish_reason": ev.finish_reason, "logprobs": lp, "token_ids": ids}
        if self.kind == "completion":
            choice["text"] = ev.text
        else:
            choice["delta"] = {"content": ev.text, **({"role": "assistant"} if first else {})}
        return {**self._head(True), "choices": [choice]}

    def usage_chunk(self, out: RequestOutput) -> dict[str, Any]:
        return {**self._head(True), "choices": [], "usage": usage(out)}

    def whole(self, out: RequestOutput, texts: list[str]) -> dict[str, Any]:
        lp = self._logprobs(out.token_ids, out.logprobs, out.top_logprobs, texts)
        choice: dict[str, Any] = {"index": 0, "finish_reason": out.finish_reason, "logprobs": lp,
                                  "token_ids": out.token_ids}
        if self.kind == "completion":
            choice["text"] = out.text
        else:
            choice["message"] = {"role": "assistant", "content": out.text}
        return {**self._head(False), "choices": [choice], "usage": usage(out)}


def usage(out: RequestOutput) -> dict[str, int]:
    n, m = len(out.prompt_ids), len(out.token_ids)
    return {"prompt_tokens": n, "completion_tokens": m, "total_tokens": n + m}
