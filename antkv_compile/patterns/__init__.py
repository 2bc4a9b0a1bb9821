"""What attention and KV-cache writes look like in the Dynamo graphs of Hugging Face models.

``find_attention_sites(gm)`` is the entry point: it returns a ``SiteReport`` of ``AttentionSite``s (an
attention paired with the cache writes of the K/V it reads: the unit the antkv rewrite replaces) and of
``Unsupported`` items (attention-like nodes or cache writes we will not rewrite, with a reason code from
``Reason``).  The pieces are usable on their own:

* ``predicates`` -- pure ``fx.Node`` predicates accepting every spelling of an op;
* ``catalogue`` -- one documented matcher per graph shape (``CACHE_WRITE_ENTRIES``, ``ATTENTION_ENTRIES``);
* ``masks`` / ``chains`` / ``naming`` -- mask analysis, repeat_kv unwrapping, placeholder-name parsing.

Works on the pre-AOTAutograd (torch-level) graph a ``torch.compile`` backend receives.  Logging goes to
``logging.getLogger("antkv_compile.patterns")`` at DEBUG level.
"""

from . import predicates
from .catalogue import ATTENTION_ENTRIES, CACHE_WRITE_ENTRIES, Entry, match_attention, match_cache_write
from .matches import AttentionMatch, AttentionSite, CacheWrite, MaskInfo, Reason, SiteReport, Unsupported
from .naming import CacheTensorName, layer_from_module_stack, parse_cache_name
from .sites import find_attention_matches, find_attention_sites, find_cache_writes

__all__ = [
    "predicates",
    "find_attention_sites",
    "find_attention_matches",
    "find_cache_writes",
    "match_attention",
    "match_cache_write",
    "ATTENTION_ENTRIES",
    "CACHE_WRITE_ENTRIES",
    "Entry",
    "AttentionMatch",
    "AttentionSite",
    "CacheWrite",
    "MaskInfo",
    "Reason",
    "SiteReport",
    "Unsupported",
    "CacheTensorName",
    "parse_cache_name",
    "layer_from_module_stack",
]
