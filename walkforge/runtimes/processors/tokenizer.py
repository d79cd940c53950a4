"""The bundle's tokenizer (policy/tokenizer/): `tokenizers` for tokenizer.json (what transformers'
AutoTokenizer loads first), else SentencePiece for tokenizer.model. Raw text → ids without
special tokens; the BOS id is looked up so the prompt step adds it itself."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from walkforge.errors import WalkforgeError

BOS_PIECE = "<bos>"  # Gemma's BOS


@dataclass(frozen=True)
class TextTokenizer:
    """`encode(text) -> ids` (no special tokens) and the BOS id."""

    encode: Callable[[str], list[int]]
    bos_id: int
    file: str


def load_tokenizer(folder: Path, files: list[str]) -> TextTokenizer:
    """The tokenizer of `folder` holding `files` (the policy entry's list)."""
    try:
        if "tokenizer.json" in files:
            return _fast(Path(folder) / "tokenizer.json")
        if "tokenizer.model" in files:
            return _sentencepiece(Path(folder) / "tokenizer.model")
    except ImportError as exc:
        raise WalkforgeError(f"text tasks need {exc.name} (pip install 'walkforge[text]')") from None
    raise WalkforgeError(f"{folder}: the policy tokenizer lists neither tokenizer.json nor tokenizer.model")


def _fast(path: Path) -> TextTokenizer:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    bos = tok.token_to_id(BOS_PIECE)
    if bos is None:
        raise WalkforgeError(f"{path}: has no {BOS_PIECE} token")
    return TextTokenizer(lambda text: tok.encode(text, add_special_tokens=False).ids, int(bos), str(path))


def _sentencepiece(path: Path) -> TextTokenizer:
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    bos = sp.bos_id()
    if bos < 0:
        raise WalkforgeError(f"{path}: has no BOS piece")
    return TextTokenizer(lambda text: list(sp.encode(text)), int(bos), str(path))
