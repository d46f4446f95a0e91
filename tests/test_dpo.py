"""igpt dpo: the K-wise DPO loss by hand, K forwards per ranking, shared-prompt log-probs, learning a marker,
resume, LoRA's reference, bad input, and eval / compare of the DPO model."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import igpt, marker_rankings, write_jsonl
from grads import assert_same_grads
from rule_rm import make_rule_rm
from instructgpt_cli.batches import render_prompt, tokenize_scored
from instructgpt_cli.config import LoraConfig
from instructgpt_cli.forward import choose
from instructgpt_cli.losses import kwise_dpo_loss
from instructgpt_cli.models import apply_lora, tiny_model, tiny_tokenizer
from instructgpt_cli.rewards import Layout
from instructgpt_cli.rundir import read_metrics
from instructgpt_cli.runners import Runner
from instructgpt_cli.stages.dpo import Item, dpo_forward, reference_logprobs

CPU = torch.device("cpu")
t = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731


def test_k2_is_the_pairwise_dpo_formula():
    pol, ref = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.5])
    losses, chosen, rejected = kwise_dpo_loss(pol, ref, t([0]), t([1]), t([0]), 1, beta=0.1)
    # Rafailov et al. eq. 7: -log sigmoid(beta * ((log pi_w - log ref_w) - (log pi_l - log ref_l)))
    want = -F.logsigmoid(torch.tensor(0.1 * ((-3.0 + 4.0) - (-5.0 + 4.5))))
    torch.testing.assert_close(losses, want[None])
    torch.testing.assert_close(chosen, torch.tensor([0.1]))
    torch.testing.assert_close(rejected, torch.tensor([-0.05]))


def test_k4_with_a_tie_by_hand():
    # prompt 0: ranks [1, 2, 2, 3] -> pairs (0,1) (0,2) (0,3) (1,3) (2,3); 1 and 2 tie and make none.
    # prompt 1: K=2, response 1 better.
    pol = torch.tensor([-1.0, -2.0, -3.0, -4.0, -2.0, -1.0])
    ref = torch.tensor([-1.5, -1.5, -2.5, -3.0, -2.0, -2.0])
    beta = 0.5  # rewards 0.5 * (pol - ref) = [0.25, -0.25, -0.25, -0.5 | 0, 0.5]
    better, worse, group = t([0, 0, 0, 1, 2, 5]), t([1, 2, 3, 3, 3, 4]), t([0, 0, 0, 0, 0, 1])
    losses, chosen, rejected = kwise_dpo_loss(pol, ref, better, worse, group, 2, beta)
    nll = lambda m: math.log1p(math.exp(-m))  # noqa: E731  -log sigmoid(m)
    want0 = (nll(0.5) + nll(0.5) + nll(0.75) + nll(0.25) + nll(0.25)) / 5  # mean over the prompt's 5 pairs
    torch.testing.assert_close(losses, torch.tensor([want0, nll(0.5)]))
    torch.testing.assert_close(chosen - rejected, torch.tensor([0.5, 0.5, 0.75, 0.25, 0.25, 0.5]))


def ranking(tok, prompt, responses):
    msgs = [{"role": "user", "content": prompt}]
    return tokenize_scored(tok, msgs, responses, 256, "f:1", [])[0], len(render_prompt(tok, msgs))


def separate_logprobs(model, seqs, prompt_len):
    """Each sequence alone, through model(...): the summed log-probs of its tokens after the prompt."""
    out = []
    for s in seqs:
        logp = torch.log_softmax(model(input_ids=torch.tensor([s])).logits[0].float(), -1)
        out.append(sum(logp[i - 1, s[i]] for i in range(prompt_len, len(s))))
    return torch.stack(out)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_shared_prompt_logprobs_and_gradients_equal_separate_sequences(attention):
    tok = tiny_tokenizer()
    model = tiny_model(tok, seed=0)
    model.config._attn_implementation = attention
    groups = [ranking(tok, "Rank these answers, please.", ["short", "a longer answer", "the longest answer of all"]),
              ranking(tok, "Another question", ["yes", "no"])]
    seqs, lens = [s for g, _ in groups for s in g], [p for _, p in groups]
    weights = torch.tensor([1.0, -2.0, 3.0, 0.5, -1.5])
    results = []
    for layout in ("separate", Layout(), Layout(packed=True), Layout(shared=True)):
        model.zero_grad(set_to_none=True)
        if layout == "separate":
            logps = torch.cat([separate_logprobs(model, g, p) for g, p in groups])
        else:
            logps = choose(model).ranking_logprobs(model, [g for g, _ in groups], lens, tok.pad_token_id, CPU, *layout)
        (logps * weights).sum().backward()
        results.append((logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (want, want_grads), *others = results
    assert len(seqs) == 5 and want.abs().min() > 1
    for logps, grads in others:
        torch.testing.assert_close(logps, want, rtol=1e-5, atol=1e-5)
        assert_same_grads(grads, want_grads)


@pytest.mark.parametrize("layout", [Layout(), Layout(shared=True)], ids=["padded", "prompt-shared"])
def test_a_ranking_of_k_responses_costs_k_policy_forwards(layout):
    tok = tiny_tokenizer()
    model = tiny_model(tok, seed=0)
    shapes = []
    model.model.embed_tokens.register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    for k in (2, 4, 9):
        seqs, p = ranking(tok, "q", [f"answer {i}" * (i + 1) for i in range(k)])
        pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
        shapes.clear()
        item = Item(seqs, pairs, p, 0, torch.zeros(k))
        losses, stats = dpo_forward(Runner(model, CPU), [item], tok.pad_token_id, CPU, layout, 0.1)
        shared = p + len("answer ")  # every response starts with it
        want = (1, sum(map(len, seqs)) - (k - 1) * shared) if layout.shared else (k, max(map(len, seqs)))
        assert shapes == [want], f"K={k}: {shapes}"  # one forward: K rows, or one row with the prompt once
        assert stats["pairs"] == math.comb(k, 2) and losses.shape == (1,)


def test_the_lora_reference_is_the_model_with_adapters_disabled():
    tok = tiny_tokenizer()
    base = tiny_model(tok, seed=0)
    seqs, p = ranking(tok, "Say something.", ["the cat", "a dog ran banana"])
    want = choose(base).ranking_logprobs(base, [seqs], [p], tok.pad_token_id, CPU).detach()
    adapted = apply_lora(tiny_model(tok, seed=0), LoraConfig(enabled=True, r=4, alpha=8, layers=0))
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if "lora_B" in name:
                param.normal_()  # trained adapters: the adapted model differs from its base
    assert not torch.allclose(choose(adapted).ranking_logprobs(adapted, [seqs], [p], tok.pad_token_id, CPU), want, atol=1e-3)
    ref = reference_logprobs(adapted, [Item(seqs, [(1, 0)], p, 0)], 8, tok.pad_token_id, Layout(shared=True), CPU)
    torch.testing.assert_close(ref[0], want, rtol=1e-5, atol=1e-5)


def dpo_args(rankings, run_dir, *extra):
    return ["dpo", "--rankings", rankings, "--run-dir", run_dir, "--lr", "3e-3", "--batch-size", "8",
            "--eval-every", "5", *extra]


@pytest.fixture(scope="module")
def marker_run(tmp_path_factory):
    """SFT on every response of the marker rankings (half end with 'banana'), then DPO on their rankings."""
    tmp = tmp_path_factory.mktemp("dpo")
    ranks = marker_rankings(48)
    rankings = write_jsonl(tmp / "ranks.jsonl", ranks)
    write_jsonl(tmp / "demos.jsonl", [{"prompt": r["prompt"], "response": x} for r in ranks for x in r["responses"]])
    run_dir = tmp / "run"
    sft = igpt("sft", "--model", "tiny", "--data", tmp / "demos.jsonl", "--run-dir", run_dir, "--lr", "3e-3",
               "--max-steps", "60", "--batch-size", "16", "--val-fraction", "0", "--save-every", "1000")
    assert sft.exit_code == 0, sft.output
    dpo = igpt(*dpo_args(rankings, run_dir, "--max-steps", "20", "--save-every", "1000"))
    assert dpo.exit_code == 0, dpo.output
    return tmp


def marker_rate(model_dir):
    from instructgpt_cli.config import ModelConfig
    from instructgpt_cli.models import load_model, load_tokenizer
    from instructgpt_cli.rollout import generate

    cfg = ModelConfig(name=str(model_dir))
    tok, source = load_tokenizer(cfg)
    model = load_model(cfg, tok, source, CPU, 0)
    queries = [render_prompt(tok, [{"role": "user", "content": f"Say something, number {i}."}]) for i in range(64)]
    torch.manual_seed(0)
    texts = [tok.decode(r, skip_special_tokens=True) for r in generate(model, choose(model), tok, queries, 24, 1.0, 64)]
    return sum("banana" in x for x in texts) / len(texts)


def test_dpo_learns_the_marker_preference(marker_run):
    run_dir = marker_run / "run"
    records = read_metrics(run_dir / "dpo" / "metrics.jsonl")
    assert len(records) == 20 and records[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-4)  # pi = ref
    assert abs(records[0]["rewards/margins"]) < 1e-4
    late = records[-5:]
    assert sum(r["rewards/margins"] for r in late) / 5 > 0.5  # the chosen-vs-rejected margin grew
    assert sum(r["rewards/accuracies"] for r in late) / 5 > 0.8 and late[-1]["train/loss"] < 0.5
    assert {"eval/loss", "eval/rewards/accuracies", "logps/chosen", "logps/rejected"} <= records[-1].keys()
    assert marker_rate(run_dir / "dpo" / "final") > marker_rate(run_dir / "sft" / "final")
    manifest = json.loads((run_dir / "manifest.json").read_text())["stages"]["dpo"]
    assert manifest["status"] == "completed" and {"rankings", "sft"} <= manifest["inputs"].keys()
    assert manifest["inputs"]["sft"]["sha256"] and manifest["inputs"]["rankings"]["sha256"]


def test_eval_dpo_and_compare_dpo_sft(marker_run):
    run_dir = marker_run / "run"
    make_rule_rm(run_dir / "rm" / "final", tiny_tokenizer(), "a")
    prompts = write_jsonl(marker_run / "prompts.jsonl", [{"prompt": f"Say something, number {i}."} for i in range(6)])
    common = ["--prompts", prompts, "--run-dir", run_dir, "--max-new-tokens", "12"]
    result = igpt("eval", "dpo", *common, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["kl_to_sft"] > 0 and math.isfinite(report["score_mean"])
    assert (run_dir / "eval" / "dpo" / "report.json").is_file()
    result = igpt("compare", "dpo", "sft", *common)
    assert result.exit_code == 0, result.output
    ab = json.loads((run_dir / "compare" / "dpo-vs-sft" / "report.json").read_text())
    assert ab["n"] == 6 and ab["wins"] + ab["ties"] + ab["losses"] == 6


def test_stopped_dpo_run_resumes_bit_identical_reading_its_reference_back(tmp_path):
    from test_sft import run_subprocess

    rankings = write_jsonl(tmp_path / "ranks.jsonl", marker_rankings(40))
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    args = lambda d: dpo_args(rankings, d, "--model", "tiny", "--max-steps", "8", "--save-every", "4")  # noqa: E731
    assert igpt(*args(straight)).exit_code == 0
    killed = run_subprocess(args(stopped), {"IGPT_FAULT_AFTER_STEP": "3:SIGTERM"})
    assert killed.returncode == 143, killed.stderr
    resumed = igpt(*args(stopped), "--resume")
    assert resumed.exit_code == 0 and "read back" in resumed.output, resumed.output
    a = load_file(str(straight / "dpo" / "final" / "model.safetensors"))
    b = load_file(str(stopped / "dpo" / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = (read_metrics(d / "dpo" / "metrics.jsonl") for d in (straight, stopped))
    assert [r["train/loss"] for r in ma] == [r["train/loss"] for r in mb]


def test_lora_dpo_stores_the_sft_models_reference_logprobs(tmp_path):
    rankings = write_jsonl(tmp_path / "ranks.jsonl", marker_rankings(12))
    run_dir = tmp_path / "run"
    result = igpt(*dpo_args(rankings, run_dir, "--model", "tiny", "--lora", "--max-steps", "3", "--val-fraction", "0"))
    assert result.exit_code == 0, result.output
    stored = load_file(str(run_dir / "dpo" / "ref_logps.safetensors"))
    tok = tiny_tokenizer()
    sft = tiny_model(tok, seed=0)  # --model tiny, seed 0: the SFT model
    groups = [ranking(tok, r["prompt"], r["responses"]) for r in marker_rankings(12)]
    with torch.no_grad():
        want = choose(sft).ranking_logprobs(sft, [g for g, _ in groups], [p for _, p in groups], tok.pad_token_id, CPU)
    assert stored["offsets"].tolist() == [0] + torch.tensor([len(g) for g, _ in groups]).cumsum(0).tolist()
    torch.testing.assert_close(stored["logps"], want, rtol=1e-5, atol=1e-4)
    assert (run_dir / "dpo" / "final" / "adapter").is_dir()


@pytest.mark.parametrize("lines,message", [
    (['{"prompt": "p", "responses": ["a", "b"], "ranks": [1, 1]}'], "ranks.jsonl:1: ranks: all responses are tied"),
    (['{"prompt": "p", "chosen": "a"}', "not json"], "ranks.jsonl:1: rejected"),
])
def test_bad_rankings_exit_2_and_write_nothing(tmp_path, lines, message):
    rankings = write_jsonl(tmp_path / "ranks.jsonl", lines)
    result = igpt(*dpo_args(rankings, tmp_path / "run", "--model", "tiny"))
    assert result.exit_code == 2 and message in result.stderr, result.output
    assert not (tmp_path / "run").exists()
    no_sft = igpt(*dpo_args(write_jsonl(tmp_path / "ok.jsonl", marker_rankings(2)), tmp_path / "run"))
    assert no_sft.exit_code == 2 and "--sft" in no_sft.stderr and not (tmp_path / "run").exists()


def test_the_reference_cache_is_keyed_by_what_was_tokenised_not_by_the_file(tmp_path):
    """Two splits of one dataset with the same row count, then the same split with chosen and rejected mapped the
    other way round: each resume (--allow-changes) computes the reference again and stores what a fresh run on
    those rows stores (keyed by the file and its row count, the first split's log-probs were read back)."""
    datasets = pytest.importorskip("datasets")
    rows = lambda tag: [{"question": f"Pick {tag} {i}?", "good": f"banana {tag} {i}" * (i + 1),  # noqa: E731
                         "bad": f"stone {i} {tag}"} for i in range(4)]
    datasets.DatasetDict({"a": datasets.Dataset.from_list(rows("first")),
                          "b": datasets.Dataset.from_list(rows("second split"))}).save_to_disk(str(tmp_path / "prefs"))
    cols, swapped = "prompt=question,chosen=good,rejected=bad", "prompt=question,chosen=bad,rejected=good"
    args = lambda run, split, columns, steps: ["dpo", "--model", "tiny", "--rankings", tmp_path / "prefs",  # noqa: E731
                                               "--run-dir", tmp_path / run, "--split", split, "--columns", columns,
                                               "--max-steps", str(steps), "--batch-size", "2", "--val-fraction", "0",
                                               "--save-every", "1"]
    ref = lambda run: load_file(str(tmp_path / run / "dpo" / "ref_logps.safetensors"))  # noqa: E731
    for run, split in (("a", "a"), ("b", "b")):  # 2 steps of 2: every row once
        assert igpt(*args(run, split, cols, 2)).exit_code == 0
    fresh_a, fresh_b = ref("a"), ref("b")
    assert not torch.allclose(fresh_a["logps"], fresh_b["logps"])
    for steps, split, columns, want in ((3, "b", cols, fresh_b["logps"]),
                                       (4, "b", swapped, fresh_b["logps"].view(-1, 2).flip(1).reshape(-1))):
        resumed = igpt(*args("a", split, columns, steps), "--resume", "--allow-changes")
        assert resumed.exit_code == 0 and "computed" in resumed.output, resumed.output
        torch.testing.assert_close(ref("a")["logps"], want)
    again = igpt(*args("a", "b", swapped, 5), "--resume")  # the same rows again: read back
    assert again.exit_code == 0 and "read back" in again.output, again.output


def test_dpo_trains_with_dropout_off_whatever_the_model_config_says(tmp_path):
    """--dropout and --lora-dropout 0.5 are overridden as in ppo: at step 0 the policy is its reference (computed
    without dropout), so every implicit reward is 0 and the loss log 2; with dropout the policy's log-probs
    would be noisy against the reference's."""
    rankings = write_jsonl(tmp_path / "ranks.jsonl", marker_rankings(8))
    run_dir = tmp_path / "run"
    result = igpt(*dpo_args(rankings, run_dir, "--model", "tiny", "--dropout", "0.5", "--lora", "--lora-dropout",
                            "0.5", "--max-steps", "1", "--val-fraction", "0"))
    assert result.exit_code == 0, result.output
    first = read_metrics(run_dir / "dpo" / "metrics.jsonl")[0]
    assert abs(first["rewards/chosen"]) < 1e-6 and abs(first["rewards/rejected"]) < 1e-6
    assert first["train/loss"] == pytest.approx(math.log(2), abs=1e-6)
    adapter = json.loads((run_dir / "dpo" / "final" / "adapter" / "adapter_config.json").read_text())
    config = json.loads((run_dir / "dpo" / "final" / "config.json").read_text())
    assert adapter["lora_dropout"] == 0 and config["attention_dropout"] == 0
    assert "dpo trains with dropout off (asked: --dropout 0.5, --lora-dropout 0.5)" in result.stderr


def test_a_short_run_computes_the_reference_only_for_the_rankings_it_visits(tmp_path):
    """2 steps of 4 on 40 rankings (4 held out): the reference of the 8 it trains on and the 4 held out, the others
    empty in the cache; a resume to 12 steps (a second epoch) computes the other 28 and reads the 12 back, and the
    cache then holds what a fresh 12-step run computes, ranking for ranking."""
    from instructgpt_cli.train import visited_indices

    rankings = write_jsonl(tmp_path / "ranks.jsonl", marker_rankings(40))
    args = lambda run, steps: ["dpo", "--model", "tiny", "--rankings", rankings, "--run-dir", tmp_path / run,  # noqa: E731
                               "--batch-size", "4", "--val-fraction", "0.1", "--max-steps", str(steps),
                               "--save-every", "1"]
    assert igpt(*args("b", 12)).exit_code == 0
    full = load_file(str(tmp_path / "b" / "dpo" / "ref_logps.safetensors"))
    sizes = full["offsets"].diff()
    assert sizes.min() >= 2  # every ranking's K responses
    short = igpt(*args("a", 2))
    assert short.exit_code == 0 and "computed for 12 rankings, 12 of 40" in short.output, short.output
    cached = load_file(str(tmp_path / "a" / "dpo" / "ref_logps.safetensors"))
    lengths = cached["offsets"].diff()
    kept = (lengths > 0).nonzero().flatten().tolist()
    assert len(kept) == 12 and all(lengths[i] == sizes[i] for i in kept)
    for i in kept:  # the same numbers as the full run's, where computed
        a, b = cached["offsets"][i], full["offsets"][i]
        torch.testing.assert_close(cached["logps"][a:a + sizes[i]], full["logps"][b:b + sizes[i]])
    resumed = igpt(*args("a", 12), "--resume", "--allow-changes")
    assert resumed.exit_code == 0 and "computed for 28 rankings (12 read back)" in resumed.output, resumed.output
    grown = load_file(str(tmp_path / "a" / "dpo" / "ref_logps.safetensors"))
    assert torch.equal(grown["offsets"], full["offsets"])
    torch.testing.assert_close(grown["logps"], full["logps"])  # other micro-batches: the same up to rounding
    assert visited_indices(36, 2, 4, 0) == sorted(set(visited_indices(36, 2, 4, 0))) and \
        len(visited_indices(36, 2, 4, 0)) == 8 and visited_indices(36, 9, 4, 0) == list(range(36))


def test_the_final_held_out_summary_is_the_last_steps_evaluation_not_a_second_pass(tmp_path, monkeypatch):
    """The last step evaluates the held-out rankings (Session.record); the final summary (the manifest's outputs,
    the closing banner) is that result: one held-out pass at 3 steps with --eval-every 5, not two."""
    from instructgpt_cli.stages import dpo

    calls, real = [], dpo.evaluate
    monkeypatch.setattr(dpo, "evaluate", lambda *a, **k: calls.append(1) or real(*a, **k))
    rankings = write_jsonl(tmp_path / "ranks.jsonl", marker_rankings(20))
    result = igpt(*dpo_args(rankings, tmp_path / "run", "--model", "tiny", "--max-steps", "3", "--val-fraction", "0.2"))
    assert result.exit_code == 0, result.output
    assert len(calls) == 1
    last = read_metrics(tmp_path / "run" / "dpo" / "metrics.jsonl")[-1]
    outputs = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]["dpo"]["outputs"]
    assert outputs["eval/loss"] == last["eval/loss"] and f"{last['eval/loss']:.4f}" in result.output
