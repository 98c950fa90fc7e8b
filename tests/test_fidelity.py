"""edge/fidelity.py, Engine.score/evaluate and `edge eval`: the figures against ones computed by hand."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import run_edge

import edge
from edge import fidelity

TEXT = ("Once upon a time there was a little girl who loved the sea. Every morning she walked to the beach with her "
        "dog and looked for shells. One day she found a shell that was as big as her hand, and it sang.")


def test_figures_of_two_tiny_distributions_by_hand():
    # Two positions over a vocabulary of 3; the targets are tokens 0 and 2.
    ref = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]]))
    got = np.log(np.array([[0.5, 0.4, 0.1], [0.2, 0.5, 0.3]]))
    figures = fidelity.Figures()
    figures.add(got[:1] + 3.0, [0], ref[:1] - 1.0)  # logits, not log-probs: shifts must not matter
    figures.add(got[1:], [2], ref[1:])
    out = figures.result()
    kl = sum(p * (math.log(p) - math.log(q)) for p, q in zip([0.7, 0.2, 0.1], [0.5, 0.4, 0.1])) + \
        sum(p * (math.log(p) - math.log(q)) for p, q in zip([0.1, 0.3, 0.6], [0.2, 0.5, 0.3]))
    assert out["text_tokens"] == 2
    assert out["perplexity"] == pytest.approx(math.exp(-(math.log(0.5) + math.log(0.3)) / 2))
    assert out["perplexity_reference"] == pytest.approx(math.exp(-(math.log(0.7) + math.log(0.6)) / 2))
    assert out["perplexity_ratio"] == pytest.approx(out["perplexity"] / out["perplexity_reference"])
    assert out["top1_agreement"] == 0.5  # argmax 0/0 agree; 2 vs 1 do not
    assert out["mean_kl"] == pytest.approx(kl / 2)


def test_a_model_against_itself_loses_nothing():
    logits = np.random.default_rng(0).standard_normal((5, 11))
    out = fidelity.measure([(logits, [1, 2, 3, 4, 5])], iter([(logits, [1, 2, 3, 4, 5])]))
    assert out["perplexity_ratio"] == pytest.approx(1) and out["top1_agreement"] == 1
    assert abs(out["mean_kl"]) < 1e-12


@pytest.mark.parametrize("n, size, want", [(10, 4, [4, 4, 2]), (9, 4, [4, 4]), (3, 8, [3]), (1, 8, [])])
def test_windows_cover_the_text_in_order(n, size, want):
    cut = fidelity.windows(list(range(n)), size)
    assert [len(w) for w in cut] == want
    assert sum(cut, []) == list(range(n))[:sum(want)]


def test_other_tokens_in_the_reference_are_refused():
    logits = np.zeros((1, 4))
    with pytest.raises(ValueError, match="other tokens"):
        fidelity.measure([(logits, [1])], iter([(logits, [2])]))


@pytest.fixture(scope="module")
def pair(exports):
    """stories260K int4 and its fp32 reference."""
    return edge.load(exports.bundle("stories260K", "int4")), edge.load(exports.bundle("stories260K", "fp32"))


def test_score_is_every_log_probability_at_every_position(pair):
    engine, _ = pair
    ids = engine.encode(TEXT)
    scores = engine.score(ids)
    assert scores.shape == (len(ids) - 1, engine.bundle.manifest["model"]["vocab_size"])
    np.testing.assert_allclose(np.exp(scores).sum(-1), 1, rtol=1e-5)
    np.testing.assert_allclose(scores[np.arange(len(ids) - 1), ids[1:]], engine.logprobs(ids), rtol=1e-6)
    with pytest.raises(ValueError, match="do not fit the context"):
        engine.score(list(ids) * 20)


def test_edge_eval_reports_the_figures_computed_by_hand(pair, exports, tmp_path):
    engine, fp32 = pair
    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    ids = engine.encode(TEXT)
    got, ref = engine.score(ids), fp32.score(ids)
    rows = np.arange(len(ids) - 1)
    want = {"text_tokens": len(ids) - 1,
            "perplexity": float(np.exp(-got[rows, ids[1:]].mean())),
            "perplexity_reference": float(np.exp(-ref[rows, ids[1:]].mean())),
            "top1_agreement": float((got.argmax(-1) == ref.argmax(-1)).mean()),
            "mean_kl": float((np.exp(ref) * (ref - got)).sum(-1).mean())}
    out = json.loads(run_edge("eval", str(exports.bundle("stories260K", "int4")), "--text", str(text), "--reference",
                              str(exports.bundle("stories260K", "fp32")), "--json").stdout)
    for key, value in want.items():
        assert out[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert out["perplexity_ratio"] == pytest.approx(want["perplexity"] / want["perplexity_reference"], rel=1e-4)
    plain = run_edge("eval", str(exports.bundle("stories260K", "int4")), "--text", str(text)).stdout
    assert f"perplexity {want['perplexity']:.4f}" in plain and "agreement" not in plain


def test_evaluate_scores_a_long_text_in_windows(pair):
    engine, fp32 = pair
    ids = engine.encode(TEXT)
    whole, halves = engine.evaluate(ids, fp32), engine.evaluate(ids, fp32, window=len(ids) // 2 + 1)
    assert halves["text_tokens"] == whole["text_tokens"] - 1  # the second window's first token is context only
    assert halves["perplexity"] != whole["perplexity"]


def test_eval_of_a_missing_text_is_one_clear_line(exports, tmp_path):
    result = run_edge("eval", str(exports.bundle("stories260K", "int4")), "--text", str(tmp_path / "nope.txt"),
                      check=False)
    assert result.returncode != 0 and "no such file" in result.stderr and "Traceback" not in result.stderr


def test_a_reference_of_another_model_is_refused(exports):
    other = edge.load(exports.bundle("tinyllama"))
    with pytest.raises(ValueError, match="(tokenizer|wide)"):
        edge.load(exports.bundle("stories260K", "int4")).evaluate(TEXT, other)
