"""First run fast: the demo calibrates on 2048 tokens with 10 k-means iterations, and `eval --quick` on the default
model reuses the demo's codebooks (same recipe, tokens, iterations) instead of calibrating its own."""
from pathlib import Path

from antkv_compile.cli import _quick_artifact, build_parser
from antkv_compile.demo import DEMO_CALIB_ITERS, DEMO_CALIB_TOKENS, demo_artifact_dir
from antkv_compile.eval_suite import QUICK, RECIPES, METHODS


def test_demo_defaults_are_the_quick_start_ones():
    assert (DEMO_CALIB_TOKENS, DEMO_CALIB_ITERS) == (2048, 10)
    args = build_parser().parse_args(["demo"])
    assert args.calib_tokens is None and args.calib_iters is None  # filled from the demo's constants


def test_eval_quick_reuses_the_demo_artifact():
    quick_antkv = [n for n in QUICK if METHODS[n].artifact]
    assert quick_antkv == ["antkv-1"]
    args = build_parser().parse_args(["eval", "--quick"])
    recipe = RECIPES[METHODS[quick_antkv[0]].artifact]
    d, r = _quick_artifact(args, Path(args.artifacts) / "x", recipe)
    assert d == demo_artifact_dir("1", "pre_rope") == Path("artifacts/smollm2-demo/antkv-1-pre-rope")
    assert r.key_options.iters == r.value_options.iters == DEMO_CALIB_ITERS and r.key_space == "pre_rope"


def test_eval_quick_on_another_model_keeps_its_own_artifacts():
    args = build_parser().parse_args(["eval", "--quick", "--model", "/some/model"])
    recipe = RECIPES["antkv-1"]
    assert _quick_artifact(args, Path("a/b"), recipe) == (Path("a/b"), recipe)
