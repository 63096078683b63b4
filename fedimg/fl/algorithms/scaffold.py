"""SCAFFOLD (Karimireddy et al. 2020): control variates correct each site's drift from the global direction.

The server keeps global control variates ``c`` (one per parameter, zero at
the start) and sends them with every training task. Each site corrects
every local step by ``c - c_i`` (NVFlare's ``PTScaffoldHelper``) and returns
the change of its own ``c_i`` beside its update; the server adds the mean
change to ``c``. A site that returns no change, or one that does not fit
the network's parameters, has its whole update rejected.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from fedimg.fl.aggregation import Update, aggregate, check_update
from fedimg.fl.algorithms.base import ClientAlgorithm, ServerStrategy
from fedimg.fl.exchange import to_float32
from fedimg.fl.protocol import SCAFFOLD_CTRL_DIFF, SCAFFOLD_CTRL_GLOBAL
from fedimg.models.registry import build_model
from fedimg.training.checkpoint import state_problem
from fedimg.training.loops import StepHooks
from fedimg.training.trainer import SiteTrainer


class ScaffoldServer(ServerStrategy):
    """FedAvg's aggregation plus the global control variates."""

    def setup(self, global_params: Mapping[str, np.ndarray]) -> None:
        net = build_model(self.exp.model, self.exp.task)
        self.param_keys = frozenset(name for name, _ in net.named_parameters())
        # One control per floating entry (NVFlare's helper loads them like a state dict); a site's change covers
        # the parameters only.
        self.controls: dict[str, np.ndarray] = {
            k: np.zeros_like(np.asarray(v), dtype=np.float32)
            for k, v in global_params.items()
            if np.issubdtype(np.asarray(v).dtype, np.floating)
        }

    def task_meta(self) -> dict[str, Any]:
        return {SCAFFOLD_CTRL_GLOBAL: self.controls}

    def check_result(self, meta: Mapping[str, Any]) -> str | None:
        ctrl = meta.get(SCAFFOLD_CTRL_DIFF)
        if ctrl is None:
            return (
                f"MISSING_CONTROLS: no control-variate change (meta {SCAFFOLD_CTRL_DIFF!r}); every site must run "
                "scaffold"
            )
        reference = {k: v for k, v in self.controls.items() if k in self.param_keys}
        why = check_update(ctrl, reference, fp16=self.exp.fed.update_precision == "fp16")
        if why is None:
            return None
        code, _, rest = why.partition(": ")
        return f"{code}: in the SCAFFOLD control change, {rest}"

    def apply(
        self,
        global_params: Mapping[str, np.ndarray],
        updates: Sequence[Update],
        is_diff: bool,
        results_meta: Mapping[str, Mapping[str, Any]],
    ) -> dict[str, np.ndarray]:
        new = super().apply(global_params, updates, is_diff, results_meta)
        changes = [
            Update(
                site=u.site, params=to_float32(results_meta[u.site][SCAFFOLD_CTRL_DIFF], self.controls), weight=u.weight
            )
            for u in updates
        ]
        for key, delta in aggregate(changes, "mean").items():
            if key in self.controls:
                self.controls[key] = (self.controls[key] + delta).astype(np.float32)
        return new


class ScaffoldClient(ClientAlgorithm):
    """Each local step corrected by the control variates; the change of the site's own returned."""

    def __init__(self, trainer: SiteTrainer) -> None:
        from nvflare.app_opt.pt.scaffold import PTScaffoldHelper

        super().__init__(trainer)
        self.helper = PTScaffoldHelper()
        self.helper.init(trainer.model)
        self._global_model: torch.nn.Module | None = None
        self._c_global: Any = None
        self._c_local: Any = None
        self._lr = 0.0

    def start_round(self, model: Any) -> StepHooks:
        controls = (model.meta or {}).get(SCAFFOLD_CTRL_GLOBAL)
        if not controls:
            raise ValueError(
                "SCAFFOLD: the training task carries no global control variates "
                f"(meta {SCAFFOLD_CTRL_GLOBAL!r}); the server must run fed.algorithm scaffold as well"
            )
        # The server's controls are checked like a model: the network's parameters (buffers may come too),
        # their shapes, finite values. NaN controls would silently corrupt every local step.
        state = self.trainer.model.state_dict()
        params = {name for name, _ in self.trainer.model.named_parameters()}
        reference = {k: v for k, v in state.items() if v.is_floating_point()}
        why = state_problem(controls, reference, optional=set(reference) - params)
        if why:
            raise ValueError(
                f"SCAFFOLD: the global control variates received are refused ({why}); server and site "
                "must run the same experiment config"
            )
        self.helper.load_global_controls(controls)
        self._c_global, self._c_local = self.helper.get_params()
        self._global_model = copy.deepcopy(self.trainer.model)

        def after_step(m: torch.nn.Module, lr: float) -> None:
            self._lr = lr
            self.helper.model_update(m, lr, self._c_global, self._c_local)

        return StepHooks(after_step=after_step)

    def end_round(self) -> dict[str, Any]:
        self.helper.terms_update(self.trainer.model, self._lr, self._c_global, self._c_local, self._global_model)
        delta = {k: np.asarray(v, dtype=np.float32) for k, v in self.helper.get_delta_controls().items()}
        self.stats = {
            "control_delta_norm": float(np.sqrt(sum(float((d.astype(np.float64) ** 2).sum()) for d in delta.values()))),
            "corrected_steps": float(self.helper.cnt),
        }
        return {SCAFFOLD_CTRL_DIFF: delta}


__all__ = ["ScaffoldClient", "ScaffoldServer"]
