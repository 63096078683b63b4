"""Training starts from the network built with ``train.seed``: the same first global model in every run."""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("nvflare")

from fedimg.fl.recipe import SEEDED_MODEL, stage_seeded_model  # noqa: E402 - after the skip
from tests.conftest import tiny_experiment  # noqa: E402


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_the_same_seed_gives_the_same_first_model_and_another_seed_another(tmp_path):
    exp = tiny_experiment()
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
    assert stage_seeded_model(exp, tmp_path / "a") == SEEDED_MODEL
    stage_seeded_model(exp, tmp_path / "b")
    other = dataclasses.replace(exp, train=dataclasses.replace(exp.train, seed=exp.train.seed + 1))
    stage_seeded_model(other, tmp_path / "c")
    a, b, c = (_weights(tmp_path / n / SEEDED_MODEL) for n in ("a", "b", "c"))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())
    assert not list(tmp_path.glob("*/.*.tmp")), "the temporary file was left behind"


def test_the_callers_random_state_is_left_as_it_was(tmp_path):
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    stage_seeded_model(tiny_experiment(), tmp_path)
    assert torch.equal(torch.rand(3), expected)
