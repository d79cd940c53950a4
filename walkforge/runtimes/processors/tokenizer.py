"""The bundle's tokenizer (policy/tokenizer/): `tokenizers` for tokenizer.json (what transformers'
AutoTokenizer loads first), else SentencePiece for tokenizer.model. Raw text → ids without
special tokens; the BOS id is looked up so the tokenize step adds it itself (None: the tokenizer
has none, as SmolVLM2's adds none)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from walkforge.errors import WalkforgeError

BOS_PIECE = "<bos>"  # Gemma's BOS


@dataclass(frozen=True)
class TextTokenizer:
    """`encode(text) -> ids` (no special tokens) and the BOS id (None: no BOS token)."""

    encode: Callable[[str], list[int]]
    bos_id: int | None
    file: str


def load_tokenizer(read: Callable[[str], bytes], folder: str, files: list[str]) -> TextTokenizer:
    """The tokenizer of bundle folder `folder` holding `files` (the policy entry's list), from
    the bytes `read(rel)` gives (Bundle.read_verified)."""
    try:
        if "tokenizer.json" in files:
            return _fast(read(f"{folder}/tokenizer.json"), f"{folder}/tokenizer.json")
        if "tokenizer.model" in files:
            return _sentencepiece(read(f"{folder}/tokenizer.model"), f"{folder}/tokenizer.model")
    except ImportError as exc:
        raise WalkforgeError(f"text tasks need {exc.name} (pip install 'walkforge[text]')") from None
    raise WalkforgeError(f"{folder}: the policy tokenizer lists neither tokenizer.json nor tokenizer.model")


def _fast(data: bytes, name: str) -> TextTokenizer:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(data.decode("utf-8"))
    bos = tok.token_to_id(BOS_PIECE)
    return TextTokenizer(lambda text: tok.encode(text, add_special_tokens=False).ids,
                         None if bos is None else int(bos), name)


def _sentencepiece(data: bytes, name: str) -> TextTokenizer:
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_proto=data)
    bos = sp.bos_id()
    return TextTokenizer(lambda text: list(sp.encode(text)), None if bos < 0 else int(bos), name)
