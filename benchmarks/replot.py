"""Redraw the perplexity plot of a results JSON written by `antkv-compile eval --out`.

    python benchmarks/replot.py benchmarks/results/perplexity_main.json
"""
import json
import sys
from pathlib import Path

from antkv_compile.reporting import plot_perplexity

for path in sys.argv[1:]:
    data = json.loads(Path(path).read_text())
    proto = data["protocol"]
    title = (f"{data['model']}: perplexity vs effective bits ({proto['eval_text']}, "
             f"{proto['contexts']}x{proto['context_len']} tokens, {data['environment']['device']})")
    print(plot_perplexity(data["results"], Path(path).with_suffix(".png"), title))
