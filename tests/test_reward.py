"""The train-rm stage: K-wise loss by hand, K forwards per ranking, learning, normalisation, resume."""
import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import TINY_CONFIG, arithmetic_demos, igpt, marker_rankings, write_jsonl
from grads import assert_same_grads
from instructgpt_cli.config import ModelConfig
from instructgpt_cli.batches import RankedGroup, common_prefix, pad_right, pays_to_share, render_prompt, shared_prefix_mask, shared_rows, tokenize_scored
from instructgpt_cli.data import read_demos
from instructgpt_cli.losses import ranking_loss
from instructgpt_cli.models import load_model, load_tokenizer, tiny_model, tiny_tokenizer
from instructgpt_cli.rewards import packed_reward_scores, reward_scores, shared_reward_scores
from instructgpt_cli.rewards import score_sequences
from instructgpt_cli.rundir import read_metrics
from instructgpt_cli.runners import Runner
from instructgpt_cli.storage import weights_sha256
from instructgpt_cli.rewards import FrozenStates, Layout, frozen_states_bytes, ranking_scores
from instructgpt_cli.stages.reward import rank_forward


def group_loss(rewards, ranks):
    from instructgpt_cli.data import Ranking

    pairs = Ranking("p", [str(i) for i in range(len(ranks))], ranks, None, "f:1").pairs()
    t = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    losses, correct = ranking_loss(torch.tensor(rewards), t([b for b, _ in pairs]), t([w for _, w in pairs]),
                                   t([0] * len(pairs)), 1)
    return losses[0].item(), correct, pairs


def test_k3_with_one_tie_by_hand():
    # ranks: response 0 best, responses 1 and 2 tied -> pairs (0,1), (0,2); the tie makes no pair
    loss, correct, pairs = group_loss([2.0, 0.5, -1.0], [1, 2, 2])
    assert pairs == [(0, 1), (0, 2)]
    by_hand = (math.log(1 + math.exp(-1.5)) + math.log(1 + math.exp(-3.0))) / 2
    assert loss == pytest.approx(by_hand, rel=1e-6)
    assert correct.tolist() == [1.0, 1.0]
    # the same rewards ranked the other way round: response 1 best, 0 and 2 tied
    loss, correct, pairs = group_loss([2.0, 0.5, -1.0], [2, 1, 2])
    assert pairs == [(1, 0), (1, 2)]
    assert loss == pytest.approx((math.log(1 + math.exp(1.5)) + math.log(1 + math.exp(-1.5))) / 2, rel=1e-6)
    assert correct.tolist() == [0.0, 1.0]


def test_kwise_loss_is_the_mean_of_independent_pairwise_losses():
    gen = torch.Generator().manual_seed(0)
    for k in range(2, 10):
        rewards = torch.randn(k, generator=gen).tolist()
        ranks = (torch.randperm(k, generator=gen) + 1).tolist()
        loss, _, pairs = group_loss(rewards, ranks)
        assert len(pairs) == math.comb(k, 2)
        independent = [-F.logsigmoid(torch.tensor(rewards[i] - rewards[j])).item()
                       for i, j in itertools.combinations(range(k), 2)
                       for i, j in [((i, j) if ranks[i] < ranks[j] else (j, i))]]
        assert loss == pytest.approx(sum(independent) / math.comb(k, 2), rel=1e-6)


def test_prompts_weigh_the_same_whatever_their_k():
    # two prompts in one batch: K=2 and K=4; the batch loss is the mean of the two prompt losses
    t = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    rewards = torch.tensor([1.0, 0.0, 3.0, 2.0, 1.0, 0.0])
    better = t([0, 2, 2, 2, 3, 3, 4])
    worse = t([1, 3, 4, 5, 4, 5, 5])
    group = t([0, 1, 1, 1, 1, 1, 1])
    losses, _ = ranking_loss(rewards, better, worse, group, 2)
    assert losses.tolist() == pytest.approx([math.log(1 + math.exp(-1)),
                                             (3 * math.log(1 + math.exp(-1)) + 2 * math.log(1 + math.exp(-2))
                                              + math.log(1 + math.exp(-3))) / 6], rel=1e-6)


LAYOUTS = {"padded": Layout(), "padding-free": Layout(packed=True), "prompt-shared": Layout(shared=True)}


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_one_ranking_of_k_responses_costs_at_most_k_sequence_forwards(layout):
    tok = tiny_tokenizer()
    model = tiny_model(tok, seed=0, kind="reward")
    shapes = []
    model.register_forward_pre_hook(lambda m, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)),
                                    with_kwargs=True)
    for k in (2, 4, 9):
        errors = []
        seqs, _, plen = tokenize_scored(tok, [{"role": "user", "content": "q"}],
                                        [f"answer {i}" * (i + 1) for i in range(k)], 256, "f:1", errors)
        prompt = len(render_prompt(tok, [{"role": "user", "content": "q"}])) + len("answer ")  # all start alike
        group = RankedGroup(seqs, [(i, j) for i in range(k) for j in range(i + 1, k)], plen)
        shapes.clear()
        losses, correct, _ = rank_forward(Runner(model, torch.device("cpu")), [group], tok.pad_token_id, torch.device("cpu"),
                                          layout)
        # one forward: K padded rows, one row of exactly the K sequences' tokens, or one row with the
        # shared beginning once and each response's own tokens after it
        want = {Layout(): (k, max(map(len, seqs))), Layout(packed=True): (1, sum(map(len, seqs))),
                Layout(shared=True): (1, sum(map(len, seqs)) - (k - 1) * prompt)}[layout]
        assert shapes == [want], f"K={k}: {shapes}"
        assert correct.numel() == math.comb(k, 2)  # all C(K,2) comparisons from one forward


def test_shared_rows_by_hand():
    # two rankings: [1 2 3 4], [1 2 5] share 1 2; [7 8], [7 9], [7 8] share 7 (a duplicate keeps its last token)
    rows = shared_rows([[[1, 2, 3, 4], [1, 2, 5]], [[7, 8], [7, 9], [7, 8]]], pad_id=0)
    assert rows.input_ids.tolist() == [[1, 2, 3, 4, 5], [7, 8, 9, 8, 0]]
    assert rows.position_ids.tolist() == [[0, 1, 2, 3, 2], [0, 1, 1, 1, 0]]
    assert rows.segments.tolist() == [[0, 0, 1, 1, 2], [0, 1, 2, 3, -1]]
    assert [c[-1] for c in rows.columns] == [3, 4, 6, 7, 8]  # row * 5 + column of each sequence's last token
    mask = shared_prefix_mask(rows.segments)[:, 0].int().tolist()
    assert mask[0] == [[1, 0, 0, 0, 0],
                       [1, 1, 0, 0, 0],
                       [1, 1, 1, 0, 0],
                       [1, 1, 1, 1, 0],
                       [1, 1, 0, 0, 1]]  # the second response sees the prompt and itself, not the first response
    assert mask[1] == [[1, 0, 0, 0, 0],
                       [1, 1, 0, 0, 0],
                       [1, 0, 1, 0, 0],
                       [1, 0, 0, 1, 0],
                       [1, 0, 0, 0, 1]]  # padding sees the prefix and itself: no empty row
    assert common_prefix([[1, 2], [1, 2]]) == 1 and common_prefix([[1, 2], [3, 2]]) == 0
    # sharing must save a tenth of the tokens: 2 of 7 here, 0 of 4 with nothing in common
    assert pays_to_share([[[1, 2, 3, 4], [1, 2, 5]]]) and not pays_to_share([[[1, 2], [3, 4]]])


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_shared_and_padding_free_scores_and_gradients_equal_the_padded_ones(attention):
    tok = tiny_tokenizer()
    model = tiny_model(tok, seed=0, kind="reward")
    model.config._attn_implementation = attention
    groups = []
    rankings = (("Rank these.", ["short", "a somewhat longer answer", "the longest answer of all, by far"]),
                ("Another question", ["yes", "no"]))
    for prompt, responses in rankings:
        groups.append(tokenize_scored(tok, [{"role": "user", "content": prompt}], responses, 256, "f:1", [])[0])
    seqs = [s for g in groups for s in g]
    assert len({len(s) for s in seqs}) == 5
    ids, mask = pad_right(seqs, tok.pad_token_id)
    weights = torch.tensor([1.0, -2.0, 3.0, 0.5, -1.5])
    cpu = torch.device("cpu")
    results = []
    for score in (lambda: reward_scores(model, ids, mask), lambda: packed_reward_scores(model, seqs, cpu),
                  lambda: shared_reward_scores(model, groups, tok.pad_token_id, cpu)):
        model.zero_grad(set_to_none=True)
        scores = score()
        (scores * weights).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((scores.detach(), grads))
    (padded, padded_grads), *others = results
    assert padded_grads
    for scores, grads in others:
        torch.testing.assert_close(scores, padded, rtol=1e-5, atol=1e-5)
        assert_same_grads(grads, padded_grads)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_kept_frozen_states_give_the_whole_model_s_scores_and_gradients_and_skip_its_lower_layers(attention):
    """LoRA on the top layer of two: the lower layer's output for each ranking is computed the first time (each
    ranking alone) and kept; every layout then scores from it what the whole model scores, with the same
    gradients, and the lower layer does not run again."""
    from instructgpt_cli.config import LoraConfig
    from instructgpt_cli.families import backbone, frozen_layers
    from instructgpt_cli.models import apply_lora

    tok = tiny_tokenizer()
    model = apply_lora(tiny_model(tok, seed=0, kind="reward"), LoraConfig(enabled=True, r=4, alpha=8, layers=1),
                       task_type="SEQ_CLS")
    model.config._attn_implementation = attention
    assert frozen_layers(model) == 1
    groups = [tokenize_scored(tok, [{"role": "user", "content": p}], rs, 256, "f:1", [])[0] for p, rs in
              (("Rank these.", ["short", "a somewhat longer answer", "the longest answer of all, by far"]),
               ("Another question", ["yes", "no"]))]
    weights = torch.tensor([1.0, -2.0, 3.0, 0.5, -1.5])
    calls = []
    hook = backbone(model).layers[0].register_forward_hook(lambda *_: calls.append(1))
    cpu = torch.device("cpu")

    def scores_and_grads(layout, frozen):
        model.zero_grad(set_to_none=True)
        scores = ranking_scores(model, groups, tok.pad_token_id, cpu, layout, batch_size=2, frozen=frozen)
        (scores * weights).sum().backward()
        return scores.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    kept = FrozenStates(1)
    for name, layout in LAYOUTS.items():
        whole, whole_grads = scores_and_grads(layout, None)
        assert whole_grads and not any("layers.0." in n for n in whole_grads)  # nothing trains below the top
        calls.clear()
        for _ in range(2):
            scores, grads = scores_and_grads(layout, kept)
            torch.testing.assert_close(scores, whole, rtol=1e-5, atol=1e-6)
            assert_same_grads(grads, whole_grads)
        assert len(calls) == (2 if name == "padded" else 0), name  # computed once, by the first layout
        assert len(kept) == 5
    hook.remove()
    # what the stage budgets before it starts is what is held, a ranking's prompt once where sharing pays
    for layout in LAYOUTS.values():
        again = FrozenStates(1)
        again.fill(model, groups, tok.pad_token_id, cpu, layout)
        assert again.nbytes == frozen_states_bytes(model, 1, groups, layout) > 0
    assert frozen_states_bytes(model, 1, groups, Layout(shared=True)) < frozen_states_bytes(model, 1, groups, Layout())


def test_bf16_scores_take_the_normalisation_bias_in_fp32_in_every_layout():
    """A bf16 RM after train-rm set a bias of 5: in bf16, 5 + a score has steps of 1/32, so scores 0.006 apart
    tied and the tie counted as a wrong pair. Every layout adds the bias in fp32: the scores are the raw ones
    plus 5 exactly, still distinct, and each layout's accuracy is that of the unbiased scores."""
    from instructgpt_cli.forward import REWARD_BIAS

    tok = tiny_tokenizer()
    model = tiny_model(tok, seed=0, kind="reward").to(torch.bfloat16).eval()
    rankings = (("Rank these.", ["short", "a somewhat longer answer", "the longest answer of all, by far"], [1, 2, 2]),
                ("Another question", ["yes", "no", "maybe so"], [2, 1, 3]))
    groups = []
    for prompt, responses, ranks in rankings:
        seqs, _, plen = tokenize_scored(tok, [{"role": "user", "content": prompt}], responses, 256, "f:1", [])
        groups.append(RankedGroup(seqs, [(i, j) for i in range(3) for j in range(3) if ranks[i] < ranks[j]], plen))
    cpu = torch.device("cpu")
    with torch.no_grad():
        got = {}
        for bias in (0.0, 5.0):
            setattr(model.config, REWARD_BIAS, bias)
            for name, layout in LAYOUTS.items():
                scores = ranking_scores(model, [g.sequences for g in groups], tok.pad_token_id, cpu, layout)
                _, correct, _ = rank_forward(Runner(model, cpu), groups, tok.pad_token_id, cpu, layout)
                got[bias, name] = scores, correct.tolist()
    for name in LAYOUTS:
        (raw, raw_correct), (biased, correct) = got[0.0, name], got[5.0, name]
        assert correct == raw_correct, name
        assert len(set(raw.tolist())) == 6 and torch.equal(biased, raw + 5.0), name  # fp32: 5 + x is exact here
        assert biased.dtype == torch.float32
    padded, padded_correct = got[5.0, "padded"]
    assert padded_correct == [1.0] * 5  # each ranking's better response scores higher, by 0.006 or more
    for name in LAYOUTS:  # the layouts differ only in the bf16 trunk's rounding (a bf16 step at 0.14: 0.001)
        torch.testing.assert_close(got[5.0, name][0], padded, rtol=0, atol=4e-3)
        assert got[5.0, name][1] == padded_correct, name


def rm_args(tmp_path, run_dir, rankings, *extra):
    demos = write_jsonl(tmp_path / "demos.jsonl", arithmetic_demos(16))
    return ["train-rm", "--model", "tiny", "--rankings", rankings, "--demos", demos, "--run-dir", run_dir,
            "--lr", "2e-3", "--batch-size", "8", "--eval-every", "5", *extra]


def test_cli_learns_a_marker_preference_and_normalises_demos_to_zero(tmp_path):
    from transformers import AutoModelForSequenceClassification

    rankings = write_jsonl(tmp_path / "ranks.jsonl", marker_rankings(100))
    run_dir = tmp_path / "run"
    result = igpt(*rm_args(tmp_path, run_dir, rankings, "--epochs", "4"))
    assert result.exit_code == 0, result.output
    metrics = read_metrics(run_dir / "rm" / "metrics.jsonl")
    assert metrics[-1]["eval/accuracy"] >= 0.9
    assert metrics[-1]["train/loss"] < metrics[0]["train/loss"]
    manifest = json.loads((run_dir / "manifest.json").read_text())["stages"]["rm"]
    assert manifest["status"] == "completed" and manifest["outputs"]["eval/accuracy"] >= 0.9

    # reload from rm/final: plain transformers class, normalisation stored with it
    final = run_dir / "rm" / "final"
    hf = AutoModelForSequenceClassification.from_pretrained(final)
    assert hf.config.num_labels == 1 and hf.config.pad_token_id != hf.config.eos_token_id
    tok, path = load_tokenizer(ModelConfig(name=str(final)))
    model = load_model(ModelConfig(name=str(final)), tok, path, torch.device("cpu"), 0, kind="reward")
    demos = read_demos(tmp_path / "demos.jsonl")
    seqs = [tokenize_scored(tok, d.messages, [d.response], 256, d.where, [])[0][0] for d in demos]
    scores = score_sequences(model, seqs, tok.pad_token_id, 5)
    assert abs(scores.double().mean().item()) < 1e-4
    assert scores.std() > 0  # the model does not score everything the same


def test_the_spread_of_one_demonstration_is_null_not_nan(tmp_path):
    """One demonstration has a mean score but no sample standard deviation: the manifest and the reward model's
    stored stats say null (strict JSON), as does the printed summary, where float(std) of one score was NaN."""
    def no_nan(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in strict JSON"))

    rankings = write_jsonl(tmp_path / "ranks.jsonl", marker_rankings(8))
    demos = write_jsonl(tmp_path / "one.jsonl", arithmetic_demos(1))
    run_dir = tmp_path / "run"
    result = igpt("train-rm", "--model", "tiny", "--rankings", rankings, "--demos", demos, "--run-dir", run_dir,
                  "--max-steps", "1", "--val-fraction", "0")
    assert result.exit_code == 0, result.output
    outputs = no_nan((run_dir / "manifest.json").read_text())["stages"]["rm"]["outputs"]
    stats = no_nan((run_dir / "rm" / "final" / "config.json").read_text())["igpt_reward_stats"]
    for summary in (outputs, stats):
        assert summary["demos/raw_std"] is None and math.isfinite(summary["demos/raw_mean"])
    assert "nan" not in result.output.lower()


MALFORMED = [
    ("k_below_2", [{"prompt": "p", "responses": ["only one"], "ranks": [1]}], 1, "responses: need at least 2"),
    ("ranks_length", [{"prompt": "p", "responses": ["a", "b", "c"], "ranks": [1, 2]}], 1, "ranks: has 2 entries for 3"),
    ("ranks_not_int", [{"prompt": "p", "responses": ["a", "b"], "ranks": [1, "2"]}], 1, "ranks[1]: must be an integer"),
    ("ranks_float", [{"prompt": "p", "responses": ["a", "b"], "ranks": [1.5, 2]}], 1, "ranks[0]: must be an integer"),
    ("rank_zero", [{"prompt": "p", "responses": ["a", "b"], "ranks": [0, 1]}], 1, "ranks[0]: must be an integer >= 1"),
    ("all_tied", [{"prompt": "p", "responses": ["a", "b", "c"], "ranks": [2, 2, 2]}], 1, "all responses are tied"),
    ("duplicates", [{"prompt": "p", "responses": ["a", "b", "a "], "ranks": [1, 2, 3]}], 1,
     "responses[2]: duplicate of responses[0]"),
    ("empty_response", [{"prompt": "p", "responses": ["a", ""], "ranks": [1, 2]}], 1, "responses[1]: must be a non-empty"),
    ("missing_ranks", [{"prompt": "p", "responses": ["a", "b"]}], 1, "ranks: missing"),
    ("chosen_eq_rejected", [{"prompt": "p", "chosen": "x", "rejected": "x"}], 1, "rejected: identical to chosen"),
    ("no_responses", [{"prompt": "p", "answer": "x"}], 1, "responses: missing"),
    ("mixed_formats", [{"prompt": "p", "responses": ["a", "b"], "ranks": [1, 2], "chosen": "a"}], 1, "not both"),
    ("no_prompt", [{"responses": ["a", "b"], "ranks": [1, 2]}], 1, "prompt: missing"),
]


@pytest.mark.parametrize("name,lines,lineno,reason", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_rankings_exit_2_and_change_nothing(tmp_path, name, lines, lineno, reason):
    good = {"prompt": "ok", "chosen": "yes", "rejected": "no"}
    rankings = write_jsonl(tmp_path / f"{name}.jsonl", [good, *lines])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "manifest.json").write_text('{"stages": {}}\n')
    result = igpt(*rm_args(tmp_path, run_dir, rankings))
    assert result.exit_code == 2, result.output
    assert f"{rankings}:{lineno + 1}: " in result.stderr and reason in result.stderr, result.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == ["manifest.json"]
    assert (run_dir / "manifest.json").read_text() == '{"stages": {}}\n'


def test_rm_without_demos_or_sft_run_is_refused(tmp_path):
    rankings = write_jsonl(tmp_path / "r.jsonl", marker_rankings(4))
    result = igpt("train-rm", "--model", "tiny", "--rankings", rankings, "--run-dir", tmp_path / "run")
    assert result.exit_code == 2 and "--demos" in result.stderr
    assert not (tmp_path / "run").exists()


def test_sample_output_with_ranks_trains_the_rm_unchanged(tmp_path, demos_file):
    run_dir = tmp_path / "run"
    assert igpt("sft", "--config", TINY_CONFIG, "--data", demos_file, "--run-dir", run_dir, "--max-steps", "4").exit_code == 0
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Tell me about {w}.", "category": "open_qa"}
                                                       for w in ("cats", "rain", "bread", "maps", "tea", "snow")])
    samples = tmp_path / "samples.jsonl"
    args = ["sample", "--prompts", prompts, "--k", "3", "--out", samples, "--run-dir", run_dir,
            "--max-new-tokens", "12", "--seed", "7"]
    assert igpt(*args).exit_code == 0
    lines = [json.loads(l) for l in samples.read_text().splitlines()]
    assert len(lines) == 6 and all(len(l["responses"]) == 3 and l["category"] == "open_qa" for l in lines)
    assert igpt(*args).exit_code == 2  # refuses to overwrite
    again = tmp_path / "again.jsonl"
    assert igpt(*args[:-4], "--out", again, "--run-dir", run_dir, "--max-new-tokens", "12", "--seed", "7").exit_code == 0
    assert again.read_text() == samples.read_text()  # same seed, same samples
    other = tmp_path / "other.jsonl"
    assert igpt(*args[:-4], "--out", other, "--run-dir", run_dir, "--max-new-tokens", "12", "--seed", "8").exit_code == 0
    assert other.read_text() != samples.read_text()
    # a labeler adds ranks; train-rm takes the file as it is, initialised from the run's SFT model and
    # normalised on the run's SFT demonstrations by default
    ranked = write_jsonl(tmp_path / "ranked.jsonl", [{**l, "ranks": [1, 2, 3]} for l in lines])
    result = igpt("train-rm", "--rankings", ranked, "--run-dir", run_dir, "--max-steps", "2", "--batch-size", "2")
    assert result.exit_code == 0, result.output
    manifest = json.loads((run_dir / "manifest.json").read_text())["stages"]["rm"]
    assert manifest["inputs"]["demos"]["path"] == str(demos_file.resolve())
    sft_out = json.loads((run_dir / "manifest.json").read_text())["stages"]["sft"]["outputs"]
    assert manifest["inputs"]["init"]["path"].endswith("sft/final")  # lineage: built from exactly these weights
    assert manifest["inputs"]["init"]["sha256"] == sft_out["sha256"] == weights_sha256(run_dir / "sft" / "final")
    sft_embed = load_file(str(run_dir / "sft" / "final" / "model.safetensors"))["model.embed_tokens.weight"]
    rm_embed = load_file(str(run_dir / "rm" / "final" / "model.safetensors"))["model.embed_tokens.weight"]
    assert sft_embed.shape == rm_embed.shape and not torch.equal(sft_embed, rm_embed)


@pytest.mark.parametrize("lora", [[], ["--lora", "--lora-layers", "1"]], ids=["full", "lora-top-layer"])
def test_killed_rm_run_resumes_bit_identical(tmp_path, lora):
    """With LoRA on the top layer only, the layer below runs once per ranking and its output is kept: the resumed
    run computes it again, each ranking alone as the first run did, and reads the same numbers."""
    from test_sft import run_subprocess

    rankings = write_jsonl(tmp_path / "ranks.jsonl", marker_rankings(60))
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    common = rm_args(tmp_path, straight, rankings, "--max-steps", "12", "--save-every", "4", *lora)
    first = igpt(*common)
    assert first.exit_code == 0
    assert ("the lowest 1 of 2 layers run once per ranking" in first.stderr) == bool(lora)
    common_i = [str(interrupted) if a == straight else a for a in common]
    killed = run_subprocess(common_i, {"IGPT_FAULT_AFTER_STEP": "6"})
    assert killed.returncode == 99, killed.stderr
    resumed = igpt(*common_i, "--resume")
    assert resumed.exit_code == 0 and "from step-000004" in resumed.stderr
    a = load_file(str(straight / "rm" / "final" / "model.safetensors"))
    b = load_file(str(interrupted / "rm" / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    ca = json.loads((straight / "rm" / "final" / "config.json").read_text())
    cb = json.loads((interrupted / "rm" / "final" / "config.json").read_text())
    assert ca["igpt_reward_bias"] == cb["igpt_reward_bias"]


def test_lora_rm_merged_scores_equal_adapter_scores(tmp_path):
    from peft import PeftModel

    rankings = write_jsonl(tmp_path / "ranks.jsonl", marker_rankings(24))
    run_dir = tmp_path / "run"
    result = igpt(*rm_args(tmp_path, run_dir, rankings, "--lora", "--max-steps", "4"))
    assert result.exit_code == 0, result.output
    final = run_dir / "rm" / "final"
    tok = tiny_tokenizer()
    merged = load_model(ModelConfig(name=str(final)), tok, final, torch.device("cpu"), 0, kind="reward")
    base = tiny_model(tok, seed=0, kind="reward")
    adapted = PeftModel.from_pretrained(base, final / "adapter").eval()
    ids = torch.tensor([[1, 80, 90, 100, 33, 2], [1, 70, 71, 72, 2, 3]])
    mask = (ids != tok.pad_token_id).long()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids, attention_mask=mask).logits,
                                   adapted(input_ids=ids, attention_mask=mask).logits, rtol=1e-4, atol=1e-5)


def test_demo_scores_come_back_in_file_order_though_scored_shortest_first():
    """train-rm scores the demonstrations in batches of about one length (shortest first, less padding) and
    returns each score at its demonstration's place: scored one at a time, in file order, each is the same."""
    from instructgpt_cli.stages.reward import demo_scores

    tok = tiny_tokenizer()
    model = tiny_model(tok, seed=5, kind="reward").eval()
    lengths = [9, 3, 14, 5, 11, 3, 7]  # unsorted, with a repeated length and a last short batch at size 3
    seqs = [[(7 * i + j) % 200 + 20 for j in range(n)] for i, n in enumerate(lengths)]
    starts = [n // 2 for n in lengths]
    got = demo_scores(Runner.for_eval(model), seqs, starts, tok.pad_token_id, 3)
    alone = torch.cat([score_sequences(model, [q], tok.pad_token_id, 1) for q in seqs])
    assert got.shape == (len(seqs),)
    assert torch.allclose(got, alone, atol=1e-5)
    assert not torch.allclose(got[0], got[1], atol=1e-3)  # distinct scores: a mix-up would show


def test_norm_demos_normalises_on_a_seeded_sample_of_the_demonstrations(tmp_path):
    """--norm-demos N: the bias makes a seeded random N of the demonstrations score mean 0 (not all of them), the
    summary says how many, and the same seed draws the same sample."""
    rankings = write_jsonl(tmp_path / "ranks.jsonl", marker_rankings(12))
    demos_file = write_jsonl(tmp_path / "demos.jsonl", arithmetic_demos(10))
    biases = []
    for run in ("a", "b"):
        run_dir = tmp_path / run
        result = igpt("train-rm", "--model", "tiny", "--rankings", rankings, "--demos", demos_file, "--run-dir",
                      run_dir, "--max-steps", "2", "--val-fraction", "0", "--norm-demos", "4", "--seed", "3")
        assert result.exit_code == 0, result.output
        outputs = json.loads((run_dir / "manifest.json").read_text())["stages"]["rm"]["outputs"]
        assert outputs["demos/n"] == 4
        biases.append(json.loads((run_dir / "rm" / "final" / "config.json").read_text())["igpt_reward_bias"])
    assert biases[0] == biases[1]  # the same seed, the same sample
    final = tmp_path / "a" / "rm" / "final"
    tok, path = load_tokenizer(ModelConfig(name=str(final)))
    model = load_model(ModelConfig(name=str(final)), tok, path, torch.device("cpu"), 0, kind="reward")
    demos = read_demos(demos_file)
    seqs = [tokenize_scored(tok, d.messages, [d.response], 256, d.where, [])[0][0] for d in demos]
    scores = score_sequences(model, seqs, tok.pad_token_id, 5).double()
    sample = sorted(__import__("random").Random(3).sample(range(10), 4))
    # the sample's mean is 0, all ten's is not (the tiny model's scores spread by about 0.01: the two means differ
    # by about 1.5e-4, the sample's is 0 to float32 rounding)
    assert abs(scores[sample].mean().item()) < 1e-6 and abs(scores.mean().item()) > 2e-5
    bad = igpt("train-rm", "--model", "tiny", "--rankings", rankings, "--demos", demos_file, "--run-dir",
               tmp_path / "c", "--norm-demos", "-1")
    assert bad.exit_code == 2 and "norm" in bad.stderr and not (tmp_path / "c").exists()


def test_train_rm_keeps_the_frozen_layers_output_once_for_every_member_and_trains_as_without_it(tmp_path,
                                                                                               monkeypatch):
    """An ensemble of two with LoRA on the top layer: the layer below runs once per ranking for both members
    (they start from one model), and the models trained equal those trained with the whole model every forward
    (--frozen-cache-gib 0) up to float noise; a budget too small for the states keeps none, and says so."""
    import instructgpt_cli.rewards as rewards_module

    lower_runs = []
    lower_states = rewards_module.lower_states

    def counted(*args, **kwargs):
        lower_runs.append(1)
        return lower_states(*args, **kwargs)

    monkeypatch.setattr(rewards_module, "lower_states", counted)
    rankings = write_jsonl(tmp_path / "ranks.jsonl", marker_rankings(40))
    demos = write_jsonl(tmp_path / "demos.jsonl", arithmetic_demos(16))
    sft = igpt("sft", "--model", "tiny", "--data", demos, "--run-dir", tmp_path / "base", "--max-steps", "1")
    assert sft.exit_code == 0, sft.output  # the members' one initial model (a tiny one is random from each seed)
    runs = {}
    for name, extra in {"kept": [], "whole": ["--frozen-cache-gib", "0"], "small": ["--frozen-cache-gib", "1e-9"]}.items():
        lower_runs.clear()
        result = igpt("train-rm", "--sft", tmp_path / "base" / "sft" / "final", "--rankings", rankings, "--demos",
                      demos, "--run-dir", tmp_path / name, "--lr", "2e-3", "--eval-every", "5", "--lora",
                      "--lora-layers", "1", "--ensemble", "2", "--max-steps", "6", "--batch-size", "8", *extra)
        assert result.exit_code == 0, result.output
        runs[name] = (len(lower_runs), result.stderr)
    n_kept, log = runs["kept"]
    assert n_kept == 40 and log.count("the lowest 1 of 2 layers run once per ranking") == 2  # 6 x 8 > 40: all seen
    assert runs["whole"][0] == 0 and "run once per ranking" not in runs["whole"][1]
    assert runs["small"][0] == 0 and "keeping their output would take" in runs["small"][1]
    for member in ("final", "members/member-1/rm/final"):
        a = load_file(str(tmp_path / "kept" / "rm" / member / "model.safetensors"))
        b = load_file(str(tmp_path / "whole" / "rm" / member / "model.safetensors"))
        changed = load_file(str(tmp_path / "kept" / "rm" / "members/member-1/rm/final" / "model.safetensors"))
        for k in a:  # Adam moves a weight by up to lr (2e-3) a step, whatever its gradient's size: half of that
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-3, msg=f"{member}: {k}")
        assert any(not torch.equal(a[k], changed[k]) for k in a) or member != "final"  # the members differ
    losses = [[r["train/loss"] for r in read_metrics(tmp_path / name / "rm" / "metrics.jsonl") if "train/loss" in r]
              for name in ("kept", "whole")]
    assert len(losses[0]) == 6 and losses[0] == pytest.approx(losses[1], rel=1e-5)
    ka = json.loads((tmp_path / "kept" / "rm" / "final" / "config.json").read_text())["igpt_reward_stats"]
    kb = json.loads((tmp_path / "whole" / "rm" / "final" / "config.json").read_text())["igpt_reward_stats"]
    assert ka["eval/accuracy"] == kb["eval/accuracy"] and ka["eval/loss"] == pytest.approx(kb["eval/loss"], rel=1e-4)
    assert ka["ensemble/accuracy"] == kb["ensemble/accuracy"]
