"""The checkpoint's SentencePiece tokenizer (`tokenizer.model`, a LlamaTokenizer model in the released Yuan files).

Used as the official examples use it: no BOS or EOS added, `<eod>` ends a document. Special tokens (`<eod>`,
`<sep>`, `<pad>`) in the text are matched first and never split, like HF added tokens; each piece of text between
them is encoded by SentencePiece on its own. A special token's id is the SentencePiece model's own piece when it has
one, else the id config.json gives (eod_token, sep_token, pad_token_id). The built-in corpus stays byte-level
(moe_runtime/data.py); this is for checkpoints.
"""

from __future__ import annotations

import re
from pathlib import Path

import sentencepiece as spm

from moe_runtime.checkpoint.hf_config import CheckpointError, SpecialTokens

TOKENIZER_FILE = "tokenizer.model"
EOD, SEP, PAD = "<eod>", "<sep>", "<pad>"


class SentencePieceTokenizer:
    def __init__(self, model_file: str | Path, tokens: SpecialTokens | None = None):
        path = Path(model_file)
        if not path.exists():
            raise CheckpointError(f"{path}: tokenizer model missing")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as err:
            raise CheckpointError(f"{path}: not a SentencePiece model: {err}") from None
        self.path = path
        fallback = {EOD: tokens.eod, SEP: tokens.sep, PAD: tokens.pad} if tokens else {}
        self.special: dict[str, int] = {}
        for piece in (EOD, SEP, PAD):
            own = self.sp.piece_to_id(piece)
            if self.sp.id_to_piece(own) == piece:
                self.special[piece] = own
            elif piece in fallback:
                self.special[piece] = fallback[piece]
        self._by_id = {i: p for p, i in self.special.items()}
        pattern = "|".join(re.escape(p) for p in sorted(self.special, key=len, reverse=True))
        self._split = re.compile(f"({pattern})") if pattern else None

    @property
    def vocab_size(self) -> int:
        """Pieces of the SentencePiece model (the model's embedding may have more rows: padding)."""
        return self.sp.get_piece_size()

    @property
    def eod_id(self) -> int | None:
        return self.special.get(EOD)

    @property
    def sep_id(self) -> int | None:
        return self.special.get(SEP)

    @property
    def pad_id(self) -> int | None:
        return self.special.get(PAD)

    def encode(self, text: str) -> list[int]:
        parts = self._split.split(text) if self._split else [text]
        ids: list[int] = []
        for part in parts:
            if part in self.special:
                ids.append(self.special[part])
            elif part:
                ids += self.sp.encode(part, out_type=int)
        return ids

    def decode(self, ids: list[int]) -> str:
        """Text of ids; special tokens come out as their strings, ids past the SentencePiece vocabulary as U+FFFD."""
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            i = int(i)
            if i in self._by_id or not 0 <= i < self.vocab_size:
                if run:
                    out.append(self.sp.decode(run))
                    run = []
                out.append(self._by_id.get(i, "\ufffd"))
            else:
                run.append(i)
        if run:
            out.append(self.sp.decode(run))
        return "".join(out)


def load_tokenizer(directory: str | Path, tokens: SpecialTokens | None = None) -> SentencePieceTokenizer | None:
    """The tokenizer of a checkpoint directory, or None when it has no tokenizer.model."""
    path = Path(directory) / TOKENIZER_FILE
    return SentencePieceTokenizer(path, tokens) if path.exists() else None
