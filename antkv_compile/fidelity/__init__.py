"""Long-context fidelity: passkey / needle retrieval grids through the compiled product path, needle-answer
log-likelihood, and KL divergence against full precision through the decode-path protocol (issue 16).

``antkv-compile fidelity`` (:func:`antkv_compile.fidelity.runner.run`) drives it; :mod:`.tasks` builds the items.
"""
from .tasks import TASKS, Item, depths, exact_match, make_item, make_items

__all__ = ["TASKS", "Item", "depths", "exact_match", "make_item", "make_items"]
