"""The random-weight demo checkpoint carries a sentencepiece tokenizer that fits its vocabulary
(`checkpoints.demo_tokenizer`), and `pi05 serve` / `pi05 infer` find `<checkpoint>/tokenizer.model` without
`--tokenizer` (`prompt_tokenizer.find_tokenizer`); with none anywhere the error names every path looked at."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import sentencepiece

from checkpoints.demo_tokenizer import SPECIAL_IDS, train_demo_tokenizer
from checkpoints.errors import CheckpointError
from checkpoints.quantize import Plan, quantize_checkpoint
from checkpoints.random_init import write_random_checkpoint
from pi05_jax import runtime
from pi05_jax.cli import main
from pi05_jax.config import preset
from pi05_jax.policy import pipeline
from pi05_jax.policy.prompt_tokenizer import (
    CHECKPOINT_TOKENIZER,
    PromptTokenizer,
    TokenizerError,
    find_tokenizer,
    format_prompt,
)

PROMPTS = ("pick up the red cube and put it in the basket", "Open the top drawer_of the cabinet\n",
           "schiebe die Tasse nach links, bitte!")  # the last one mostly outside the training corpus


@pytest.fixture(autouse=True)
def no_openpi_cache(tmp_path, monkeypatch):
    """No openpi tokenizer cache on this machine, whatever the real home holds."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("OPENPI_DATA_HOME", raising=False)


@pytest.fixture(scope="module")
def demo_checkpoint(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("demo") / "demo-tiny", preset("tiny"), seed=0)


@pytest.fixture()
def bare_checkpoint(demo_checkpoint, tmp_path):
    """The demo checkpoint without its tokenizer (an openpi checkpoint as released carries none)."""
    path = tmp_path / "bare"
    shutil.copytree(demo_checkpoint, path)
    (path / CHECKPOINT_TOKENIZER).unlink()
    return path


def test_demo_checkpoint_tokenizer_fits_the_vocabulary_and_round_trips(demo_checkpoint):
    config = preset("tiny")
    path = find_tokenizer(None, demo_checkpoint)
    assert path == demo_checkpoint / CHECKPOINT_TOKENIZER
    tok = PromptTokenizer(path, config.max_token_len, vocab_size=config.vocab_size)
    assert 0 < tok.vocab_size <= config.vocab_size
    sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    assert {"pad": sp.pad_id(), "eos": sp.eos_id(), "bos": sp.bos_id(), "unk": sp.unk_id()} == SPECIAL_IDS
    rng = np.random.default_rng(1)
    seen = set()
    for prompt in PROMPTS:
        state = rng.uniform(-1.2, 1.2, size=8)
        tokens, mask = tok.tokenize(prompt, state)
        assert tokens.shape == mask.shape == (config.max_token_len,)
        ids = tokens[mask]
        assert ids[0] == sp.bos_id() and np.all(tokens[~mask] == sp.pad_id())
        assert np.all((ids >= 0) & (ids < config.vocab_size))
        assert tok.decode(ids) == format_prompt(prompt, state)  # exact: no normalization, byte fallback
        seen.add(tuple(ids))
    assert len(seen) == len(PROMPTS)
    text = "Greif den grünen Würfel 🤖\ttwice"
    assert tok.decode(tok.encode(text)) == text


def test_training_is_deterministic_and_is_what_the_writer_wrote(demo_checkpoint):
    vocab = preset("tiny").vocab_size
    first = train_demo_tokenizer(vocab)
    assert train_demo_tokenizer(vocab) == first
    assert (demo_checkpoint / CHECKPOINT_TOKENIZER).read_bytes() == first


def test_small_vocabularies_get_a_smaller_tokenizer_or_a_clear_error():
    vocab = 600
    sp = sentencepiece.SentencePieceProcessor(model_proto=train_demo_tokenizer(vocab))
    assert sp.get_piece_size() <= vocab
    with pytest.raises(CheckpointError, match="vocabulary of 100"):
        train_demo_tokenizer(100)


def test_find_tokenizer_order_and_errors(demo_checkpoint, bare_checkpoint, tmp_path):
    given = tmp_path / "mine.model"
    shutil.copy(demo_checkpoint / CHECKPOINT_TOKENIZER, given)
    assert find_tokenizer(given, demo_checkpoint) == given  # --tokenizer wins
    with pytest.raises(TokenizerError, match="does not exist"):
        find_tokenizer(tmp_path / "missing.model", demo_checkpoint)
    with pytest.raises(TokenizerError) as e:
        find_tokenizer(None, bare_checkpoint)
    message = str(e.value)
    assert str(bare_checkpoint / CHECKPOINT_TOKENIZER) in message
    assert str(tmp_path / "home" / ".cache" / "openpi" / "big_vision" / "paligemma_tokenizer.model") in message


class _WeightsWouldLoadNow(Exception):
    """Raised instead of loading weights: the command got past its argument and tokenizer checks."""


def _stop_before_loading(monkeypatch):
    def load(*_args, **_kwargs):
        raise _WeightsWouldLoadNow

    monkeypatch.setattr(runtime.Model, "load", load)


def test_serve_finds_the_checkpoint_tokenizer_without_the_flag(demo_checkpoint, monkeypatch):
    chosen = {}
    real = pipeline.policy_parts

    def recording(*args, **kwargs):
        parts = real(*args, **kwargs)
        chosen["path"] = parts["tokenizer"].path
        return parts

    monkeypatch.setattr(pipeline, "policy_parts", recording)
    _stop_before_loading(monkeypatch)
    with pytest.raises(_WeightsWouldLoadNow):
        main(["serve", "--checkpoint", str(demo_checkpoint), "--adapter", "libero", "--port", "0", "--quiet"])
    assert chosen["path"] == demo_checkpoint / CHECKPOINT_TOKENIZER


def test_serve_and_infer_without_any_tokenizer_name_the_paths_before_loading(bare_checkpoint, reference_dir,
                                                                             tmp_path, monkeypatch, capsys):
    _stop_before_loading(monkeypatch)
    serve = ["serve", "--checkpoint", str(bare_checkpoint), "--adapter", "libero", "--port", "0", "--quiet"]
    infer = ["infer", "--checkpoint", str(bare_checkpoint), "--inputs", str(reference_dir / "policy_cases.npz"),
             "--case", "libero", "--adapter", "libero", "--output", str(tmp_path / "o.npz"), "--quiet"]
    for argv in (serve, infer):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "no --tokenizer given" in err and str(bare_checkpoint / CHECKPOINT_TOKENIZER) in err, err
        assert "paligemma_tokenizer.model" in err


def test_infer_raw_case_on_the_demo_checkpoint_without_the_flag(demo_checkpoint, reference_dir, tmp_path, capsys):
    out = tmp_path / "actions.npz"
    status = main(["infer", "--checkpoint", str(demo_checkpoint), "--inputs", str(reference_dir / "policy_cases.npz"),
                   "--case", "libero", "--adapter", "libero", "--dtype", "float32", "--kernels", "reference",
                   "--num-steps", "2", "--output", str(out)])
    err = capsys.readouterr().err
    assert status == 0, err
    assert f"tokenizer {demo_checkpoint / CHECKPOINT_TOKENIZER}" in err
    actions = np.load(out)["actions"]
    assert actions.ndim == 2 and np.all(np.isfinite(actions))


def test_quantized_demo_checkpoint_keeps_its_tokenizer(demo_checkpoint, tmp_path):
    out = tmp_path / "fp8"
    quantize_checkpoint(demo_checkpoint, out, plan=Plan(fmt="fp8", parts=("expert",)))
    assert find_tokenizer(None, out) == out / CHECKPOINT_TOKENIZER
    assert (out / CHECKPOINT_TOKENIZER).read_bytes() == (demo_checkpoint / CHECKPOINT_TOKENIZER).read_bytes()


def test_a_demo_checkpoint_cached_without_a_tokenizer_gets_one(bare_checkpoint):
    from pi05_jax.commands.demo import ensure_demo_checkpoint

    said = []
    assert ensure_demo_checkpoint("tiny", str(bare_checkpoint), said.append) == bare_checkpoint
    assert any("cached" in line for line in said)  # reused, not rebuilt
    assert find_tokenizer(None, bare_checkpoint) == bare_checkpoint / CHECKPOINT_TOKENIZER
    assert (bare_checkpoint / CHECKPOINT_TOKENIZER).read_bytes() == train_demo_tokenizer(preset("tiny").vocab_size)
