"""pi0.5's PaliGemma prompt: the task text and the discretized state, tokenized with sentencepiece.

    "Task: <cleaned prompt>, State: <s_0> <s_1> ... <s_n>;\nAction: "   (BOS prepended, no EOS)

cleaned prompt = prompt.strip() with "_" and "\n" replaced by spaces (openpi's PaligemmaTokenizer, pi05 format);
s_i = the normalized state's bin among 256 equal bins over [-1, 1] (values below -1 give -1, above 1 give 255).
Tokens are right-padded with 0 to max_token_len; longer prompts are truncated with a warning, like upstream.

Which sentencepiece model: `--tokenizer PATH` when given, else the checkpoint's own `<checkpoint>/tokenizer.model`
(the random-weight demo checkpoint carries one, `checkpoints.demo_tokenizer`), else openpi's cached
paligemma_tokenizer.model; `find_tokenizer` is that lookup, used by every command.
"""

from __future__ import annotations

import logging
import os
import pathlib

import numpy as np

STATE_BINS = 256
CHECKPOINT_TOKENIZER = "tokenizer.model"  # a checkpoint's own tokenizer, next to params/ and assets/
log = logging.getLogger(__name__)


class TokenizerError(ValueError):
    """The sentencepiece model is missing, unreadable, or does not fit the model's vocabulary."""


def default_tokenizer_paths() -> list[pathlib.Path]:
    """Where openpi caches paligemma_tokenizer.model; `--tokenizer` may be left out when one of these exists."""
    roots = [os.environ.get("OPENPI_DATA_HOME"), pathlib.Path.home() / ".cache" / "openpi"]
    return [pathlib.Path(r).expanduser() / "big_vision" / "paligemma_tokenizer.model" for r in roots if r]


def tokenizer_search_paths(checkpoint: str | os.PathLike | None) -> list[pathlib.Path]:
    """Where a tokenizer is looked for when none is given, in order: the checkpoint's own, then openpi's caches."""
    own = [pathlib.Path(checkpoint).expanduser() / CHECKPOINT_TOKENIZER] if checkpoint is not None else []
    return own + default_tokenizer_paths()


def find_tokenizer(tokenizer: str | os.PathLike | None, checkpoint: str | os.PathLike | None) -> pathlib.Path:
    """The sentencepiece model to use: `tokenizer` (`--tokenizer`) when given, else the first file of
    `tokenizer_search_paths(checkpoint)`; TokenizerError naming every path looked at when there is none."""
    if tokenizer is not None:
        path = pathlib.Path(tokenizer).expanduser()
        if not path.is_file():
            raise TokenizerError(f"tokenizer file {str(path)!r} does not exist")
        return path
    paths = tokenizer_search_paths(checkpoint)
    for path in paths:
        if path.is_file():
            return path
    where = ", ".join(str(p) for p in paths)
    raise TokenizerError(f"no --tokenizer given and none found; looked at {where}; pass --tokenizer "
                         f"PATH/paligemma_tokenizer.model")


def discretize_state(state: np.ndarray) -> np.ndarray:
    """Bin index in [-1, 255] of each (normalized) state value: the bins' left edges are linspace(-1, 1, 257)[:-1]
    and a value on an edge belongs to the bin it opens."""
    edges = np.linspace(-1.0, 1.0, STATE_BINS + 1)[:-1]
    return np.searchsorted(edges, np.asarray(state), side="right").astype(np.int64) - 1


def clean_prompt(prompt: str) -> str:
    return prompt.strip().replace("_", " ").replace("\n", " ")


def format_prompt(prompt: str, state: np.ndarray) -> str:
    bins = " ".join(str(int(b)) for b in discretize_state(state))
    return f"Task: {clean_prompt(prompt)}, State: {bins};\nAction: "


class PromptTokenizer:
    """Tokenizes pi0.5 prompts to fixed-length (tokens int32 [max_len], mask bool [max_len])."""

    def __init__(self, model_path: str | os.PathLike | None, max_len: int, *, vocab_size: int | None = None):
        import sentencepiece

        path = find_tokenizer(model_path, None)
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_proto=path.read_bytes())
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"tokenizer {str(path)!r} is not a sentencepiece model ({e})") from e
        if vocab_size is not None and self._sp.get_piece_size() > vocab_size:
            raise TokenizerError(f"tokenizer {str(path)!r} has {self._sp.get_piece_size()} pieces but the model's "
                                 f"vocabulary has {vocab_size}: wrong tokenizer for this checkpoint")
        if max_len < 1:
            raise TokenizerError(f"max_len must be >= 1, got {max_len}")
        self.path = path
        self.max_len = max_len

    @property
    def vocab_size(self) -> int:
        return int(self._sp.get_piece_size())

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        return list(self._sp.encode(text, add_bos=add_bos))

    def decode(self, ids) -> str:
        """The text of token ids (padding and BOS / EOS dropped)."""
        return self._sp.decode([int(i) for i in ids if int(i) not in (self._sp.pad_id(), self._sp.bos_id(),
                                                                         self._sp.eos_id())])

    def tokenize(self, prompt: str, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids = self.encode(format_prompt(prompt, state), add_bos=True)
        if len(ids) > self.max_len:
            log.warning("prompt is %d tokens, more than max_token_len %d: truncating (the end of the state and "
                        "'Action: ' are cut; shorten the prompt)", len(ids), self.max_len)
            ids = ids[: self.max_len]
        tokens = np.zeros(self.max_len, np.int32)
        tokens[: len(ids)] = ids
        mask = np.arange(self.max_len) < len(ids)
        return tokens, mask
