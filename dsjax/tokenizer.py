"""Tokenizers: a byte-level one that needs no files, and Hugging Face `tokenizer.json`;
chat templates, rendered as transformers' `apply_chat_template` renders them; and the
writing of either tokenizer as a Hugging Face tokenizer folder (`save_tokenizer`).

A chat template is Jinja from `tokenizer_config.json` (`chat_template`) or
`chat_template.jinja`, run in jinja2's immutable sandbox with the globals and filters
transformers gives it (`raise_exception`, `strftime_now`, a non-escaping `tojson`, the
loop controls, the `{% generation %}` block) and the same variables: `messages`,
`add_generation_prompt`, `tools` and `documents` (None) and the special tokens
(`bos_token`, `eos_token`, ...). DeepSeek-V3's renders
`<｜begin▁of▁sentence｜>{system}<｜User｜>{user}<｜Assistant｜>{reply}<｜end▁of▁sentence｜>...`.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from typing import Any

import numpy as np

# The special tokens' text in exported byte tokenizers (DeepSeek's own, so templates written
# for DeepSeek find them).
BOS_TOKEN, EOS_TOKEN = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
# tokenizer_config.json keys of the special tokens transformers passes to chat templates.
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class ByteTokenizer:
    """UTF-8 bytes shifted past the special ids: bos=0, eos=1, byte b -> b + 2."""

    bos_id, eos_id, offset = 0, 1, 2
    vocab_size = 258
    name = "bytes"
    chat_template = None

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32) + self.offset

    def decode(self, ids) -> str:
        data = bytes(int(i) - self.offset for i in ids if int(i) >= self.offset and int(i) < 256 + self.offset)
        return data.decode("utf-8", errors="replace")

    def hf_tokenizer(self):
        """The same ids as a `tokenizers.Tokenizer`: the ByteLevel normalizer maps each byte
        to one of 256 printable characters, and a BPE without merges maps each character to
        its byte's id. BOS and EOS are vocabulary entries, not added tokens, so no text
        (not even their own) encodes to them."""
        from tokenizers import Tokenizer, decoders, models, normalizers

        vocab = {BOS_TOKEN: self.bos_id, EOS_TOKEN: self.eos_id}
        vocab.update({char: b + self.offset for b, char in enumerate(_byte_chars())})
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tok.normalizer = normalizers.ByteLevel()
        tok.decoder = decoders.ByteLevel()
        return tok


@functools.lru_cache(maxsize=1)
def _byte_chars() -> tuple[str, ...]:
    """GPT-2's printable character for each byte 0..255 (what the ByteLevel normalizer maps to)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return tuple(chars[b] for b in range(256))


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {'content': ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


class HFTokenizer:
    """A Hugging Face `tokenizer.json` (e.g. DeepSeek's) through the `tokenizers` package,
    with the `tokenizer_config.json` (special tokens, chat template) of its folder.

    Attributes:
      chat_template: the Jinja chat template, or None.
      special_tokens: {'bos_token': text, 'eos_token': text, ...} as templates see them.
      config: the folder's tokenizer_config.json ({} without one).
    """

    def __init__(self, path: str, bos_token: str | None = None, eos_token: str | None = None):
        from tokenizers import Tokenizer

        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"tokenizer file {path} does not exist")
        try:
            self._tok = Tokenizer.from_file(path)
        except Exception as e:  # the tokenizers library raises a bare Exception on bad files
            raise ValueError(f"{path} is not a Hugging Face tokenizer.json ({str(e).splitlines()[0]})") from None
        self.name = self.path = path
        folder = os.path.dirname(path)
        self.config = _read_json(os.path.join(folder, "tokenizer_config.json"))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        vocab = self._tok.get_vocab(with_added_tokens=True)

        def find(explicit, candidates):
            for c in ([explicit] if explicit else []) + candidates:
                if c in vocab:
                    return vocab[c]
            return None

        self.bos_id = find(bos_token or _token_text(self.config.get("bos_token")),
                           ["<｜begin▁of▁sentence｜>", "<s>", "<|begin_of_text|>", "<bos>"])
        self.eos_id = find(eos_token or _token_text(self.config.get("eos_token")),
                           ["<｜end▁of▁sentence｜>", "</s>", "<|end_of_text|>", "<eos>", "<|endoftext|>"])
        self.special_tokens = {k: t for k in _SPECIAL_KEYS if (t := _token_text(self.config.get(k)))}
        for key, i in (("bos_token", self.bos_id), ("eos_token", self.eos_id)):
            if i is not None:
                self.special_tokens[key] = self._tok.id_to_token(i)
        self.chat_template = _read_chat_template(folder, self.config)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def decode(self, ids) -> str:
        ends = (self.bos_id, self.eos_id)
        return self._tok.decode([int(i) for i in ids if int(i) not in ends], skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The conversation as text, rendered by this tokenizer's chat template.

        Args:
          messages: [{'role': ..., 'content': ...}, ...].
          add_generation_prompt: end with what opens the assistant's reply.
        Raises ValueError where there is no template or the template refuses the messages.
        """
        if not self.chat_template:
            raise ValueError(f"{self.path} has no chat template (tokenizer_config.json chat_template)")
        return render_chat(self.chat_template, messages, add_generation_prompt, **self.special_tokens)


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            out = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(out, dict):
        raise ValueError(f"{path} is not a JSON object")
    return out


def _read_chat_template(folder: str, config: dict) -> str | None:
    """The folder's chat template: chat_template.jinja, else tokenizer_config.json's
    `chat_template` (a string, or a list of {name, template} whose 'default' is taken)."""
    jinja = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            return f.read()
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    """The template compiled in the environment transformers renders chat templates in."""
    from datetime import datetime

    try:
        import jinja2
        from jinja2.ext import Extension, loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ValueError("chat templates need the jinja2 package (pip install jinja2)") from None

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}` (transformers' assistant-span marker)
        renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ValueError(f"the chat template is not valid Jinja (line {e.lineno}: {e.message})") from None


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool = False, **special: Any) -> str:
    """Renders `messages` with a chat template as transformers' `apply_chat_template(...,
    tokenize=False)` does: keys whose value is None are dropped, a message's reasoning
    is offered as `reasoning_content` and `thinking` alike, and the template sees the
    special tokens (`bos_token=...`) besides `messages`, `add_generation_prompt`, `tools`
    and `documents`. Raises ValueError with the template's own message where it refuses
    the messages (`raise_exception`)."""
    compiled = _compile(template)
    import jinja2

    chat = []
    for m in messages:
        if not isinstance(m, dict):
            raise ValueError(f"a chat message must be an object with 'role' and 'content', got {m!r}")
        m = {k: v for k, v in m.items() if v is not None}
        reasoning = next((m[k] for k in ("reasoning_content", "thinking", "reasoning") if k in m), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        chat.append(m)
    try:
        return compiled.render(messages=chat, tools=None, documents=None,
                               add_generation_prompt=add_generation_prompt, **special)
    except jinja2.exceptions.TemplateError as e:
        raise ValueError(f"the chat template refused the conversation: {e.message or e}") from None


def save_tokenizer(tokenizer, out_dir: str) -> list[str]:
    """Writes `tokenizer` as transformers' AutoTokenizer reads it: tokenizer.json and
    tokenizer_config.json (special tokens, chat template). Token ids equal dsjax's
    `encode` for any text (called with add_special_tokens=False for a tokenizer whose
    config adds a BOS, as DeepSeek's does; the byte tokenizer's adds nothing).

    Args:
      tokenizer: 'bytes', a tokenizer.json or its folder, or a tokenizer of this module.
      out_dir: created if needed.
    Returns the names of the files written.
    """
    if isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer)
    os.makedirs(out_dir, exist_ok=True)
    if isinstance(tokenizer, ByteTokenizer):
        tokenizer.hf_tokenizer().save(os.path.join(out_dir, "tokenizer.json"))
        # split_special_tokens: text that spells BOS or EOS stays bytes, as ByteTokenizer has it.
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN,
                  "add_bos_token": False, "add_eos_token": False, "split_special_tokens": True,
                  "clean_up_tokenization_spaces": False}
    elif isinstance(tokenizer, HFTokenizer):
        shutil.copyfile(tokenizer.path, os.path.join(out_dir, "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **tokenizer.config}
        for key in ("bos_token", "eos_token"):
            if key in tokenizer.special_tokens and not _token_text(config.get(key)):
                config[key] = tokenizer.special_tokens[key]
        if tokenizer.chat_template:
            config["chat_template"] = tokenizer.chat_template
    else:
        raise ValueError(f"cannot write a tokenizer of type {type(tokenizer).__name__} "
                         "(dsjax.tokenizer.ByteTokenizer or HFTokenizer)")
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
    return ["tokenizer.json", "tokenizer_config.json"]


def load_tokenizer(spec: str):
    """'bytes' for the byte-level tokenizer, else a path to tokenizer.json (or its folder)."""
    return ByteTokenizer() if spec == "bytes" else HFTokenizer(spec)
