"""igpt ppo --watch: the over-optimisation watch on tiny models. A watched run trains exactly as an unwatched
one, keeps the policy of its best gold point as ppo/best/ (ppo@best), stops after --watch-patience watches
without a new best while the proxy rose (and not one watch earlier), resumes bit-identical with its watch
state, and refuses a bad judge before anything is written."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import igpt, write_jsonl
from instructgpt_cli.models import load_trained_policy, tiny_tokenizer
from instructgpt_cli.rundir import read_manifest, read_metrics
from test_ppo import world  # noqa: F401  (the fixture `setting` extends)

RULE = '''
def score(prompt, responses):
    return [r.count("a") - 0.5 * r.count(" ") for r in responses]
'''

# a judge whose gold follows a script, one value per watch: every response of watch w scores GOLD[w]
SCRIPTED = '''
import os
CALLS = [0]
GOLD = [0.0, 1.0, 2.0, 1.5, 1.4, 1.3, 1.2, 1.1, 1.0]
N = int(os.environ["WATCH_PROMPTS"])

def score(prompt, responses):
    w = CALLS[0] // N
    CALLS[0] += 1
    return [GOLD[w] for _ in responses]
'''


@pytest.fixture(scope="module")
def setting(world):
    """test_ppo's world (a tiny SFT model, the rule reward model, arithmetic prompts) with validation prompts for
    the watch and the gold rule beside it."""
    write_jsonl(world / "valid.jsonl", [{"prompt": f"Write about {w}."} for w in "cats dogs rain snow tea maps".split()])
    (world / "goldrule.py").write_text(RULE, encoding="utf-8")
    return world


def ppo_args(world, run_dir, *extra):
    return ["ppo", "--prompts", world / "prompts.jsonl", "--sft", world / "base" / "sft" / "final",
            "--rm", world / "rule_rm", "--run-dir", run_dir, "--max-new-tokens", "12", "--rollout-batch-size", "4",
            "--mini-batch-size", "4", "--lr", "3e-3", *extra]


def watch_args(world, judge="python:goldrule:score", *extra):
    return ["--watch", judge, "--watch-prompts", world / "valid.jsonl", "--watch-every", "1", *extra]


def strip(rows):
    return [{k: v for k, v in r.items() if not k.startswith(("timing/", "elapsed", "watch/seconds"))} for r in rows]


def points(run_dir):
    return [{k: v for k, v in p.items() if k != "seconds"}
            for p in json.loads((run_dir / "ppo" / "watch.json").read_text())["points"]]


def test_a_watched_run_trains_as_an_unwatched_one_and_keeps_its_best_point(setting, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(setting))
    plain, watched = tmp_path / "plain", tmp_path / "watched"
    common = ["--max-steps", "4", "--save-every", "1", "--keep-checkpoints", "10"]
    assert igpt(*ppo_args(setting, plain, *common)).exit_code == 0
    result = igpt(*ppo_args(setting, watched, *common, *watch_args(setting)))
    assert result.exit_code == 0, result.output
    # the watch draws from its own random stream: the policy trained is the unwatched run's, bit for bit
    a = load_file(str(plain / "ppo" / "final" / "policy" / "model.safetensors"))
    b = load_file(str(watched / "ppo" / "final" / "policy" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    pts = points(watched)
    assert [p["step"] for p in pts] == [0, 1, 2, 3, 4]  # the SFT point, then after every iteration
    assert pts[0]["kl"] == 0.0 and all(p["kl"] >= 0 for p in pts)
    golds = [p["gold"] for p in pts]
    best_step = pts[golds.index(max(golds))]["step"]  # the first of equal golds stays the best
    best = read_manifest(watched)["stages"]["ppo"]["best"]
    assert best["step"] == best_step and best["gold"] == pytest.approx(max(golds))
    assert [p["best"] for p in pts].count(True) >= 1 and pts[0]["best"]
    # ppo/best/ holds the policy of that step: its checkpoint's weights (the SFT model's at step 0)
    kept = load_file(str(watched / "ppo" / "best" / "model.safetensors"))
    if best_step == 0:
        ref = load_file(str(setting / "base" / "sft" / "final" / "model.safetensors"))
    else:
        model = load_trained_policy(watched / "ppo" / "checkpoints" / f"step-{best_step:06d}",
                                    setting / "base" / "sft" / "final", None, tiny_tokenizer(), torch.device("cpu"))
        ref = {k: v for k, v in model.state_dict().items()}
    assert all(torch.equal(kept[k], ref[k]) for k in kept)
    # the gold is the rule's mean over the validation responses, recorded each iteration with the proxy
    metrics = read_metrics(watched / "ppo" / "metrics.jsonl")
    assert [m["watch/gold"] for m in metrics] == pytest.approx(golds[1:])
    assert all("watch/proxy" in m and "watch/kl" in m for m in metrics)
    # ppo@best is a model reference of the run, and status names it
    evaluated = igpt("eval", "ppo@best", "--prompts", setting / "valid.jsonl", "--run-dir", watched, "--max-new-tokens",
                     "4", "--rm", setting / "rule_rm", "--sft", setting / "base" / "sft" / "final", "--json")
    assert evaluated.exit_code == 0, evaluated.output
    assert (watched / "eval" / "ppo-best" / "report.json").is_file()
    status = igpt("status", "--run-dir", watched, "--json")
    assert json.loads(status.stdout)["stages"]["ppo"]["outputs"]["best"] == str(watched / "ppo" / "best")


@pytest.mark.parametrize("patience", [2, 3])
def test_the_stop_fires_after_patience_watches_without_a_new_best_while_the_proxy_rose(setting, tmp_path, monkeypatch,
                                                                                       patience):
    """Scripted gold per watch 0, 1, 2, 1.5, 1.4, ...: the best is watch 2 (after iteration 2); with patience P
    the run ends after iteration 2 + P, a normal finish with final/ and the reason, and not a watch earlier."""
    import instructgpt_cli.watch as watch_mod

    module = f"scripted{patience}"
    (tmp_path / f"{module}.py").write_text(SCRIPTED, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("WATCH_PROMPTS", "6")
    calls = []

    def rising(models, tokenizer, queries, responses, temperature, batch_size, step):  # the proxy rises every watch
        calls.append(1)
        return [float(len(calls))] * len(responses), [0.0] * len(responses)

    monkeypatch.setattr(watch_mod, "proxy_and_kl", rising)
    run_dir = tmp_path / "run"
    result = igpt(*ppo_args(setting, run_dir, "--max-steps", "8", *watch_args(setting, f"python:{module}:score"),
                            "--watch-patience", str(patience)))
    assert result.exit_code == 0, result.output
    entry = read_manifest(run_dir)["stages"]["ppo"]
    assert entry["status"] == "completed" and entry["steps"] == 2 + patience
    assert "has not beaten its best" in entry["outputs"]["stopped_by_watch"]
    assert entry["best"]["step"] == 2 and entry["best"]["gold"] == 2.0
    assert (run_dir / "ppo" / "final" / "policy" / "config.json").is_file()
    assert [p["step"] for p in points(run_dir)] == list(range(3 + patience))
    assert f"finishing after step {2 + patience} of 8" in result.stderr


def test_no_stop_when_the_proxy_fell_with_the_gold(setting, tmp_path, monkeypatch):
    import instructgpt_cli.watch as watch_mod

    (tmp_path / "scriptedfall.py").write_text(SCRIPTED, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("WATCH_PROMPTS", "6")
    proxies = iter([0.0, 1.0, 2.0, 1.0, 0.5, 0.2, 0.1, 0.0])
    monkeypatch.setattr(watch_mod, "proxy_and_kl",
                        lambda models, tok, q, r, t, b, step: ([next(proxies)] * len(r), [0.0] * len(r)))
    run_dir = tmp_path / "run"
    result = igpt(*ppo_args(setting, run_dir, "--max-steps", "6", *watch_args(setting, "python:scriptedfall:score"),
                            "--watch-patience", "2"))
    assert result.exit_code == 0, result.output
    entry = read_manifest(run_dir)["stages"]["ppo"]
    assert entry["steps"] == 6 and "stopped_by_watch" not in entry["outputs"]


def test_a_killed_watched_run_resumes_bit_identical_watch_included(setting, tmp_path):
    from test_sft import run_subprocess

    extra = ["--max-steps", "5", "--save-every", "2", *watch_args(setting)]
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    env = {"PYTHONPATH": os.pathsep.join([str(setting), os.environ.get("PYTHONPATH", "")])}
    done = run_subprocess(ppo_args(setting, straight, *extra), env)
    assert done.returncode == 0, done.stderr
    killed = run_subprocess(ppo_args(setting, interrupted, *extra), {**env, "IGPT_FAULT_AFTER_STEP": "3"})
    assert killed.returncode == 99, killed.stderr
    resumed = run_subprocess([*ppo_args(setting, interrupted, *extra), "--resume"], env)
    assert resumed.returncode == 0 and "from step-000002" in resumed.stderr, resumed.stderr
    for part in ("final/policy", "best"):
        a = load_file(str(straight / "ppo" / part / "model.safetensors"))
        b = load_file(str(interrupted / "ppo" / part / "model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), part
    ma, mb = (read_metrics(d / "ppo" / "metrics.jsonl") for d in (straight, interrupted))
    assert strip(ma) == strip(mb)  # the watch's metrics too, step for step
    assert points(straight) == points(interrupted)
    sa, sb = (read_manifest(d)["stages"]["ppo"]["best"] for d in (straight, interrupted))
    assert {k: v for k, v in sa.items() if k != "path"} == {k: v for k, v in sb.items() if k != "path"}


@pytest.mark.parametrize("args,needle", [
    (["--watch-prompts", "valid.jsonl"], "--watch: required"),
    (["--watch", "python:nosuchmodule:score", "--watch-prompts", "valid.jsonl"], "nosuchmodule"),
    (["--watch", "python:goldrule:score"], "--watch-prompts: required"),
    (["--watch", "rm:/nonexistent", "--watch-prompts", "valid.jsonl"], "--watch rm:"),
    (["--watch", "python:goldrule:score", "--watch-prompts", "valid.jsonl", "--watch-significance"], "--watch-patience"),
])
def test_a_bad_watch_is_refused_before_anything_is_written(setting, tmp_path, monkeypatch, args, needle):
    monkeypatch.syspath_prepend(str(setting))
    args = [setting / a if a == "valid.jsonl" else a for a in args]
    run_dir = tmp_path / "run"
    result = igpt(*ppo_args(setting, run_dir, "--max-steps", "2", *args))
    assert result.exit_code == 2 and needle in result.stderr, result.output
    assert not (run_dir / "ppo").exists()


RISING = '''
import instructgpt_cli.watch as watch
CALLS = []


def rising(models, tokenizer, queries, responses, temperature, batch_size, step):  # the proxy rises every watch
    CALLS.append(1)
    return [float(len(CALLS))] * len(responses), [0.0] * len(responses)


watch.proxy_and_kl = rising
'''


def test_a_watch_stop_survives_a_stop_signal_on_its_step(setting, tmp_path):
    """The stop rule fires at iteration 4 (patience 2) and a SIGTERM arrives on that same step: the run ends
    with 143 and its checkpoint; --resume goes straight to the finish the watch decided, training no further.
    (Its own processes, as a stop signal needs; the rising proxy is patched in by a sitecustomize.)"""
    from instructgpt_cli import faults
    from test_sft import run_subprocess

    (tmp_path / "scriptedsig.py").write_text(SCRIPTED, encoding="utf-8")
    (tmp_path / "sitecustomize.py").write_text(RISING, encoding="utf-8")
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]), "WATCH_PROMPTS": "6"}
    run_dir = tmp_path / "run"
    args = ppo_args(setting, run_dir, "--max-steps", "8", *watch_args(setting, "python:scriptedsig:score"),
                    "--watch-patience", "2")
    stopped = run_subprocess(args, {**env, faults.FAULT_ENV: "4:SIGTERM"})
    assert stopped.returncode == 143, stopped.stderr
    assert "watch after iteration 4" in stopped.stderr and not (run_dir / "ppo" / "final").exists()
    resumed = run_subprocess([*args, "--resume"], env)
    assert resumed.returncode == 0, resumed.stderr
    assert "watch after iteration" not in resumed.stderr  # no iteration and no watch after the resume
    assert "finishing after step 4 of 8" in resumed.stderr
    entry = read_manifest(run_dir)["stages"]["ppo"]
    assert entry["steps"] == 4 and "has not beaten its best" in entry["outputs"]["stopped_by_watch"]
    assert (run_dir / "ppo" / "final" / "policy" / "config.json").is_file()


def test_the_watch_s_interval_is_over_groups_where_prompts_have_them():
    """Four framings of two messages: the interval is Student's t over the two message means, not over four
    prompts as if independent (which would be too narrow)."""
    from instructgpt_cli.stats import t_quantile
    from instructgpt_cli.watch import by_group, t_interval

    values, groups = [1.0, 0.0, 0.5, 0.5], ["a", "b", "a", "b"]
    assert by_group(values, groups) == [0.75, 0.25]
    assert by_group(values, ["a", None, "a", "b"]) == values  # a prompt without a group: each its own
    low, high = t_interval(by_group(values, groups))
    half = t_quantile(0.975, 1) * 0.3535533905932738 / 2 ** 0.5  # sd of (0.75, 0.25), n = 2
    assert (low, high) == pytest.approx((0.5 - half, 0.5 + half))
    assert high - low > t_interval(values)[1] - t_interval(values)[0]
