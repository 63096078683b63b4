"""Names shared by fedimg's server workflow and its sites: task and result metadata keys.

Kept in one small module so both sides agree without the site importing the
server's controller.
"""

META_KEY = "fedimg"  # checkpoint meta: rounds done, best metric
TASK_META_FINAL = "fedimg_final_eval"  # a validate task that is the final evaluation (not cross-site)
TASK_META_ALGORITHM = "fedimg_algorithm"
TASK_META_ROUND = "fedimg_round"
RESULT_META_VAL = "fedimg_val"  # structured validation metrics ("dice/organ"), for TensorBoard
RESULT_META_TIMES = "fedimg_seconds"  # the site's validation and training seconds
RESULT_META_BYTES = "fedimg_update_bytes"  # tensor bytes of the update sent
RESULT_META_ALGO = "fedimg_algorithm_stats"  # algorithm diagnostics (FedProx term, SCAFFOLD control norm)
RESULT_META_DP = "fedimg_dp"  # what a site's DP filter did: clip norm, noise, epsilon spent
