"""A calibration made by daser's own engine (`daser-rag calibrate`) is found and used by the vLLM
control plane, which names the same weights by another fingerprint (the files vLLM serves,
`model/files.py`): `engine_fingerprint` gives the embedded engine's name without loading the
weights, and files made for it are accepted as aliases, renamed to the control plane's
fingerprint after their checksum is verified. Another model's file is still refused."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.test_calibration import _random_calibration


def test_engine_fingerprint_is_the_loaded_models_without_its_weights(lm):
    from daser_rag.model.loader import engine_fingerprint

    assert engine_fingerprint(None, lm.dtype) == lm.fingerprint
    assert engine_fingerprint(None, torch.bfloat16) != lm.fingerprint  # the dtype is part of it


def test_vllm_engine_finds_and_takes_a_file_made_by_the_embedded_engine(generator, tmp_path):
    from daser_rag.calibration import storage
    from daser_rag.calibration.storage import CalibrationFileError
    from daser_rag.control.vllm_engine import vllm_calibration
    from daser_rag.model.files import ModelFiles

    gen = generator
    files = ModelFiles(None, dtype="float32")
    assert files.fingerprint != gen.fingerprint
    made = dataclasses.replace(_random_calibration(gen, link_tokens=0), fit_share=0.15)  # gen's fingerprint
    path = storage.save(made, storage.default_path(tmp_path, gen.fingerprint, 0.15))
    # without the alias: not found by auto, refused by path (another model's file)
    assert vllm_calibration("auto", files, tmp_path) is None
    with pytest.raises(CalibrationFileError, match="made for model"):
        vllm_calibration(str(path), files, tmp_path)
    for value in ("auto", str(path)):
        got = vllm_calibration(value, files, tmp_path, (gen.fingerprint,))
        assert got is not None and len(got.members) == 1
        cal = got.members[0]
        assert cal.fingerprint == files.fingerprint and cal.meta["made_for"] == gen.fingerprint
        assert torch.equal(cal.kv_map, made.kv_map) and cal.fit_share == 0.15
    # the model's own file for a regime comes first; an alias fills the other regime
    own = dataclasses.replace(_random_calibration(gen, link_tokens=0, seed=3), fingerprint=files.fingerprint,
                              fit_share=0.15)
    storage.save(own, storage.default_path(tmp_path, files.fingerprint, 0.15))
    storage.save(_random_calibration(gen, link_tokens=0, seed=4), storage.default_path(tmp_path, gen.fingerprint))
    got = vllm_calibration("auto", files, tmp_path, (gen.fingerprint,))
    by_share = {c.fit_share: c for c in got.members}
    assert set(by_share) == {0.0, 0.15} and torch.equal(by_share[0.15].kv_map, own.kv_map)
    assert by_share[0.0].meta["made_for"] == gen.fingerprint
    # a damaged alias file is refused like any file (its checksum is checked before renaming)
    raw = bytearray(path.read_bytes())
    raw[-9] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CalibrationFileError):
        vllm_calibration(str(path), files, tmp_path, (gen.fingerprint,))
