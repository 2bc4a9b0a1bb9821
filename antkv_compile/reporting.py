"""Result files: environment stamp, JSON, tables and plots for benchmarks/results/."""
from __future__ import annotations

import datetime
import json
import platform
import shlex
import sys
from pathlib import Path

import torch


# the command line a caller ran, when it is not this process's own sys.argv (cli.main(argv) called from Python)
COMMAND: list[str] | None = None


def environment() -> dict:
    """Device, versions, date and command line of this run."""
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": dev,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "triton": triton_version,
        "command": " ".join(map(shlex.quote, COMMAND)) if COMMAND is not None else
        " ".join(shlex.quote(a) for a in ["antkv-compile", *sys.argv[1:]])
        if Path(sys.argv[0]).name in ("antkv-compile", "cli.py", "__main__.py") else " ".join(map(shlex.quote, sys.argv)),
    }


def write_json(path: str | Path, payload: dict) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(payload, indent=2, sort_keys=False))
    return p


def print_table(rows: list[dict], columns: list[tuple[str, str, str]], title: str) -> None:
    """rows: dicts; columns: (key, header, format spec)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for _, header, _ in columns:
        table.add_column(header, justify="right" if header != "method" else "left")
    for r in rows:
        table.add_row(*[format(r.get(k), fmt) if r.get(k) is not None else "-" for k, _, fmt in columns])
    Console(width=140).print(table)


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(format(r.get(k), f) if r.get(k) is not None else "-" for k, _, f in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def plot_perplexity(rows: list[dict], path: str | Path, title: str) -> Path:
    """Perplexity vs effective bits: one line per method family, one point per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    families: dict[str, list[dict]] = {}
    for r in rows:
        fam = r["name"].rsplit("-", 1)[0] if r["name"] != "full" else "full"
        families.setdefault(fam, []).append(r)
    for fam, rs in families.items():
        rs = sorted(rs, key=lambda r: r["effective_bits"])
        ax.plot([r["effective_bits"] for r in rs], [r["perplexity"] for r in rs], marker="o", label=fam)
        for r in rs:
            ax.annotate(r["name"], (r["effective_bits"], r["perplexity"]), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("effective bits per KV element (codes + anchors + window + codebooks)")
    ax.set_ylabel("perplexity")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=130)
    plt.close(fig)
    return p
