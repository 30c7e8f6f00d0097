"""scripts/gpu_measure.py `time --options FIELD=V1,V2`: the variants it builds are the fast implementations with that
FastPathOptions field replaced (what the card A/B of an option times), and a bad spec is a one-line exit."""

from __future__ import annotations

import dataclasses
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "scripts"))
import gpu_measure

from pi05_jax import implementations


def test_option_variants_replace_one_field_of_each_fast_implementation():
    impls = [implementations.REFERENCE, implementations.PALLAS]
    got = gpu_measure.with_option_variants(impls, ["fused_attention=none,vision", "bucket_size=128"])
    assert [i.name for i in got] == ["reference", "pallas", "pallas[fused_attention=none]",
                                     "pallas[fused_attention=vision]", "pallas[bucket_size=128]"]
    assert got[2].options == dataclasses.replace(implementations.PALLAS.options, fused_attention="none")
    assert got[4].options.bucket_size == 128 and got[4].options.fused_attention == "vision"


@pytest.mark.parametrize("spec,needle", [("fused_attention", "expected FIELD=V1,V2"),
                                         ("no_such_field=1", "expected FIELD=V1,V2"),
                                         ("fused_attention=prefix", "fused_attention must be one of"),
                                         ("bucket_size=many", "invalid literal")])
def test_bad_option_specs_exit_with_one_line(spec, needle):
    with pytest.raises(SystemExit, match=needle):
        gpu_measure.with_option_variants([implementations.PALLAS], [spec])
