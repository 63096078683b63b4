"""Nothing another party wrote is unpickled: checkpoints are read with PyTorch's restricted unpickler only.

A crafted checkpoint (a pickle whose ``__reduce__`` runs code) must be refused
by every loader with a clear error, and its code must never run. The source of
fedimg, its jobs, benchmarks and tools must not hold a call that would
unpickle arbitrary objects.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
import torch

from fedimg.training import checkpoint
from tests.conftest import REPO

SCANNED = ("fedimg", "jobs", "benchmarks", "tools")
_PICKLERS = ("pickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve")


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _keyword(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_loads(source: str) -> list[str]:
    """Calls in ``source`` that could unpickle arbitrary objects: 'line: call'."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module in _PICKLERS:
            found += [
                f"{node.lineno}: from {node.module} import {a.name}"
                for a in node.names
                if a.name in ("load", "loads", "Unpickler", "open", "*")
            ]
        if isinstance(node, ast.Import) and any(a.name == "shelve" for a in node.names):
            found.append(f"{node.lineno}: import shelve")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        leaf = name.rsplit(".", 1)[-1]
        if name in ("torch.load", "torch.serialization.load") and not _is_true(_keyword(node, "weights_only")):
            found.append(f"{node.lineno}: {name} without weights_only=True")
        elif (
            leaf in ("load", "loads")
            and name.split(".")[0] in _PICKLERS
            or leaf in ("read_pickle", "Unpickler", "unsafe_load", "full_load")
            or name == "torch.jit.load"
        ):
            found.append(f"{node.lineno}: {name}")
        elif name in ("yaml.load", "yaml.load_all") and _dotted(_keyword(node, "Loader") or ast.Name("x")) not in (
            "yaml.SafeLoader",
            "yaml.CSafeLoader",
            "SafeLoader",
            "CSafeLoader",
        ):
            found.append(f"{node.lineno}: {name} without a safe loader")
        elif leaf == "load" and _is_true(_keyword(node, "allow_pickle")):
            found.append(f"{node.lineno}: {name} with allow_pickle=True")
    return found


def test_the_scanner_finds_each_kind_of_unsafe_load():
    bad = (
        "import shelve\nfrom dill import loads\ntorch.load(p)\ntorch.load(p, weights_only=False)\n"
        "x = pickle.loads(b)\nnp.load(p, allow_pickle=True)\nyaml.load(s, Loader=yaml.Loader)\n"
        "pd.read_pickle(p)\ntorch.jit.load(p)\n"
    )
    assert len(unsafe_loads(bad)) == 9
    good = (
        "import pickle\ntorch.load(p, map_location='cpu', weights_only=True)\nnp.load(p)\nyaml.safe_load(s)\n"
        "err = pickle.UnpicklingError\n"
    )
    assert unsafe_loads(good) == []


def test_no_source_file_can_unpickle_arbitrary_objects():
    offenders = []
    for top in SCANNED:
        for path in sorted((REPO / top).rglob("*.py")):
            offenders += [f"{path.relative_to(REPO)}:{hit}" for hit in unsafe_loads(path.read_text())]
    assert not offenders, "calls that could run code from a file:\n" + "\n".join(offenders)


class _RunsCode:
    """Unpickling this creates ``path``: the code a crafted checkpoint would run."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


@pytest.fixture
def crafted(tmp_path):
    marker = tmp_path / "code_ran"
    ckpt = tmp_path / "FL_global_model.pt"
    torch.save({"model": {"weight": torch.zeros(2, 3), "bias": torch.zeros(2)}, "meta_props": _RunsCode(marker)}, ckpt)
    return ckpt, marker


def test_a_crafted_checkpoint_is_refused_by_the_checkpoint_loaders(crafted):
    ckpt, marker = crafted
    for load in (checkpoint.load_state_dict, getattr(checkpoint, "load_checkpoint", checkpoint.load_state_dict)):
        with pytest.raises(ValueError) as exc:
            load(ckpt)
        msg = str(exc.value)
        assert f"checkpoint {ckpt} refused" in msg and "posix.mkdir" in msg and "could run code" in msg
        assert "weights_only" not in msg  # no advice to load it unsafely
    assert not marker.exists()


def _he_site_kit(tmp_path: Path) -> Path:
    ts = pytest.importorskip("tenseal", reason="HE needs TenSEAL: pip install 'nvflare[HE]' (a dev dependency)")
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 40, 40, 60])
    ctx.global_scale = 2**40
    kit = tmp_path / "site-1"
    (kit / "startup").mkdir(parents=True)
    (kit / "startup" / "client_context.tenseal").write_bytes(ctx.serialize(save_secret_key=True))
    return kit, ctx


def test_decrypt_global_model_refuses_a_crafted_checkpoint_and_never_runs_its_code(crafted, tmp_path):
    from fedimg.fl.he import decrypt_global_model

    ckpt, marker = crafted
    kit, _ = _he_site_kit(tmp_path)
    with pytest.raises(ValueError, match=r"refused: it references posix\.mkdir"):
        decrypt_global_model(ckpt, kit, torch.nn.Linear(3, 2))
    assert not marker.exists()


def test_decrypt_global_model_reads_an_nvflare_he_checkpoint_with_the_restricted_unpickler(tmp_path):
    """The layout NVFlare's PTFileModelPersistor writes for an HE job: ciphertext bytes plus CKKS meta."""
    import collections

    import tenseal as ts

    from fedimg.fl.he import decrypt_global_model

    kit, ctx = _he_site_kit(tmp_path)
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    state = net.state_dict()
    model = collections.OrderedDict(
        (k, ts.ckks_vector(ctx, v.reshape(-1).tolist()).serialize()) for k, v in state.items()
    )
    ckpt = tmp_path / "FL_global_model.pt"
    torch.save(
        collections.OrderedDict(
            model=model, meta_props={"PROCESSED_ALGORITHM": "CKKS", "PROCESSED_KEYS": {k: True for k in state}}
        ),
        ckpt,
    )
    out = decrypt_global_model(ckpt, kit, torch.nn.Linear(3, 2))
    assert set(out) == set(state)
    assert all(torch.allclose(out[k], state[k], atol=1e-4) for k in state)
