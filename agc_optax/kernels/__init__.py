"""Optional Pallas kernels behind the optimizers' ``implementation=`` argument.

``agc_optax.sgd_agc(..., implementation="pallas")`` runs :mod:`.sgd_agc_pallas` on every leaf
whose units lie on its last axis; ``"auto"`` does so on GPU and TPU only. On CPU the kernels run
in Pallas interpret mode (correct, slow), which is how they are tested. :func:`sgd_agc_step`
is a whole step ``(params, state, grads) -> (params, state)`` whose kernel writes the new
weights directly instead of an update that ``optax.apply_updates`` would read back.
"""

from agc_optax.kernels.sgd_agc_pallas import (
    IMPLEMENTATIONS,
    check_implementation,
    column_sums_of_squares,
    default_blocks,
    eligible,
    fused_update,
    leaf_update,
    resolve_implementation,
    scale_from_sums,
    sgd_agc_step,
    sgd_agc_update,
    use_pallas,
)

__all__ = [
    "IMPLEMENTATIONS",
    "check_implementation",
    "column_sums_of_squares",
    "default_blocks",
    "eligible",
    "fused_update",
    "leaf_update",
    "resolve_implementation",
    "scale_from_sums",
    "sgd_agc_step",
    "sgd_agc_update",
    "use_pallas",
]
