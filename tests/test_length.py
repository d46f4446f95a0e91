"""Length-aware evaluation: the reward model's length bias in eval (score vs length correlation) and the
length-controlled win rate in compare (AlpacaEval 2's GLM), by hand and at their edges, then end to end."""
import json
import math

import pytest
import torch

from conftest import igpt, write_jsonl
from instructgpt_cli.models import tiny_tokenizer
from instructgpt_cli.stats import (Z95, average_ranks, correlation, length_controlled_win_rate, sigmoid,
                                   wilson_interval)
from rule_rm import make_rule_rm, zero_but_norms


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def strict(obj) -> dict:
    return json.loads(json.dumps(obj, allow_nan=False))  # raises on NaN / inf


def test_lc_win_rate_against_the_two_group_hand_computation():
    """With d taking only +D and -D, x = tanh(d / sd) takes only +c and -c: the model is saturated, so the MLE
    fits each group's mean label, b0 = (logit p+ + logit p-) / 2, and (delta method) var b0 = (1 / (n+ p+ q+)
    + 1 / (n- p- q-)) / 4. Unequal group sizes and ties (0.5) included."""
    plus = [1, 1, 0, 0.5, 1, 1, 0]  # A longer by 6 tokens: p+ = 4.5 / 7
    minus = [0, 0, 1, 0.5, 0, 0.5, 1, 0, 0]  # A shorter by 6 tokens: p- = 3 / 9
    labels = plus + minus
    len_a, len_b = [10] * 7 + [4] * 9, [4] * 7 + [10] * 9
    r = length_controlled_win_rate(labels, len_a, len_b)
    pp, pm = 4.5 / 7, 3 / 9
    d = [6] * 7 + [-6] * 9
    sd = math.sqrt(sum((x - sum(d) / 16) ** 2 for x in d) / 15)
    c = math.tanh(6 / sd)
    b0, b1 = (logit(pp) + logit(pm)) / 2, (logit(pp) - logit(pm)) / (2 * c)
    assert r["length_diff_sd"] == pytest.approx(sd, abs=1e-12)
    assert r["win_rate"] == pytest.approx(sigmoid(b0), abs=1e-6)
    assert (r["intercept"], r["slope"]) == pytest.approx((b0, b1), abs=1e-6)
    se = math.sqrt((1 / (7 * pp * (1 - pp)) + 1 / (9 * pm * (1 - pm))) / 4)
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((sigmoid(b0 - Z95 * se), sigmoid(b0 + Z95 * se)), abs=1e-6)
    raw = sum(labels) / len(labels)
    assert abs(r["win_rate"] - raw) > 0.015  # the groups are unequal in size: controlling moves the rate
    # swapping A and B: labels 1 - y, differences -d -> exactly 1 - the rate, the interval mirrored
    s = length_controlled_win_rate([1 - y for y in labels], len_b, len_a)
    assert s["win_rate"] == pytest.approx(1 - r["win_rate"], abs=1e-12)
    assert (s["ci_low"], s["ci_high"]) == pytest.approx((1 - r["ci_high"], 1 - r["ci_low"]), abs=1e-12)


def test_a_length_bias_in_the_judge_is_removed():
    """A judge that prefers the longer response only: at equal length the two models are even (b0 = 0)."""
    labels = [1, 1, 1, 0] * 5 + [0, 0, 0, 1] * 3  # A wins 3/4 where longer, 1/4 where shorter
    len_a, len_b = [9] * 20 + [3] * 12, [3] * 20 + [9] * 12
    r = length_controlled_win_rate(labels, len_a, len_b)
    assert sum(labels) / len(labels) == pytest.approx(0.5625)  # raw: A looks better, for being longer more often
    assert r["win_rate"] == pytest.approx(0.5, abs=1e-9) and r["slope"] > 0


def test_equal_lengths_give_the_raw_rate_exactly():
    labels = [1, 0, 0.5, 1, 1, 0, 0.5]
    r = length_controlled_win_rate(labels, [5, 3, 7, 2, 9, 4, 4], [5, 3, 7, 2, 9, 4, 4])
    raw = sum(labels) / len(labels)
    assert r["win_rate"] == raw and (r["ci_low"], r["ci_high"]) == wilson_interval(raw, len(labels))
    assert r["slope"] is None and "equal length" in r["method"]


@pytest.mark.parametrize("winner", [1.0, 0.0])
def test_a_clean_sweep_is_the_raw_rate_not_an_infinite_intercept(winner):
    r = strict(length_controlled_win_rate([winner] * 6, [1, 5, 2, 8, 3, 3], [4, 4, 4, 4, 4, 1]))
    assert r["win_rate"] == winner and (r["ci_low"], r["ci_high"]) == wilson_interval(winner, 6)
    assert r["slope"] is None and "one way" in r["method"]


def test_judgments_separated_by_length_stay_finite_with_the_documented_prior():
    """A wins exactly where it is longer: the unpenalised slope runs off to infinity; the N(0, 2.5^2) prior
    on the slope keeps it finite, and by symmetry of the data the rate at equal length is 1/2."""
    len_a, len_b = [8, 9, 7, 2, 1, 3], [3, 3, 3, 7, 7, 7]
    r = strict(length_controlled_win_rate([1, 1, 1, 0, 0, 0], len_a, len_b))
    assert "prior" in r["method"] and 0 < r["slope"] < 100
    assert r["win_rate"] == pytest.approx(0.5, abs=1e-9) and 0 < r["ci_low"] < 0.5 < r["ci_high"] < 1
    r = strict(length_controlled_win_rate([1, 1, 1, 0, 0, 1], len_a, len_b))  # separated, skewed
    assert "prior" in r["method"] and 0.5 < r["win_rate"] < 1


def test_one_judgment_no_judgments_and_all_ties():
    one = strict(length_controlled_win_rate([1.0], [3], [3]))
    assert one["win_rate"] == 1.0 and one["n"] == 1
    differs = strict(length_controlled_win_rate([1.0], [5], [3]))
    assert differs["win_rate"] is None and "cannot be told apart" in differs["method"]
    same_gap = strict(length_controlled_win_rate([1, 0, 1], [5, 6, 7], [3, 4, 5]))
    assert same_gap["win_rate"] is None
    none = strict(length_controlled_win_rate([], [], []))
    assert none["win_rate"] is None and none["n"] == 0
    ties = length_controlled_win_rate([0.5] * 5, [1, 2, 3, 4, 5], [3] * 5)
    assert ties["win_rate"] == pytest.approx(0.5, abs=1e-12) and ties["slope"] == pytest.approx(0, abs=1e-12)


def test_compare_maps_winners_to_labels_and_counts_tokens_without_eos():
    from instructgpt_cli.stages.compare import length_control

    eos = 2
    js = [{"winner": w, "a": a, "b": b, "a_ids": ai, "b_ids": bi} for w, a, b, ai, bi in [
        ("A", "one two three", "x", [5, 6, 7, eos], [8]),
        ("tie", "one", "x y", [5], [8, 9, eos]),
        ("B", "", "x y z", [eos], [8, 9, 10, 11]),
        ("A", "a b", "c", [5, 6, 7, 8], [9])]]
    out = length_control(js, eos)
    assert out["mean_length"] == {"a": {"tokens": (3 + 1 + 0 + 4) / 4, "words": (3 + 1 + 0 + 2) / 4},
                                  "b": {"tokens": (1 + 2 + 4 + 1) / 4, "words": (1 + 2 + 3 + 1) / 4}}
    expect = length_controlled_win_rate([1, 0.5, 0, 1], [3, 1, 0, 4], [1, 2, 4, 1])
    assert out["length_controlled"] == {**expect, "length_unit": "tokens"}
    old = [{k: v for k, v in j.items() if not k.endswith("_ids")} for j in js]  # an older session: no ids
    out = length_control(old, eos)
    assert out["length_controlled"]["length_unit"] == "words" and out["mean_length"]["a"]["tokens"] is None
    assert out["length_controlled"]["win_rate"] == expect_words(js)


def expect_words(js):
    return length_controlled_win_rate([1, 0.5, 0, 1], [len(j["a"].split()) for j in js],
                                      [len(j["b"].split()) for j in js])["win_rate"]


def test_correlations_by_hand_with_tied_ranks():
    assert average_ranks([5, 1, 5]) == [2.5, 1, 2.5] and average_ranks([3, 3, 3, 0]) == [3, 3, 3, 1]
    r = correlation([1, 2, 2, 3], [1, 3, 2, 5])
    # Pearson: deviations (-1, 0, 0, 1) and (-1.75, .25, -.75, 2.25): 4 / sqrt(2 * 8.75)
    assert r["pearson"] == pytest.approx(4 / math.sqrt(17.5), abs=1e-12)
    # Spearman: ranks (1, 2.5, 2.5, 4) and (1, 3, 2, 4): 4.5 / sqrt(4.5 * 5)
    assert r["spearman"] == pytest.approx(4.5 / math.sqrt(22.5), abs=1e-12) and r["n"] == 4
    assert correlation([3, 2, 1], [1, 2, 3])["spearman"] == pytest.approx(-1.0)


def test_correlation_is_null_with_a_reason_never_nan():
    for xs, ys, why in [([4, 4, 4, 4], [1, 2, 3, 4], "same length"), ([1, 2, 3], [0.5] * 3, "same score"),
                        ([1, 2], [1, 2], "fewer than 3"), ([], [], "fewer than 3")]:
        r = strict(correlation(xs, ys))
        assert r["pearson"] is None and r["spearman"] is None and why in r["reason"]


# --- end to end: eval and compare on hand-built tiny models -------------------------------------------------


def make_coin_lm(path, tokenizer, tokens: list[str]):
    """A causal LM whose next token is (almost exactly) uniform over ``tokens`` after any input: sampled at
    temperature 1 its responses end at a random length."""
    from transformers import LlamaForCausalLM

    from instructgpt_cli.models import tiny_config

    model = LlamaForCausalLM(tiny_config(tokenizer))
    with torch.no_grad():
        zero_but_norms(model)
        emb = model.model.embed_tokens.weight  # tied to the LM head
        emb[:, 0] = 1.0
        for t in tokens:
            emb[tokenizer.convert_tokens_to_ids(t), 0] = 3.0
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def coin_run(tmp_path_factory):
    """A: 'e', space or EOS at random; B: 'x' always; the rule RM scores the share of 'e' minus that of spaces."""
    from rule_rm import make_constant_lm

    t = tmp_path_factory.mktemp("length")
    tok = tiny_tokenizer()
    make_rule_rm(t / "run" / "rm" / "final", tok, "e", minus="Ġ")
    make_coin_lm(t / "coin", tok, ["e", "Ġ", tok.eos_token])
    make_constant_lm(t / "xer", tok, "x")
    write_jsonl(t / "prompts.jsonl", [{"prompt": f"Tell me about {w}."} for w in
                                      "cats dogs rain snow tea maps bread lamps owls ink salt figs".split()])
    return t


def test_eval_reports_the_rm_length_bias_and_compare_the_lc_win_rate(coin_run):
    t, run_dir = coin_run, coin_run / "run"
    common = ["--prompts", t / "prompts.jsonl", "--run-dir", run_dir, "--max-new-tokens", "8", "--temperature", "1"]
    result = igpt("eval", t / "coin", *common, "--sft", t / "coin")
    assert result.exit_code == 0, result.output
    assert "length bias" in result.output and "Spearman" in result.output
    report = json.loads((run_dir / "eval" / "coin" / "report.json").read_text())
    samples = [json.loads(line) for line in (run_dir / "eval" / "coin" / "samples.jsonl").read_text().splitlines()]
    eos = tiny_tokenizer().eos_token_id
    tokens = [len(s["response_ids"]) - (s["response_ids"][-1:] == [eos]) for s in samples]
    assert len(set(tokens)) > 2 and any(s["response_ids"][-1:] == [eos] for s in samples)  # lengths vary, some end
    bias = report["length_bias"]
    assert bias["n"] == 12 and bias["tokens"] == correlation(tokens, [s["score"] for s in samples])
    assert bias["words"] == correlation([len(s["response"].split()) for s in samples], [s["score"] for s in samples])
    assert -1 <= bias["tokens"]["pearson"] <= 1 and -1 <= bias["tokens"]["spearman"] <= 1

    args = ["--prompts", t / "prompts.jsonl", "--run-dir", run_dir, "--max-new-tokens", "4", "--temperature", "1"]
    result = igpt("compare", t / "coin", t / "xer", *args)
    assert result.exit_code == 0, result.output
    assert "length-controlled win rate" in result.output
    out = run_dir / "compare" / "coin-vs-xer"
    ab = json.loads((out / "report.json").read_text())
    pairs = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    a_tokens = [len(p["a_ids"]) - (p["a_ids"][-1:] == [eos]) for p in pairs]
    assert ab["mean_length"]["a"] == {"tokens": sum(a_tokens) / 12,
                                      "words": sum(len(p["a"].split()) for p in pairs) / 12}
    assert ab["mean_length"]["b"] == {"tokens": 4.0, "words": 1.0}  # 'xxxx', never an EOS
    lc = ab["length_controlled"]
    assert lc["n"] == 12 and lc["length_unit"] == "tokens"
    assert 0 <= lc["ci_low"] <= lc["win_rate"] <= lc["ci_high"] <= 1 and math.isfinite(lc["slope"])
    page = (out / "report.html").read_text()
    assert f"Length-controlled win rate of coin: {lc['win_rate']:.1%}" in page
    from test_report import parse

    parse(page)  # strict HTML5
    assert igpt("compare", t / "xer", t / "coin", *args).exit_code == 0
    ba = json.loads((run_dir / "compare" / "xer-vs-coin" / "report.json").read_text())
    assert ba["length_controlled"]["win_rate"] == pytest.approx(1 - lc["win_rate"], abs=1e-9)


def test_compare_at_one_constant_length_gap_says_why_there_is_no_lc_rate(coin_run, tmp_path):
    """Both models greedy: A always stops at once, B always says 'xxxx': every gap is -4, so length and model
    cannot be told apart; the rate is null in report.json and the page says why."""
    from rule_rm import make_constant_lm

    t, tok = coin_run, tiny_tokenizer()
    make_constant_lm(tmp_path / "stopper", tok, tok.eos_token)
    result = igpt("compare", tmp_path / "stopper", t / "xer", "--prompts", t / "prompts.jsonl", "--run-dir",
                  tmp_path / "run", "--rm", t / "run" / "rm" / "final", "--max-new-tokens", "4", "--temperature", "0")
    assert result.exit_code == 0, result.output
    out = tmp_path / "run" / "compare" / "stopper-vs-xer"
    lc = json.loads((out / "report.json").read_text())["length_controlled"]
    assert lc["win_rate"] is None and "cannot be told apart" in lc["method"]
    page = (out / "report.html").read_text()
    assert "Length-controlled win rate: <span class='na'>not available (every pair differs" in page
