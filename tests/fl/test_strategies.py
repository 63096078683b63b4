"""Server strategies are pure (no NVFlare), one per fed.algorithm, each doing its algorithm's step."""

from __future__ import annotations

import subprocess
import sys
from typing import get_args

import numpy as np

from fedimg.config import FedConfig
from fedimg.fl.aggregation import Update
from tests.conftest import controller_for


def test_the_registry_and_the_config_name_the_same_algorithms():
    from typing import get_type_hints

    from fedimg.fl.algorithms import REGISTRY

    names = get_args(get_type_hints(FedConfig)["algorithm"])
    assert set(REGISTRY) == set(names) == {"fedavg", "fedprox", "fedopt", "scaffold", "fedbn"}


def test_server_strategies_import_without_nvflare():
    code = (
        "import sys; import fedimg.fl.algorithms.base, fedimg.fl.algorithms.fedavg, fedimg.fl.algorithms.fedprox,"
        " fedimg.fl.algorithms.fedopt, fedimg.fl.algorithms.scaffold, fedimg.fl.algorithms.fedbn; "
        "print('nvflare' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _updates(ctl, values, weights):
    return [
        Update(f"site-{i}", {k: np.full_like(v, x) for k, v in ctl._global.items()}, w)
        for i, (x, w) in enumerate(zip(values, weights))
    ]


def test_fedavg_is_the_step_weighted_mean_and_fedprox_sends_mu():
    ctl = controller_for("fedavg")
    start = {k: v.copy() for k, v in ctl._global.items()}
    new = ctl.strategy.apply(ctl._global, _updates(ctl, [0.1, 0.4], [3, 1]), True, {})
    assert all(np.allclose(new[k], start[k] + (3 * 0.1 + 0.4) / 4) for k in start)
    full = ctl.strategy.apply(ctl._global, _updates(ctl, [1.0, 2.0], [1, 1]), False, {})
    assert all(np.allclose(full[k], 1.5) for k in start)
    prox = controller_for("fedprox", mu=0.05)
    assert prox.strategy.task_meta() == {"fedprox_mu": 0.05}
    assert ctl.strategy.task_meta() == {}


def test_robust_aggregation_is_chosen_by_the_config():
    ctl = controller_for("fedavg", **{"robust.aggregation": "median"})
    new = ctl.strategy.apply(ctl._global, _updates(ctl, [0.0, 0.1, 100.0], [1, 1, 1]), True, {})
    start = controller_for("fedavg")._global
    assert all(np.allclose(new[k], start[k] + 0.1) for k in start)  # the poisoned 100 does not move the median
