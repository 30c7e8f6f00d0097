"""A small sentencepiece tokenizer for random-weight checkpoints, trained here at build time.

openpi's `paligemma_tokenizer.model` (257152 pieces) cannot ship with a demo, and a random-weight checkpoint has
no tokenizer of its own, so `write_demo_tokenizer` trains one with sentencepiece's trainer on a corpus generated
here: robot-task instructions (verb, adjective, object, place, drawn with a fixed seed) in pi0.5's prompt format
(`pi05_jax.policy.prompt_tokenizer.format_prompt`, with discretized states), so prompts tokenize into a few dozen
pieces. Like PaliGemma's: BPE, byte fallback (any text encodes, and decodes back exactly), no normalization, and
the special ids pad 0, eos 1, bos 2, unk 3. Training is deterministic (one thread, fixed corpus): the same
vocabulary size gives the same file, byte for byte. It is written as `<checkpoint>/tokenizer.model`, where the
commands look for a tokenizer when `--tokenizer` is left out (`prompt_tokenizer.find_tokenizer`).
"""

from __future__ import annotations

import io
import pathlib
from collections.abc import Iterator

import numpy as np
import sentencepiece

from checkpoints.errors import CheckpointError
from pi05_jax.policy.prompt_tokenizer import CHECKPOINT_TOKENIZER, format_prompt

MAX_PIECES = 1024  # enough for the corpus below; the tokenizer never has more pieces than the model's vocabulary
SPECIAL_IDS = {"pad": 0, "eos": 1, "bos": 2, "unk": 3}  # PaliGemma's
CORPUS_LINES = 4000
CORPUS_SEED = 0

VERBS = ("pick up", "put", "place", "move", "push", "pull", "open", "close", "turn on", "turn off", "stack", "lift",
         "grab", "wipe", "fold", "pour", "slide", "rotate", "flip", "drop", "insert", "hang", "press", "sweep")
ADJECTIVES = ("red", "blue", "green", "yellow", "black", "white", "orange", "small", "large", "tall", "wooden",
              "metal", "plastic", "empty", "full", "left", "right", "top", "bottom")
OBJECTS = ("cube", "block", "bowl", "cup", "mug", "plate", "bottle", "can", "sponge", "towel", "spoon", "fork",
           "knife", "drawer", "door", "lid", "box", "ball", "book", "pan", "pot", "microwave", "stove", "faucet",
           "basket", "cabinet", "shirt", "marker", "banana", "apple", "carrot", "cloth", "tray", "knob")
PLACES = ("on the table", "in the basket", "into the drawer", "onto the plate", "next to the sink", "on the left",
          "on the right", "behind the box", "in front of the robot", "on top of the shelf", "inside the cabinet",
          "under the cloth", "in the bowl", "on the stove", "back where it was")


def corpus(lines: int = CORPUS_LINES, seed: int = CORPUS_SEED) -> Iterator[str]:
    """Robot-task text: plain instructions, and every other line the full pi0.5 prompt of one with a random
    state (1 to 32 values, some outside [-1, 1]) as the model sees it."""
    rng = np.random.default_rng(seed)

    def pick(words):
        return words[int(rng.integers(len(words)))]

    for i in range(lines):
        task = f"{pick(VERBS)} the {pick(ADJECTIVES)} {pick(OBJECTS)} {pick(PLACES)}"
        if i % 5 == 4:
            task = f"{task} and then {pick(VERBS)} the {pick(OBJECTS)}"
        if i % 2:
            yield task
        else:
            yield format_prompt(task, rng.uniform(-1.1, 1.1, size=int(rng.integers(1, 33))))


def train_demo_tokenizer(vocab_size: int) -> bytes:
    """The serialized sentencepiece model for a model with `vocab_size` embedding rows (it gets
    min(vocab_size, MAX_PIECES) pieces)."""
    pieces = min(int(vocab_size), MAX_PIECES)
    out = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=corpus(), model_writer=out, vocab_size=pieces, model_type="bpe",
            pad_id=SPECIAL_IDS["pad"], eos_id=SPECIAL_IDS["eos"], bos_id=SPECIAL_IDS["bos"],
            unk_id=SPECIAL_IDS["unk"], pad_piece="<pad>", eos_piece="</s>", bos_piece="<s>", unk_piece="<unk>",
            byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
            add_dummy_prefix=False, remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
            split_digits=False, num_threads=1, shuffle_input_sentence=False, max_sentence_length=4096,
            minloglevel=2)
    except RuntimeError as e:
        raise CheckpointError(f"cannot train a demo tokenizer with {pieces} pieces for a model vocabulary of "
                              f"{vocab_size} (byte fallback alone needs 256 + 4 special pieces): {e}") from e
    return out.getvalue()


def write_demo_tokenizer(checkpoint_dir: str | pathlib.Path, vocab_size: int) -> pathlib.Path:
    """Train the demo tokenizer for `vocab_size` and write it as `<checkpoint_dir>/tokenizer.model`."""
    path = pathlib.Path(checkpoint_dir).expanduser() / CHECKPOINT_TOKENIZER
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(train_demo_tokenizer(vocab_size))
    return path
