"""Text in and out: the checkpoint's tokenizer (`tokenizer.json` through the `tokenizers` library), its chat
template (`tokenizer_config.json` / `chat_template.jinja`, rendered with jinja2 the way transformers renders it),
incremental detokenization and stop strings.

The tokenizer files travel with the model: `r1c export` copies them from the checkpoint into the export and
`r1c build` from the export into the bundle (`tokenizer_files`, `copy_tokenizer_files`). A bundle without
`tokenizer.json` serves token ids only.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from r1c.errors import RuntimeInputError, require_extra

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja")


def tokenizer_files(src: Path | None) -> dict[str, str]:
    """The tokenizer files present in a checkpoint directory, name -> text (for `export_onnx(extra_files=...)`)."""
    if src is None or not Path(src).is_dir():
        return {}
    return {name: (Path(src) / name).read_text(encoding="utf-8") for name in TOKENIZER_FILES
            if (Path(src) / name).is_file()}


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer files of `src` (an export) into `dst` (a bundle being built); returns their names."""
    names = [name for name in TOKENIZER_FILES if (Path(src) / name).is_file()]
    for name in names:
        shutil.copyfile(Path(src) / name, Path(dst) / name)
    return names


def _token_text(value: Any) -> str | None:
    """A special token in tokenizer_config.json is a string or an AddedToken dict ({"content": ...})."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class TextCodec:
    """A bundle's tokenizer: encode, decode, incremental decode, chat template. `from_dir` returns None without one."""

    def __init__(self, tokenizer: Any, config: dict[str, Any], chat_template: str | None) -> None:
        self.tokenizer = tokenizer
        self.config = config
        self.chat_template = chat_template
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self._template: Any = None

    @classmethod
    def from_dir(cls, d: str | Path) -> TextCodec | None:
        d = Path(d)
        if not (d / "tokenizer.json").is_file():
            return None
        require_extra("serve", ("tokenizers", "jinja2"), f"the tokenizer in {d}")
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_file(str(d / "tokenizer.json"))
        except Exception as e:  # the tokenizers library raises its own exception type
            raise RuntimeInputError(f"tokenizer: cannot read {d / 'tokenizer.json'}: {e}") from None
        config: dict[str, Any] = {}
        if (d / "tokenizer_config.json").is_file():
            config = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if (d / "chat_template.jinja").is_file():
            template = (d / "chat_template.jinja").read_text(encoding="utf-8")
        return cls(tok, config, template if isinstance(template, str) else None)

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.get_vocab_size(with_added_tokens=True))

    @property
    def eos_token_id(self) -> int | None:
        return None if self.eos_token is None else self.tokenizer.token_to_id(self.eos_token)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def token_str(self, token_id: int) -> str:
        """The token's text as a logprobs entry shows it (its decoded text, special tokens included)."""
        return self.decode([token_id], skip_special_tokens=False)

    def stream(self, skip_special_tokens: bool = True) -> Any:
        """An incremental decoder: `.step(tokenizer, id) -> str | None` (tokenizers' DecodeStream)."""
        from tokenizers.decoders import DecodeStream

        return DecodeStream(skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """Render the chat template (jinja2 sandbox, as transformers renders it). Raises `RuntimeInputError` if the
        tokenizer has no template or the template rejects the messages."""
        if self.chat_template is None:
            raise RuntimeInputError("this model has no chat template (tokenizer_config.json has no chat_template)")
        import jinja2

        if self._template is None:
            self._template = _jinja_env().from_string(self.chat_template)
        special = {k: _token_text(v) for k, v in self.config.items() if k.endswith("_token")}
        try:
            return str(self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                             **{k: v for k, v in special.items() if v is not None}, **kwargs))
        except (jinja2.TemplateError, TemplateRaise) as e:
            raise RuntimeInputError(f"chat template: {e}") from None


class TemplateRaise(Exception):
    """`raise_exception(msg)` inside a chat template."""


def _jinja_env() -> Any:
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateRaise(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class TextStream:
    """One request's output text: incremental detokenization with stop strings held back and cut.

    `push(token_id)` returns the text that may be shown now and whether a stop string ended the output (the
    stop string itself is not part of the text, as in OpenAI's API). `flush()` returns what was held back.
    """

    def __init__(self, codec: TextCodec, stop: Sequence[str] = (), skip_special_tokens: bool = True) -> None:
        self.codec = codec
        self.stop = [s for s in stop if s]
        self._decoder = codec.stream(skip_special_tokens)
        self.text = ""  # all decoded text so far (cut at a stop string)
        self.sent = 0  # characters already returned
        self.stopped = False

    def push(self, token_id: int) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        piece = self._decoder.step(self.codec.tokenizer, int(token_id))
        if piece:
            start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0) + 1)
            self.text += piece
            cut = min((i for i in (self.text.find(s, start) for s in self.stop) if i >= 0), default=-1)
            if cut >= 0:
                self.text = self.text[:cut]
                self.stopped = True
                return self._take(len(self.text)), True
        return self._take(len(self.text) - self._held()), False

    def flush(self) -> str:
        return self._take(len(self.text))

    def _held(self) -> int:
        """Length of the longest end of the text that could still grow into a stop string."""
        held = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text) - self.sent), held, -1):
                if self.text.endswith(s[:k]):
                    held = k
                    break
        return held

    def _take(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        out = self.text[self.sent:upto]
        self.sent = upto
        return out
