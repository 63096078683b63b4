"""Names shared by fedimg's server workflow and its sites: task and result metadata keys, and their size limits.

Kept in one small module so both sides agree without the site importing the
server's controller. :func:`scalar_tree_problem` is the one rule for what a
result's metadata may hold: numbers, booleans, None, short strings, and small
mappings of them. The site's guard (:class:`fedimg.fl.privacy.ScalarOnlyResultGuard`)
blocks a result that breaks it; the server applies it again before it writes
anything a site reported into its records.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

META_KEY = "fedimg"  # checkpoint meta: rounds done, best metric
TASK_META_FINAL = "fedimg_final_eval"  # a validate task that is the final evaluation (not cross-site)
TASK_META_ALGORITHM = "fedimg_algorithm"
TASK_META_ROUND = "fedimg_round"
RESULT_META_VAL = "fedimg_val"  # structured validation metrics ("dice/organ"), for TensorBoard
RESULT_META_TEST = "fedimg_test"  # the same on the site's held-out test cases (evaluation tasks only)
RESULT_META_TIMES = "fedimg_seconds"  # the site's validation and training seconds
RESULT_META_BYTES = "fedimg_update_bytes"  # tensor bytes of the update sent
RESULT_META_ALGO = "fedimg_algorithm_stats"  # algorithm diagnostics (FedProx term, SCAFFOLD control norm)
RESULT_META_DP = "fedimg_dp"  # what a site's DP filter did: clip norm, noise, epsilon spent
RESULT_META_STEPS = "NUM_STEPS_CURRENT_ROUND"  # NVFlare's name: optimizer steps of the round (aggregation weight)
# NVFlare's names (AlgorithmConstants), kept here so the pure server strategies need no NVFlare import.
FEDPROX_MU = "fedprox_mu"  # task meta: FedProx's coefficient
SCAFFOLD_CTRL_GLOBAL = "scaffold_c_global"  # task meta: SCAFFOLD's global control variates
SCAFFOLD_CTRL_DIFF = "scaffold_c_diff"  # result meta: a site's change of its control variates

MAX_TEXT = 64  # longest string value in result metadata
MAX_NAME = 128  # longest name of a metric or metadata entry
MAX_ENTRIES = 256  # most entries in one mapping of metrics or metadata
MAX_DEPTH = 2  # mappings inside mappings: fedimg_dp holds {"dp_sgd": {...}}


def is_number(value: Any) -> bool:
    """A real number (Python or NumPy scalar), not a boolean."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def scalar_tree_problem(value: Any, depth: int = MAX_DEPTH) -> str | None:
    """Why ``value`` is not a small tree of scalars (None: it is).

    Allowed: numbers, booleans, None, strings of at most :data:`MAX_TEXT`
    characters, and mappings (at most :data:`MAX_ENTRIES` entries, string
    names of at most :data:`MAX_NAME` characters, nested at most ``depth``
    deep) of those. The reason describes the kind of the offending value,
    never its content.
    """
    if value is None or isinstance(value, (bool, np.bool_)) or is_number(value):
        return None
    if isinstance(value, str):
        return None if len(value) <= MAX_TEXT else f"a string of {len(value)} characters (at most {MAX_TEXT})"
    if isinstance(value, Mapping):
        if depth <= 0:
            return f"mappings nested more than {MAX_DEPTH} deep"
        if len(value) > MAX_ENTRIES:
            return f"a mapping of {len(value)} entries (at most {MAX_ENTRIES})"
        for name, item in value.items():
            if not isinstance(name, str) or len(name) > MAX_NAME:
                return f"an entry name that is not a string of at most {MAX_NAME} characters"
            why = scalar_tree_problem(item, depth - 1)
            if why:
                return why
        return None
    return f"a {type(value).__name__}"
