"""Tokenizer built from a model's own vocabulary (a GGUF file's, or a Hugging Face
folder's tokenizer.json): byte-level BPE, as llama.cpp runs it.

The GGUF stores the token strings, the merge list, the token types and the special
token ids. For the ``gpt2`` tokenizer model with the ``smollm`` (and default GPT-2)
pre-tokenizer, llama.cpp splits digits one by one, then applies the GPT-2 regex and
byte-level BPE; HF ``tokenizers`` with the same pieces gives the same ids.
"""

import json
import os
import re
from dataclasses import dataclass
from functools import partial

from qlora_np.errors import CheckpointError, UnknownFormatError
from qlora_np.io.gguf import field_value
from qlora_np.io.safetensors import atomic_path, atomic_write, read_json

CONTROL_TOKEN_TYPE = 3
SUPPORTED_PRE_TOKENIZERS = ("smollm", "gpt2", "default")
END_MARKERS = ("<|endoftext|>", "<|im_end|>", "<|end|>", "<|eot_id|>", "<end_of_turn>", "<reponame>",
               "<|fim_repo|>")
"""Control tokens llama.cpp also ends generation at, the FIM repo-name marker included
(SmolLM2: ids 0, 2 and 4)."""


@dataclass
class ChatTemplate:
    """ChatML, as SmolLM2-Instruct's template renders it: a default system turn first
    unless the conversation has one (``default_system=None``: none is added)."""

    default_system: str = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

    @classmethod
    def from_source(cls, source):
        """The template a model records (its Jinja text; None when it records none) as
        this class renders it: ChatML with the default system turn the source writes.
        A template of another kind gives an :class:`UnsupportedChatTemplate`."""
        if source is None:
            return cls()
        if "<|im_start|>" not in source:
            return UnsupportedChatTemplate()
        default = re.search(r"<\|im_start\|>system(?:\n|\\n)(.*?)<\|im_end\|>", source)
        return cls(default.group(1) if default else None)

    def render(self, messages, add_generation_prompt=True):
        """Text for a list of {"role", "content"} dicts."""
        messages = self._with_system(messages)
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")

    def pieces(self, messages):
        """The rendered conversation as (text, is_reply) pieces, in order.

        Joined, the texts are ``render(messages, add_generation_prompt=False)``; a reply
        piece is an assistant turn's content with its end marker (what a model learns to
        write), and each prompt piece before a reply ends exactly as the generation
        prompt does, so training sees the same tokens as generation.
        """
        rendered = []
        for message in self._with_system(messages):
            header = f"<|im_start|>{message['role']}\n"
            if message["role"] == "assistant":
                rendered += [(header, False), (f"{message['content']}<|im_end|>", True), ("\n", False)]
            else:
                rendered.append((f"{header}{message['content']}<|im_end|>\n", False))
        merged = []                                  # join neighbouring prompt pieces
        for text, is_reply in rendered:
            if merged and not is_reply and not merged[-1][1]:
                merged[-1] = (merged[-1][0] + text, False)
            else:
                merged.append((text, is_reply))
        return merged

    def _with_system(self, messages):
        if self.default_system is not None and (not messages or messages[0]["role"] != "system"):
            return [{"role": "system", "content": self.default_system}] + list(messages)
        return list(messages)


class UnsupportedChatTemplate:
    """Stands for a model's chat template that is not ChatML: rendering chat raises a
    clear error, where rendering ChatML anyway would train and prompt the model wrongly."""

    def render(self, messages, add_generation_prompt=True):
        raise UnknownFormatError("this model's chat template is not ChatML (<|im_start|> … <|im_end|>), "
                                 "the only one qlora_np renders: use text or prompt/completion records, "
                                 "and prompts without --chat")

    pieces = render


class Tokenizer:
    """Text ↔ token ids with a model's own vocabulary; special tokens are parsed in text.

    Built from a GGUF file's tokenizer keys (:meth:`from_gguf`) or from a Hugging Face
    folder's ``tokenizer.json`` (:meth:`from_hf_folder`); either way HF ``tokenizers``
    runs the byte-level BPE.
    """

    def __init__(self, hf_tokenizer, special_tokens, bos_id, eos_id, end_ids, add_bos=False,
                 chat_template_text=None):
        self._hf = hf_tokenizer
        self.special_tokens = list(special_tokens)
        self.vocab_size = hf_tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.eos_id = bos_id, eos_id
        self.end_ids = frozenset(end_ids)
        self.add_bos = add_bos
        self.chat_template_text = chat_template_text          # the model's own (Jinja) template, if any
        self.chat_template = ChatTemplate.from_source(chat_template_text)

    @classmethod
    def from_pieces(cls, tokens, merges, token_types, bos_id, eos_id, end_ids, add_bos=False, pre="smollm",
                    chat_template_text=None):
        """From a vocabulary (token strings in id order), its merge list ("a b" strings) and
        token types (CONTROL_TOKEN_TYPE marks the special tokens), as a GGUF stores them."""
        from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

        if pre not in SUPPORTED_PRE_TOKENIZERS:
            raise UnknownFormatError(f"tokenizer pre-tokenizer must be one of {SUPPORTED_PRE_TOKENIZERS}, "
                                     f"got {pre!r}")
        vocab = {token: index for index, token in enumerate(tokens)}
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges]))
        pieces = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        if pre == "smollm":
            pieces.insert(0, pre_tokenizers.Digits(individual_digits=True))
        hf.pre_tokenizer = pre_tokenizers.Sequence(pieces)
        hf.decoder = decoders.ByteLevel()
        special = [t for t, kind in zip(tokens, token_types) if kind == CONTROL_TOKEN_TYPE]
        hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
        return cls(hf, special, bos_id, eos_id, end_ids, add_bos, chat_template_text)

    @classmethod
    def from_gguf(cls, reader):
        """Build from a ``gguf.GGUFReader`` (tokenizer.ggml.* keys)."""
        value = partial(field_value, reader)

        model = value("tokenizer.ggml.model")
        if model != "gpt2":
            raise UnknownFormatError("only byte-level BPE ('gpt2') GGUF tokenizers are supported, "
                                     f"got {model!r}")
        eos = value("tokenizer.ggml.eos_token_id")
        end_ids = {eos, value("tokenizer.ggml.eot_token_id", eos), value("tokenizer.ggml.eom_token_id", eos)}
        tokens = value("tokenizer.ggml.tokens")
        end_ids |= {i for i, t in enumerate(tokens[:64]) if t in END_MARKERS}
        return cls.from_pieces(tokens, value("tokenizer.ggml.merges"), value("tokenizer.ggml.token_type"),
                               value("tokenizer.ggml.bos_token_id"), eos, end_ids,
                               add_bos=bool(value("tokenizer.ggml.add_bos_token", False)),
                               pre=value("tokenizer.ggml.pre", "default"),
                               chat_template_text=value("tokenizer.chat_template"))

    @classmethod
    def from_hf_folder(cls, folder):
        """Build from a Hugging Face model folder: ``tokenizer.json``, and the special tokens
        named in ``tokenizer_config.json`` / ``generation_config.json`` when present.
        Returns None for a folder without ``tokenizer.json``."""
        from tokenizers import Tokenizer as HFTokenizer

        path = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(path):
            return None
        try:
            hf = HFTokenizer.from_file(path)
        except Exception as error:              # the Rust parser raises plain Exceptions
            raise CheckpointError(f"{path}: not a tokenizer.json that HF tokenizers reads "
                                  f"({error})") from None
        special = {token.content: index for index, token in hf.get_added_tokens_decoder().items()
                   if token.special}
        settings = _json_object(os.path.join(folder, "tokenizer_config.json"))
        generation = _json_object(os.path.join(folder, "generation_config.json"))

        def token_id(name, fallback):
            token = settings.get(name)
            token = token.get("content") if isinstance(token, dict) else token
            return hf.token_to_id(token) if isinstance(token, str) and hf.token_to_id(token) is not None \
                else fallback

        markers = [special[t] for t in END_MARKERS if t in special]
        eos = token_id("eos_token", markers[0] if markers else None)
        if eos is None:
            raise CheckpointError(f"{folder}: no end-of-text token (eos_token in tokenizer_config.json)")
        extra = generation.get("eos_token_id")
        extra = extra if isinstance(extra, list) else [extra]
        end_ids = {eos, *markers, *(i for i in extra if type(i) is int and 0 <= i < hf.get_vocab_size())}
        return cls(hf, sorted(special, key=special.get), token_id("bos_token", eos), eos, end_ids,
                   add_bos=settings.get("add_bos_token") is True,
                   chat_template_text=_template_text(settings.get("chat_template"), folder))

    def encode(self, text, add_bos=None):
        """Token ids of ``text``; special tokens written in the text become their ids."""
        ids = self._hf.encode(text, add_special_tokens=False).ids
        if self.add_bos if add_bos is None else add_bos:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids, skip_special=False):
        return self._hf.decode(list(ids), skip_special_tokens=skip_special)

    def token_text(self, token_id):
        """The text one token adds when appended (for streaming)."""
        return self._hf.decode([token_id], skip_special_tokens=False)

    def save_hf(self, folder):
        """Write tokenizer.json and tokenizer_config.json as a Hugging Face model folder has them
        (transformers' AutoTokenizer and :meth:`from_hf_folder` read them back)."""
        os.makedirs(folder, exist_ok=True)
        with atomic_path(os.path.join(folder, "tokenizer.json")) as temporary:
            self._hf.save(temporary)
        settings = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": self.token_text(self.bos_id),
                    "eos_token": self.token_text(self.eos_id), "add_bos_token": self.add_bos,
                    "clean_up_tokenization_spaces": False}
        if self.chat_template_text is not None:
            settings["chat_template"] = self.chat_template_text
        with atomic_write(os.path.join(folder, "tokenizer_config.json"), "w") as stream:
            json.dump(settings, stream, indent=2)

    def apply_chat_template(self, messages, add_generation_prompt=True):
        return self.chat_template.render(messages, add_generation_prompt)



def _template_text(value, folder):
    """A Hugging Face folder's chat template: tokenizer_config.json's chat_template (its text,
    or the "default" one of a list of named templates), else the chat_template.jinja file
    newer transformers write beside it; None when there is neither."""
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default", next(iter(named.values()), None))
    if isinstance(value, str):
        return value
    path = os.path.join(folder, "chat_template.jinja")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as stream:
            return stream.read()
    except (OSError, UnicodeDecodeError) as error:
        raise CheckpointError(f"cannot read {path}: {error}") from None


def _json_object(path):
    """A JSON file's object, {} when the file is missing; CheckpointError when it is not an object."""
    if not os.path.isfile(path):
        return {}
    value = read_json(path)
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: must hold a JSON object")
    return value
