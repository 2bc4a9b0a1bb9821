"""antkv_compile.explain and `antkv-compile inspect`."""
from __future__ import annotations

import torch
from transformers import StaticCache

import antkv_compile
from antkv_compile.models import tiny_model


def test_explain_gemma3_reports_sliding_and_rewrites_global(tmp_path):
    model = tiny_model("gemma3", sliding_window=8)
    ids = torch.randint(3, 500, (1, 9), generator=torch.Generator().manual_seed(0))
    cache = StaticCache(config=model.config, max_cache_len=16)
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache)
    ex = antkv_compile.explain(model, dict(input_ids=ids[:, :1], past_key_values=cache, use_cache=True))
    assert len(ex) == 1
    g = ex.graphs[0]
    assert g.plan.rewrites and g.report.layers == (2,)
    assert {u.layer for u in g.plan.kept_exact} == {0, 1, 3}
    text = ex.text(code=True)
    assert "sliding_window" in text and "cache_attend" in g.after_code() and "index_copy_" in g.before_code()
    assert "cache_attend" not in g.before_code()
    dot = g.write_dot(tmp_path / "after.dot")
    assert "digraph" in dot.read_text() and "color=green" in dot.read_text()
    assert "color=red" in g.to_dot("before")


def test_inspect_cli(capsys):
    from antkv_compile.cli import main

    assert main(["inspect", "--model", "tiny-llama", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "rewrite 2 site(s)" in out and "static_index_copy" in out
