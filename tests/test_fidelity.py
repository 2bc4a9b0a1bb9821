"""The long-context fidelity harness (issue 16): item generators, answer scoring, the forced-answer equivalence with
greedy decoding, the memory-light prefill, the gates, and a `--quick` smoke run through the CLI on the tiny model."""
import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from antkv_compile.fidelity import tasks as T
from antkv_compile.fidelity.runner import (ItemResult, _generate_forced, _score_steps, cell_table, gated_items,
                                           gates, sdpa_prefill, shared_cells)
from antkv_compile.models import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(bos=True)


def _needle_text(tok, it):
    return tok.decode(list(it.input_ids[it.needle_start:it.needle_start + it.needle_len]))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(task=st.sampled_from(T.TASKS), length=st.integers(700, 1500), depth=st.floats(0.0, 1.0),
       sample=st.integers(0, 50), seed=st.integers(0, 3))
def test_item_has_exact_length_needle_at_depth_and_is_seeded(tok, task, length, depth, sample, seed):
    it = T.make_item(tok, task, length, depth, seed=seed, sample=sample)
    again = T.make_item(tok, task, length, depth, seed=seed, sample=sample)
    assert it == again  # a pure function of its arguments
    assert len(it.input_ids) == length
    # the needle sits at the requested depth within the snapping tolerance (24 tokens)
    assert abs(it.depth_actual * it.haystack_len - depth * it.haystack_len) <= 24 + 1
    needle = _needle_text(tok, it)
    prompt = tok.decode(list(it.input_ids))
    if task == "passkey":
        assert needle == T.PASSKEY_NEEDLE.format(key=it.answer)
        assert prompt.endswith(T.PASSKEY_QUESTION) and len(it.answer) == 5
    else:
        key = needle.split(" for ")[1].split(" is: ")[0]
        assert needle == T.NIAH_NEEDLE.format(key=key, value=it.answer)
        assert prompt.endswith(T.NIAH_QUESTION.format(key=key)) and len(it.answer) == 7
        assert prompt.count(it.answer) == 1  # only the needle carries the value
    if task == "multikey":
        assert len(it.distractors) == 3 and it.answer not in it.distractors
        noun = key.split("-")[1]
        for value in it.distractors:  # each distractor: a similar key (same noun, another adjective), its own value
            assert prompt.count(value) == 1
            line = prompt[prompt.index(value) - 45:prompt.index(value)]
            assert f"-{noun} is: " in line and key not in line
    else:
        assert it.distractors == ()
    assert tok.decode(list(it.answer_ids)) == " " + it.answer


def test_items_differ_across_samples_and_seeds(tok):
    a = T.make_item(tok, "niah", 900, 0.5, seed=0, sample=0)
    assert a.input_ids != T.make_item(tok, "niah", 900, 0.5, seed=0, sample=1).input_ids
    assert a.input_ids != T.make_item(tok, "niah", 900, 0.5, seed=1, sample=0).input_ids
    grid = T.make_items(tok, ["passkey"], [700, 800], 3, 2)
    assert [(i.length, i.depth_index, i.sample) for i in grid] == [(L, d, s) for L in (700, 800) for d in range(3)
                                                                   for s in range(2)]
    assert [i.depth for i in grid[:6:2]] == [0.0, 0.5, 1.0]


def test_depth_extremes_and_short_lengths(tok):
    first = T.make_item(tok, "passkey", 800, 0.0)
    last = T.make_item(tok, "passkey", 800, 1.0)
    assert first.needle_start == first.haystack_start  # right after the instructions
    assert last.needle_start + last.needle_len == 800 - len(T._ids(tok, T.PASSKEY_QUESTION))  # right before the question
    with pytest.raises(ValueError, match="haystack tokens"):
        T.make_item(tok, "multikey", 300, 0.5)
    with pytest.raises(ValueError, match="calibration"):
        T.make_item(tok, "niah", 900, 0.5, text="calibration")
    with pytest.raises(ValueError, match="depth"):
        T.make_item(tok, "niah", 900, 1.5)


def test_niah_haystack_is_evaluation_prose(tok):
    from antkv_compile.texts import evaluation_text

    it = T.make_item(tok, "niah", 1200, 0.5, sample=3)
    hay = list(it.input_ids[it.haystack_start:it.needle_start])
    assert tok.decode(hay[:200]) in evaluation_text()


@pytest.mark.parametrize("generated,answer,ok", [
    (" 12345.", "12345", True), (" 12345<|im_end|>", "12345", True), ("12345", "12345", True),
    (" 123456", "12345", False), (" 1234", "12345", False), (" the key is 12345", "12345", True),
    (" 54321 12345", "12345", False), (" none", "12345", False), ("", "12345", False)])
def test_exact_match(generated, answer, ok):
    assert T.exact_match(generated, answer) is ok


@given(answer=st.from_regex(r"[1-9][0-9]{4,6}", fullmatch=True), tail=st.text(max_size=8),
       digit=st.sampled_from("0123456789"))
def test_exact_match_needs_the_whole_number(answer, tail, digit):
    tail = tail if not tail[:1].isdigit() else "." + tail
    assert T.exact_match(" " + answer + tail, answer)
    assert not T.exact_match(" " + answer + digit + tail, answer)
    assert not T.exact_match(" " + answer[:-1] + tail, answer)


def _logits_for(pred, vocab=101, hot=5.0):
    out = torch.zeros(len(pred), vocab)
    out[torch.arange(len(pred)), torch.tensor(pred)] = hot
    return out


def test_score_steps_exact_match_and_nll(tok):
    it = T.make_item(tok, "passkey", 800, 0.5)
    gold = list(it.answer_ids)
    dot, digit = tok.convert_tokens_to_ids("."), tok.convert_tokens_to_ids("7")
    cases = [(gold + [dot], True), (gold + [digit], False), (gold[:-1] + [digit, dot], gold[-1] == digit)]
    logits = torch.stack([_logits_for(p) for p, _ in cases])
    gold_t = torch.tensor([gold] * len(cases))
    res = _score_steps(tok, [it] * len(cases), gold_t, logits)
    assert [r.correct for r in res] == [ok for _, ok in cases]
    lp = torch.log_softmax(logits[0], -1)
    assert res[0].nll == pytest.approx(-sum(lp[j, g].item() for j, g in enumerate(gold)), rel=1e-5)
    assert res[0].predicted_number == it.answer and not res[0].distractor_hit
    assert res[1].nll == pytest.approx(res[0].nll, rel=1e-5)  # the free step does not count in the NLL


def test_forced_answer_equals_greedy_generation():
    """The harness forces the answer tokens and scores the argmax of each step; that equals greedy decoding:
    on the model's own greedy continuation every forced step agrees, and changing one gold token breaks it."""
    torch.manual_seed(0)
    model = tiny_model("llama")
    ids = torch.randint(4, 100, (2, 40), generator=torch.Generator().manual_seed(3))
    free = model.generate(ids, max_new_tokens=5, do_sample=False, cache_implementation="static", disable_compile=True,
                          pad_token_id=0)[:, 40:]
    logits, _ = _generate_forced(model, ids, free[:, :4], max_cache_len=64)
    assert logits.shape[:2] == (2, 5)
    assert torch.equal(logits.argmax(-1), free)  # each step's argmax is the greedy token
    wrong = free[:, :4].clone()
    wrong[:, 1] = (wrong[:, 1] + 1 - 4) % 96 + 4
    logits_w, _ = _generate_forced(model, ids, wrong, max_cache_len=64)
    assert not torch.equal(logits_w.argmax(-1)[:, :4], wrong)
    torch.testing.assert_close(logits_w[:, :2], logits[:, :2])  # identical until the changed token is fed


@pytest.mark.parametrize("kind", ["kivi", "exact"])
def test_sdpa_prefill_equals_store_attend(kind):
    from antkv_compile.numerics.scalar_quant import ScalarQuantizer
    from antkv_compile.numerics.store import ExactLayerStore, ScalarLayerStore, StoreGeometry

    g = torch.Generator().manual_seed(0)
    b, hkv, hq, d, t, scale = 2, 2, 6, 16, 90, 0.25
    geom = StoreGeometry(b, hkv, d, 128, torch.float32, torch.device("cpu"), scale)

    def make():
        return ScalarLayerStore(geom, ScalarQuantizer(2), 64, 32) if kind == "kivi" else ExactLayerStore(geom)

    q, k, v = torch.randn(b, hq, t, d, generator=g), torch.randn(b, hkv, t, d, generator=g), torch.randn(b, hkv, t, d, generator=g)
    ref, ours = make(), make()
    torch.testing.assert_close(sdpa_prefill(ours, q, k, v, scale), ref.attend(q, k, v), rtol=1e-4, atol=1e-5)
    assert (ours.n_coded, ours.n_window) == (ref.n_coded, ref.n_window) and ours.n_coded == (58 if kind == "kivi" else 0)
    q1, k1, v1 = torch.randn(b, hq, 1, d, generator=g), torch.randn(b, hkv, 1, d, generator=g), torch.randn(b, hkv, 1, d, generator=g)
    torch.testing.assert_close(ours.attend(q1, k1, v1), ref.attend(q1, k1, v1), rtol=1e-4, atol=1e-5)


def _results(task, cells):
    """cells: {(length, depth_index): (correct, n)} -> ItemResults."""
    out = []
    for (length, di), (c, n) in cells.items():
        for s in range(n):
            out.append(ItemResult(task, length, di, s, s < c, 1.0, 5, "", None, False))
    return out


def test_gates():
    full = cell_table(_results("passkey", {(1024, 0): (20, 20), (1024, 1): (19, 20), (2048, 0): (10, 20)}))
    two_ok = cell_table(_results("passkey", {(1024, 0): (19, 20), (1024, 1): (19, 20), (2048, 0): (0, 20)}))
    two_bad = cell_table(_results("passkey", {(1024, 0): (18, 20), (1024, 1): (19, 20), (2048, 0): (10, 20)}))
    one_ok = cell_table(_results("passkey", {(1024, 0): (19, 20), (1024, 1): (19, 20), (2048, 0): (0, 20)}))
    one_bad = cell_table(_results("passkey", {(1024, 0): (18, 20), (1024, 1): (18, 20), (2048, 0): (20, 20)}))
    g = gates({"full": full, "antkv-2": two_ok, "antkv-1": one_ok})["passkey"]
    assert (g["cells"], g["cells_gated"]) == (3, 2)  # the 50 % cell is reported, not gated
    assert g["full_accuracy_gated"] == pytest.approx(0.975)
    assert g["gate_2bit_within_one_sample"] and g["gate_1bit_95pct"]
    assert g["antkv-1"]["share_of_full"] == pytest.approx(0.95 / 0.975)
    g2 = gates({"full": full, "antkv-2": two_bad, "antkv-1": one_bad})["passkey"]
    assert not g2["gate_2bit_within_one_sample"] and g2["antkv-2"]["max_cell_diff_samples"] == 2
    assert g2["antkv-1"]["share_of_full"] == pytest.approx(0.9 / 0.975) and not g2["gate_1bit_95pct"]
    assert gates({"antkv-1": one_ok}) == {"note": "no full-precision run: nothing gated"}


def test_gated_cells_select_the_items_full_precision_passes():
    """--cells gated: the quantized methods run exactly the items of the cells full precision passes (>= 90 %), the
    table compares every method on the cells all of them ran, and the gates are those of an all-cells run."""
    full = cell_table(_results("passkey", {(1024, 0): (20, 20), (1024, 1): (18, 20), (2048, 0): (17, 20)})
                      + _results("niah", {(1024, 0): (0, 20)}))
    items = [T.Item(task, L, 0.0, di, s, (), "1", (), 0, 1, 0, 1)
             for task, L, di in [("passkey", 1024, 0), ("passkey", 1024, 1), ("passkey", 2048, 0), ("niah", 1024, 0)]
             for s in range(3)]
    kept = gated_items(items, {"full": full})
    assert {(it.task, it.length, it.depth_index) for it in kept} == {("passkey", 1024, 0), ("passkey", 1024, 1)}
    assert len(kept) == 6  # every sample of a kept cell
    with pytest.raises(SystemExit, match="full precision's cells first"):
        gated_items(items, {})
    one = cell_table(_results("passkey", {(1024, 0): (20, 20), (1024, 1): (17, 20)}))
    assert shared_cells({"full": full, "antkv-1": one}) == {("passkey", 1024, 0), ("passkey", 1024, 1)}
    assert shared_cells({"full": full}) == set(full)
    every = {**full, **one}  # the same method had it run every cell (the others at full's scores)
    assert gates({"full": full, "antkv-1": one}) == gates({"full": full, "antkv-1": every})


def test_quick_smoke_through_the_cli(tmp_path, capsys):
    """`antkv-compile fidelity --quick` on the tiny model: every task, full / antkv-1 (compiled, rewritten graphs,
    no fallback) / kivi-2 (harness), KL, JSON with the environment, one heatmap per method, the table last."""
    from antkv_compile.cli import main

    out, plots = tmp_path / "fid.json", tmp_path / "plots"
    rc = main(["fidelity", "--quick", "--model", "tiny-llama", "--recompile-per-length", "--quiet", "--save-items",
               "--artifacts", str(tmp_path / "art"), "--out", str(out), "--plots", str(plots)])
    assert rc == 0
    d = json.loads(out.read_text())
    assert set(d["methods"]) == {"full", "antkv-1", "kivi-2"}
    assert d["methods"]["full"]["path"] == "full" and d["methods"]["kivi-2"]["path"] == "harness"
    m = d["methods"]["antkv-1"]
    assert m["path"] == "compiled" and m["rewritten_graphs"] == m["compiled_graphs"] >= 4 and m["fallback_graphs"] == 0
    for name in d["methods"]:
        cells = d["methods"][name]["cells"]
        assert len(cells) == 3 * 2 * 2 and all(c["n"] == 1 for c in cells.values())
        assert (plots / f"fidelity_{name}.png").stat().st_size > 1000
    assert {"kl_mean", "kl_p99", "top1_changed"} <= set(d["kl"]["antkv-1"]) and d["kl"]["antkv-1"]["tokens"] == 255
    assert d["environment"]["device"] and d["environment"]["torch"] and d["environment"]["date"]
    assert d["environment"]["command"].startswith("antkv-compile fidelity --quick --model tiny-llama")
    printed = capsys.readouterr().out
    assert printed.rstrip().splitlines()[-1].startswith("└")  # the table comes last
    assert "gates [all]" in printed

    # --resume: the finished methods come from the JSON (nothing re-run), other protocols are refused
    args = ["fidelity", "--quick", "--model", "tiny-llama", "--quiet", "--artifacts", str(tmp_path / "art")]
    assert main(args + ["--resume", str(out), "--out", str(tmp_path / "again.json")]) == 0
    again = json.loads((tmp_path / "again.json").read_text())
    printed = capsys.readouterr().out
    assert "antkv-1          resumed from" in printed, printed
    assert {n: again["methods"][n]["cells"] for n in again["methods"]} == {n: d["methods"][n]["cells"] for n in d["methods"]}
    assert again["kl"]["antkv-1"] == d["kl"]["antkv-1"] and not again["partial"]
    with pytest.raises(SystemExit, match="another protocol"):
        main(args + ["--samples", "2", "--resume", str(out)])
    # a subset of a run that saved its items: the cells are rebuilt from those items
    assert main(args + ["--lengths", "512", "--methods", "full", "--kl-windows", "0", "--resume", str(out),
                        "--out", str(tmp_path / "sub.json")]) == 0
    sub = json.loads((tmp_path / "sub.json").read_text())
    assert sub["methods"]["full"]["cells"] == {k: c for k, c in d["methods"]["full"]["cells"].items()
                                               if k.split("/")[1] == "512"}

    # a run stopped by --stop-after inside antkv-1 resumes item by item: the items it did are kept, not re-run
    stopped = dict(d, partial=True, kl={})
    items = d["items"]["antkv-1"]
    stopped["unfinished"] = {"antkv-1": [dict(r, nll=123.0) for r in items[:5]]}
    stopped["methods"] = dict(d["methods"], **{"antkv-1": dict(d["methods"]["antkv-1"], cells={})})
    (tmp_path / "stopped.json").write_text(json.dumps(stopped))
    assert main(args + ["--save-items", "--resume", str(tmp_path / "stopped.json"), "--out", str(tmp_path / "on.json")]) == 0
    on = json.loads((tmp_path / "on.json").read_text())
    key = lambda r: (r["task"], r["length"], r["depth_index"], r["sample"])  # noqa: E731
    got = {key(r): r for r in on["items"]["antkv-1"]}
    assert sorted(got) == sorted(key(r) for r in items) and not on.get("unfinished")
    assert [got[key(r)]["nll"] for r in items[:5]] == [123.0] * 5  # kept from the stopped run
    assert [got[key(r)]["correct"] for r in items[5:]] == [r["correct"] for r in items[5:]]  # the rest re-run
    # and a stop: no batch starts after the deadline, the JSON keeps the method's items for --resume
    assert main(args + ["--stop-after", "1e-9", "--out", str(tmp_path / "stop.json")]) == 0
    stop = json.loads((tmp_path / "stop.json").read_text())
    assert stop["partial"] and stop["unfinished"] == {"full": []} and "stopped by --stop-after" in capsys.readouterr().out
