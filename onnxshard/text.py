"""Text in and out of a decoder: the Hugging Face ``tokenizers`` library over the model folder's ``tokenizer.json``,
the chat template of its ``tokenizer_config.json`` (Jinja, in a sandbox, as transformers renders it), and an
incremental detokenizer that streams text and ends on stop strings."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from onnxshard.errors import InputError, ModelError

TOKENIZER = "tokenizer.json"
CONFIG = "tokenizer_config.json"


@dataclass
class TextCodec:
    """A tokenizer with what its config says: special tokens and the chat template (``None`` when absent)."""

    tokenizer: object
    chat_template: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None

    @classmethod
    def find(cls, *folders: str | Path | None) -> TextCodec | None:
        """The codec of the first folder holding ``tokenizer.json``; ``None`` where none does (token ids only)."""
        for folder in folders:
            if folder is not None and (Path(folder) / TOKENIZER).is_file():
                return cls.load(folder)
        return None

    @classmethod
    def load(cls, folder: str | Path) -> TextCodec:
        from tokenizers import Tokenizer

        folder = Path(folder)
        try:
            tokenizer = Tokenizer.from_file(str(folder / TOKENIZER))
        except Exception as e:  # tokenizers raises its own Exception type
            raise ModelError(f"{folder / TOKENIZER} cannot be read by the tokenizers library: {e}") from None
        config = {}
        if (folder / CONFIG).is_file():
            try:
                config = json.loads((folder / CONFIG).read_text())
            except ValueError as e:
                raise ModelError(f"{folder / CONFIG} is not JSON: {e}") from None
        template = config.get("chat_template")
        if isinstance(template, list):  # several named templates: the default one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        return cls(tokenizer, template, _token_text(config.get("bos_token")), _token_text(config.get("eos_token")))

    @property
    def eos_token_id(self) -> int | None:
        return None if self.eos_token is None else self.tokenizer.token_to_id(self.eos_token)

    def encode(self, text: str, *, special: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=special).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def chat_prompt(self, messages: list[dict]) -> str:
        """The prompt text for chat ``messages`` (``[{"role": ..., "content": ...}]``) by the chat template,
        ending where the assistant's answer starts."""
        if self.chat_template is None:
            raise InputError("this model's tokenizer_config.json has no chat_template; use /v1/completions")
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            return env.from_string(self.chat_template).render(messages=messages, add_generation_prompt=True,
                                                              bos_token=self.bos_token or "",
                                                              eos_token=self.eos_token or "")
        except TemplateError as e:
            raise InputError(f"the chat template refused the messages: {e}") from None


def _token_text(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


class TextStream:
    """Turns tokens into text as they come. ``push(token)`` returns the new text that is safe to show: not a
    partial UTF-8 character, and not what might be the start of a stop string. ``stopped`` is set when a stop
    string appears; the text ends before it."""

    def __init__(self, codec: TextCodec, stop: list[str] = ()):
        self.codec, self.stop = codec, [s for s in stop if s]
        self.tokens: list[int] = []
        self.text = ""  # decoded so far (up to a stop string)
        self.sent = 0  # characters of it handed out
        self.stopped = False

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.tokens.append(token)
        text = self.codec.decode(self.tokens)
        if text.endswith("\ufffd"):  # a character split over tokens: wait for the rest
            return ""
        self.text = text
        for s in self.stop:
            at = text.find(s, max(0, self.sent - len(s)))
            if at >= 0:
                self.text, self.stopped = text[:at], True
        hold = 0 if self.stopped else max((_overlap(self.text, s) for s in self.stop), default=0)
        return self._take(len(self.text) - hold)

    def flush(self) -> str:
        """The rest of the text, at the end of the sequence."""
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        out, self.sent = self.text[self.sent:upto], upto
        return out


def _overlap(text: str, stop: str) -> int:
    """How many characters at the end of ``text`` are the start of ``stop``."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
