"""Graph passes of the ``antkv`` backend: the rewrite of attention sites and the compile-cache key.

* :mod:`.rewrite` -- ``plan_rewrite(report)`` (decide, no mutation) and ``apply_rewrite(gm, plan, sid)``;
* :mod:`.ops` -- ``torch.ops.antkv_rt.cache_attend`` (imported lazily: importing this package is light);
* :mod:`.cache_key` -- the ``CustomGraphPass`` whose ``uuid`` carries the quantization config.
"""
from .rewrite import RewritePlan, RewriteResult, apply_rewrite, plan_rewrite

__all__ = ["RewritePlan", "RewriteResult", "apply_rewrite", "plan_rewrite"]
