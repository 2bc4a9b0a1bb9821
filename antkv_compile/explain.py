"""``antkv_compile.explain(model, example_inputs)``: what the ``antkv`` backend would do, per captured graph.

Runs ``model`` once under ``torch.compile`` with a recording backend (the graphs run unchanged, nothing is
compressed, Dynamo's caches are reset first), and for every graph Dynamo captured reports the matched
attention sites (cache write + attention), the unsupported attention/cache nodes and why, the decision
(rewrite / fallback and its reason), and the graph before and after the rewrite as readable code.
``GraphExplanation.to_dot()`` / ``write_svg()`` export a picture (networkx graph; SVG needs Graphviz's
``dot``). The ``antkv-compile inspect`` command prints the same for a tiny model or SmolLM2.
"""
from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

__all__ = ["explain", "Explanation", "GraphExplanation"]


@dataclasses.dataclass
class GraphExplanation:
    index: int
    report: Any  # SiteReport
    plan: Any  # RewritePlan
    before: fx.GraphModule
    after: fx.GraphModule | None

    @property
    def decision(self) -> str:
        if self.plan.rewrites:
            kept = f"; {len(self.plan.kept_exact)} sliding layer(s) kept exact" if self.plan.kept_exact else ""
            return f"rewrite {len(self.plan.sites)} site(s) (layers {list(self.plan.report.layers)}){kept}"
        return f"fallback to Inductor: {self.plan.fallback_reason}"

    def before_code(self) -> str:
        return self.before.code

    def after_code(self) -> str:
        return self.after.code if self.after is not None else "(unchanged)\n"

    def summary(self) -> str:
        return f"graph {self.index}: {self.decision}\n{self.report.summary()}"

    def text(self, code: bool = True) -> str:
        parts = [self.summary()]
        if code:
            parts += ["--- before ---", self.before_code(), "--- after ---", self.after_code()]
        return "\n".join(parts)

    def to_networkx(self, which: str = "after"):
        import networkx as nx

        gm = self.after if which == "after" and self.after is not None else self.before
        matched = set()
        if which == "before":
            for s in self.report.sites:
                matched |= {s.output, s.key_write.node, s.value_write.node}
        unsupported = {u.node for u in self.report.unsupported} if which == "before" else set()
        g = nx.DiGraph(name=f"graph{self.index}_{which}")
        for n in gm.graph.nodes:
            label = f"{n.name}\\n{n.op}:{_short(n.target)}"
            color = "black"
            if n in matched or (n.op == "call_function" and "antkv_rt" in str(n.target)):
                color = "green"
            elif n in unsupported:
                color = "red"
            g.add_node(n.name, label=label, color=color)
            for a in n.all_input_nodes:
                g.add_edge(a.name, n.name)
        return g

    def to_dot(self, which: str = "after") -> str:
        g = self.to_networkx(which)
        lines = [f'digraph "{g.name}" {{', "  node [shape=box, fontsize=9];"]
        for name, data in g.nodes(data=True):
            lines.append(f'  "{name}" [label="{data["label"]}", color={data["color"]}];')
        for a, b in g.edges():
            lines.append(f'  "{a}" -> "{b}";')
        lines.append("}")
        return "\n".join(lines) + "\n"

    def write_dot(self, path, which: str = "after") -> Path:
        p = Path(path)
        p.write_text(self.to_dot(which))
        return p

    def write_svg(self, path, which: str = "after") -> Path:
        dot = shutil.which("dot")
        if dot is None:
            raise RuntimeError("SVG export needs Graphviz's `dot` on PATH; use write_dot() and render it elsewhere")
        p = Path(path)
        subprocess.run([dot, "-Tsvg", "-o", str(p)], input=self.to_dot(which).encode(), check=True)
        return p


def _short(target) -> str:
    s = getattr(target, "__name__", None) or str(target)
    return s.replace('"', "'")[:40]


@dataclasses.dataclass
class Explanation:
    graphs: list[GraphExplanation]

    def __iter__(self):
        return iter(self.graphs)

    def __len__(self) -> int:
        return len(self.graphs)

    def text(self, code: bool = True) -> str:
        return "\n\n".join(g.text(code) for g in self.graphs) or "no graph captured"

    def __str__(self) -> str:
        return self.text(code=False)


def explain(model, example_inputs, *, session_id: int = 0) -> Explanation:
    """Capture ``model(**example_inputs)`` (dict) or ``model(*example_inputs)`` and explain each graph.

    The model runs once, uncompressed (its cache, if passed, is written as usual). ``torch._dynamo.reset()``
    is called before capturing."""
    from .passes import apply_rewrite, plan_rewrite
    from .patterns import find_attention_sites

    out: list[GraphExplanation] = []

    def recorder(gm, inputs, **_):
        report = find_attention_sites(gm, name=f"graph{len(out)}")
        plan = plan_rewrite(report)
        after = apply_rewrite(gm, plan, session_id).gm if plan.rewrites else None
        out.append(GraphExplanation(len(out), report, plan, gm, after))
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=recorder)
    with torch.no_grad():
        if isinstance(example_inputs, dict):
            compiled(**example_inputs)
        elif isinstance(example_inputs, (tuple, list)):
            compiled(*example_inputs)
        else:
            compiled(example_inputs)
    torch._dynamo.reset()
    return Explanation(out)
