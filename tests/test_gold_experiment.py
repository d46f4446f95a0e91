"""examples/gold/run.py (`make gold`): the gold-judged experiment's pipeline (sft -> sample -> label by the gold
judge -> train-rm -> ppo --watch gold -> compare ppo@best --judge gold), run with --tiny on the random
tiny model and a rule judge in place of VADER; the full-size run is `make gold`, not a test."""
import importlib.util
import json

import pytest

from conftest import REPO, igpt
from instructgpt_cli.stats import clustered_rate, wilson_interval

RULE = '''
def score(prompt, responses):
    return [float(r.count("e")) - 0.1 * len(r) for r in responses]
'''


def load_driver():
    spec = importlib.util.spec_from_file_location("gold_run", REPO / "examples" / "gold" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def in_process(*args):
    result = igpt(*args)
    assert result.exit_code == 0, (args, result.stdout, result.stderr)


def test_the_tiny_experiment_writes_its_frontier_win_rate_and_summary(tmp_path, monkeypatch):
    (tmp_path / "goldrule.py").write_text(RULE, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    run = tmp_path / "run"
    summary = load_driver().main(["--tiny", "--run-dir", str(run), "--judge", "python:goldrule:score",
                                  "--also-frontier"], in_process)

    # the gold judge ranked the SFT model's samples, and the reward model was trained on its rankings
    samples = [json.loads(x) for x in (run / "gold-data" / "samples.jsonl").read_text().splitlines()]
    rankings = [json.loads(x) for x in (run / "gold-data" / "rankings.jsonl").read_text().splitlines()]
    assert len(samples) == 12 and all(len(s["responses"]) == 3 for s in samples)
    assert rankings and all(r["judge"] == "python:goldrule:score" for r in rankings)
    # each ranking carries its prompt's message as "group" (prompts -> sample -> label), so train-rm holds out
    # a message's rankings together
    assert all(r["group"] == r["prompt"].split('"')[1] for r in samples + rankings)
    assert (run / "rm" / "final").is_dir() and (run / "ppo" / "final" / "policy").is_dir()
    # the watch: the SFT point, then every 2 iterations (tiny.yaml's watch_every), the rule's gold beside the proxy
    watch = json.loads((run / "ppo" / "watch.json").read_text())
    assert [p["step"] for p in watch["points"]] == [0, 2, 4] and watch["points"][0]["kl"] == 0.0
    golds = [p["gold"] for p in watch["points"]]
    assert watch["best"]["step"] == watch["points"][golds.index(max(golds))]["step"]
    assert (run / "ppo" / "best" / "model.safetensors").is_file()
    # the watch answered the validation prompts, which share no message with the held-out ones of compare
    valid = {json.loads(x)["prompt"] for x in (run / "gold-data" / "watch_prompts.jsonl").read_text().splitlines()}
    held = {json.loads(x)["prompt"] for x in (run / "gold-data" / "compare_prompts.jsonl").read_text().splitlines()}
    assert len(valid) == 4 and len(held) == 8 and not {p.split('"')[1] for p in valid} & {p.split('"')[1] for p in held}
    # the recipe keeps the watch's best point; its win rate and the final policy's on the held-out prompts
    picked = "ppo" if watch["best"]["step"] == 4 else "ppo@best"
    saved = json.loads((run / "gold-summary.json").read_text())
    assert saved == summary and saved["picked"] == picked
    # the win rates' intervals are clustered by message: the 8 held-out prompts are 2 whole messages x 4 framings
    group_of = {json.loads(x)["prompt"]: json.loads(x)["group"]
                for x in (run / "gold-data" / "compare_prompts.jsonl").read_text().splitlines()}
    for key, model in (("picked_vs_sft", picked), ("final_vs_sft", "ppo")):
        folder = run / "compare" / f"{model.replace('@', '-')}-vs-sft.python-goldrule-score"
        compare = json.loads((folder / "report.json").read_text())
        assert compare["wins"] + compare["ties"] + compare["losses"] == 8
        assert saved[key]["win_rate"] == pytest.approx(compare["win_rate"]) and saved[key]["model"] == model
        by_message: dict = {}
        for j in map(json.loads, (folder / "judgments.jsonl").read_text().splitlines()):
            won = {"A": 1.0, "tie": 0.5, "B": 0.0}[j["winner"]]
            by_message.setdefault(group_of[j["prompt"]], []).append(won)
        expected = clustered_rate([sum(v) for v in by_message.values()], [len(v) for v in by_message.values()])
        assert saved[key]["groups"] == compare["groups"] == len(set(group_of.values())) == len(by_message) == 2
        assert (compare["ci_low"], compare["ci_high"]) == pytest.approx((expected["ci_low"], expected["ci_high"]))
        assert (saved[key]["ci_low"], saved[key]["ci_high"]) == (compare["ci_low"], compare["ci_high"])
        rate = compare["win_rate"]  # Wilson's over the 8 prompts as if independent, kept beside it
        assert saved[key]["ci_iid"] == compare["ci_iid"] == pytest.approx(list(wilson_interval(rate, 8)))
        assert "clustered by the prompts' group" in compare["ci_method"]
    assert [p["gold"] for p in saved["watched"]] == golds
    assert set(saved["seconds"]) == {"sft", "sample", "label", "train-rm", "ppo", "frontier", "compare"}
    assert saved["watch_seconds"] == pytest.approx(sum(p["seconds"] for p in watch["points"]), abs=0.1)

    # --also-frontier: the earlier recipe on the same run, every checkpoint kept and the frontier drawn afterwards
    # on the same validation prompts; its pick is the PPO checkpoint of best gold there, compared with SFT too
    frontier = json.loads((run / "eval" / "ppo-frontier" / "report.json").read_text())
    assert [p["step"] for p in frontier["points"]] == [0, 2, 4] and frontier["gold"] == "python:goldrule:score"
    answered = [json.loads(x)["prompt"] for x in
                (run / "eval" / "ppo-frontier" / "samples" / "step-000000.jsonl").read_text().splitlines()]
    assert set(answered) == valid
    later = [p for p in frontier["points"] if p["step"] > 0]
    best = max(later, key=lambda p: p["gold_mean"])
    expected_pick = "ppo" if best["step"] == 4 else f"ppo@step-{best['step']}"
    assert saved["frontier"]["picked"] == expected_pick
    assert saved["frontier"]["points"][1]["gold"] == pytest.approx(frontier["points"][1]["gold_mean"])
    folder = run / "compare" / f"{expected_pick.replace('@', '-')}-vs-sft.python-goldrule-score"
    assert saved["frontier"]["picked_vs_sft"]["win_rate"] == pytest.approx(
        json.loads((folder / "report.json").read_text())["win_rate"])


def test_the_recipe_keeps_the_watch_s_best_point_named_as_compare_names_it():
    pick = load_driver().pick

    def watch(best, last):
        return {"points": [{"step": s} for s in range(0, last + 1, 4)], "best": {"step": best}}

    assert pick(watch(8, 24)) == "ppo@best"
    assert pick(watch(0, 24)) == "ppo@best"  # the SFT point stayed best: ppo/best/ holds the SFT weights
    assert pick(watch(24, 24)) == "ppo"      # the final policy, by compare's name for it


def test_the_earlier_recipe_picks_the_frontier_s_best_ppo_checkpoint():
    pick = load_driver().pick_frontier

    def frontier(*golds):
        labels = ["sft", *(f"step-{8 * i}" for i in range(1, len(golds) - 1)), f"final (step {8 * (len(golds) - 1)})"]
        return {"points": [{"label": lab, "step": 8 * i, "gold_mean": g}
                           for i, (lab, g) in enumerate(zip(labels, golds))]}

    assert pick(frontier(0.9, 0.1, 0.3, 0.2)) == "ppo@step-16"  # the SFT point is no candidate, however high
    assert pick(frontier(0.0, 0.4, 0.4, 0.1)) == "ppo@step-8"   # the first of equal golds
    assert pick(frontier(0.0, 0.1, 0.2, 0.5)) == "ppo"          # the final policy, by compare's name for it


def test_the_vader_gold_scores_tone_not_length():
    """gold_judge.score: VADER's compound valence, 0 for an empty or neutral text, unchanged by neutral words (the
    positive share it replaced scored "Congratulations!" 1.0 and the same reply with five more words 0.51, so the
    judge paid for brevity), higher for more warmth."""
    pytest.importorskip("vaderSentiment")
    spec = importlib.util.spec_from_file_location("gold_judge", REPO / "examples" / "gold" / "gold_judge.py")
    gold = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gold)
    good, bad, neutral = "I love it, thank you so much!", "This is awful and I hate it.", "The bus leaves at noon."
    s = gold.score("any prompt", [good, bad, neutral, "", f"{good} {neutral}", f"{neutral} {good}"])
    assert s[0] > 0 > s[1] and s[2] == 0.0 and s[3] == 0.0
    assert s[4] == s[5] == s[0]  # neutral words before or after: no dilution, no bonus
    short, padded = gold.score("p", ["Congratulations!", "Congratulations! We will see you there then."])
    assert short == padded > 0
    warm, warmer = gold.score("p", ["Congratulations!", "Congratulations, that is wonderful news!"])
    assert warmer > warm


def test_the_learning_curve_measures_every_size_on_the_same_held_out_rankings(tmp_path):
    """examples/gold/learning_curve.py on the tiny model and marker rankings: one held-out split for every size,
    train-rm on the first N of the rest, eval's held-out pair accuracy of each; a size past the pool stops there."""
    from conftest import TINY_CONFIG, arithmetic_demos, marker_rankings, write_jsonl

    write_jsonl(tmp_path / "demos.jsonl", arithmetic_demos(16))
    assert igpt("sft", "--config", TINY_CONFIG, "--data", tmp_path / "demos.jsonl", "--run-dir", tmp_path / "base",
                "--max-steps", "2").exit_code == 0
    rankings = write_jsonl(tmp_path / "ranks.jsonl", marker_rankings(40))
    spec = importlib.util.spec_from_file_location("learning_curve", REPO / "examples" / "gold" / "learning_curve.py")
    curve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(curve)
    run = tmp_path / "curve"
    result = curve.main(["--rankings", str(rankings), "--sft", str(tmp_path / "base" / "sft" / "final"), "--config",
                         str(TINY_CONFIG), "--run-dir", str(run), "--sizes", "10,20,100", "--heldout-fraction",
                         "0.25"], in_process)
    assert [r["rankings"] for r in result["rows"]] == [10, 20, 30]  # 40 - 10 held out: 100 stops at 30
    held = {json.loads(x)["prompt"] for x in (run / "heldout.jsonl").read_text().splitlines()}
    assert len(held) == 10
    for r in result["rows"]:
        train = [json.loads(x)["prompt"] for x in (run / f"n-{r['rankings']}" / "train.jsonl").read_text().splitlines()]
        assert len(train) == r["rankings"] and not held & set(train)
        report = json.loads((run / f"n-{r['rankings']}" / "eval" / "heldout" / "report.json").read_text())
        assert r["accuracy"] == report["rm_accuracy"] and r["heldout_rankings"] == 10
        assert r["ci"][0] <= r["accuracy"] <= r["ci"][1]
    assert json.loads((run / "learning-curve.json").read_text()) == result
    # an option measured against the recipe: the same split and sizes, the option in every reward model it trains
    pooled = curve.main(["--rankings", str(rankings), "--sft", str(tmp_path / "base" / "sft" / "final"), "--config",
                         str(TINY_CONFIG), "--run-dir", str(tmp_path / "pooled"), "--sizes", "10", "--heldout-fraction",
                         "0.25", "--rm-args", "--score mean"], in_process)
    assert (tmp_path / "pooled" / "heldout.jsonl").read_text() == (run / "heldout.jsonl").read_text()
    assert pooled["rm_args"] == "--score mean" and [r["rankings"] for r in pooled["rows"]] == [10]
    config = json.loads((tmp_path / "pooled" / "n-10" / "rm" / "final" / "config.json").read_text())
    assert config["igpt_reward_pool"] == "mean"
    # --versus the recipe's run: the difference at each size, paired by ranking, from the two eval reports
    from instructgpt_cli.stats import paired_rate_difference

    against = curve.main(["--rankings", str(rankings), "--sft", str(tmp_path / "base" / "sft" / "final"), "--config",
                          str(TINY_CONFIG), "--run-dir", str(tmp_path / "pooled"), "--sizes", "10",
                          "--heldout-fraction", "0.25", "--rm-args", "--score mean", "--versus", str(run)], in_process)
    (row,) = against["versus"]["rows"]
    mine, theirs = (json.loads((d / "n-10" / "eval" / "heldout" / "report.json").read_text())
                    for d in (tmp_path / "pooled", run))
    d = paired_rate_difference(mine["rm_correct_by_ranking"], theirs["rm_correct_by_ranking"],
                               mine["rm_pairs_by_ranking"])
    assert row["difference"] == pytest.approx(mine["rm_accuracy"] - theirs["rm_accuracy"])
    assert row["ci"] == [d["ci_low"], d["ci_high"]] and d["ci_low"] <= row["difference"] <= d["ci_high"]
    with pytest.raises(SystemExit, match="held out other rankings"):  # another split: no pairing
        curve.main(["--rankings", str(rankings), "--sft", str(tmp_path / "base" / "sft" / "final"), "--config",
                    str(TINY_CONFIG), "--run-dir", str(tmp_path / "other"), "--sizes", "10", "--heldout-fraction",
                    "0.25", "--seed", "3", "--versus", str(run)], in_process)
    with pytest.raises(SystemExit, match="use another --run-dir"):  # its models are not the recipe's: never resumed
        curve.main(["--rankings", str(rankings), "--sft", str(tmp_path / "base" / "sft" / "final"), "--config",
                    str(TINY_CONFIG), "--run-dir", str(run), "--sizes", "10", "--rm-args", "--score mean"], in_process)


def load_example(name, *parts):
    spec = importlib.util.spec_from_file_location(name, REPO.joinpath("examples", "gold", *parts))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readability_gold_is_flesch_s_reading_ease_by_hand():
    """readability_judge.score (the explain task's gold): 206.835 - 1.015 words/sentence - 84.6 syllables/word,
    clipped to 0-100 and over 100; a ratio, so the same text twice scores the same; 0 for an empty text."""
    pytest.importorskip("textstat")
    judge = load_example("readability_judge", "readability_judge.py")
    # 13 words, 1 sentence, 15 syllables (be-cause, scat-ters): 206.835 - 1.015 * 13 - 84.6 * 15 / 13 = 96.02
    plain = "The sky looks blue because air scatters blue light more than red light."
    # 9 words, 1 sentence, 28 syllables: far below 0, clipped
    dense = "Photosynthesis constitutes the biochemical mechanism whereby chlorophyllous organisms synthesize sugars."
    s = judge.score("any prompt", [plain, f"{plain} {plain}", dense, "", "   ", "Yes. It is. Go."])
    assert s[0] == pytest.approx((206.835 - 1.015 * 13 - 84.6 * 15 / 13) / 100, abs=1e-3)
    assert s[1] == pytest.approx(s[0], abs=1e-3)  # twice as long, as easy: not paid for length
    assert s[2] == 0.0 and s[3] == 0.0 and s[4] == 0.0
    assert s[5] == 1.0  # tiny sentences of one-syllable words: above 100, clipped (the judge's own blind spot)


def test_the_explain_task_s_prompts_are_split_by_topic():
    """explain/prompts_*.jsonl: 100 topics x 4 framings, 60/20/20 topics for training, validation and held out,
    no topic in two sets (the prompts' group), every framing of a topic in its set."""
    folder = REPO / "examples" / "gold" / "explain"
    sets = {name: [json.loads(x) for x in (folder / f"prompts_{name}.jsonl").read_text().splitlines()]
            for name in ("train", "valid", "heldout")}
    assert {k: len(v) for k, v in sets.items()} == {"train": 240, "valid": 80, "heldout": 80}
    topics = {k: {r["group"] for r in v} for k, v in sets.items()}
    assert [len(t) for t in topics.values()] == [60, 20, 20]
    assert not (topics["train"] & topics["valid"] or topics["train"] & topics["heldout"]
                or topics["valid"] & topics["heldout"])
    for rows in sets.values():
        for topic in {r["group"] for r in rows}:
            framed = [r["prompt"] for r in rows if r["group"] == topic]
            assert len(set(framed)) == 4 and all(topic in p for p in framed)


def test_the_explain_task_runs_the_same_driver_with_its_prompts_judge_and_length(tmp_path):
    """--task explain: the same stages and config as the first task, on the explain prompts, judged by the
    readability gold (its default judge), every sampling command at the task's 64 new tokens."""
    pytest.importorskip("textstat")
    calls = []

    def recording(*args):
        calls.append(args)
        in_process(*args)

    run = tmp_path / "run"
    summary = load_driver().main(["--tiny", "--task", "explain", "--run-dir", str(run)], recording)
    assert summary["task"] == "explain" and summary["judge"] == "python:readability_judge:score"
    explain = REPO / "examples" / "gold" / "explain"
    train = {json.loads(x)["prompt"] for x in (explain / "prompts_train.jsonl").read_text().splitlines()}
    heldout = {json.loads(x)["prompt"] for x in (explain / "prompts_heldout.jsonl").read_text().splitlines()}
    samples = [json.loads(x) for x in (run / "gold-data" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 12 and {s["prompt"] for s in samples} <= train
    rankings = [json.loads(x) for x in (run / "gold-data" / "rankings.jsonl").read_text().splitlines()]
    assert rankings and all(r["judge"] == "python:readability_judge:score" for r in rankings)
    compared = [json.loads(x)["prompt"] for x in (run / "gold-data" / "compare_prompts.jsonl").read_text().splitlines()]
    assert set(compared) <= heldout
    sampling = [c for c in calls if c[0] in ("sample", "ppo", "compare")]
    assert {c[0] for c in sampling} == {"sample", "ppo", "compare"}
    for c in sampling:
        assert c[c.index("--max-new-tokens") + 1] == "64", c
    assert all("--max-new-tokens" not in c for c in calls if c[0] in ("sft", "label", "train-rm"))
