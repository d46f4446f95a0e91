"""train-rm --score mean: the reward read as the scalar head's mean over the response's tokens, by hand in every
row layout and on the rollout path PPO, eval and compare score with; saved with the model and read back."""
import json

import pytest
import torch

from conftest import arithmetic_demos, igpt, marker_rankings, write_jsonl
from instructgpt_cli.batches import pays_to_pack, pays_to_share, tokenize_rankings, tokenize_scored
from instructgpt_cli.config import ModelConfig
from instructgpt_cli.data import read_demos, read_rankings
from instructgpt_cli.forward import REWARD_BIAS, REWARD_POOL, scalar_head_outputs
from instructgpt_cli.models import load_model, load_tokenizer, tiny_model, tiny_tokenizer
from instructgpt_cli.rewards import Layout, ranking_scores, score_sequences
from instructgpt_cli.rollout import score_responses
from instructgpt_cli.runners import Runner
from instructgpt_cli.stages.evaluate import ranking_accuracy

CPU = torch.device("cpu")
RANKINGS = (("Rank these.", ["short", "a somewhat longer answer", "the longest answer of all, by far"]),
            ("Another question", ["yes", "no", "maybe so"]))


def tokenized(tok):
    """Each ranking's sequences (prompt + response + EOS) and its prompt's length."""
    out = []
    for prompt, responses in RANKINGS:
        seqs, _, prompt_len = tokenize_scored(tok, [{"role": "user", "content": prompt}], responses, 256, "f:1", [])
        out.append((seqs, prompt_len))
    return out


def by_hand(model, seq: list[int], start: int, pool: str) -> float:
    """The head on the sequence alone (one unpadded row), read at its last token or averaged from ``start``."""
    with torch.no_grad():
        head = scalar_head_outputs(model, input_ids=torch.tensor([seq]))[0]
    return float(head[-1] if pool == "last" else head[start:].mean())


@pytest.mark.parametrize("layout", [Layout(), Layout(packed=True), Layout(shared=True)])
def test_the_mean_over_the_response_by_hand_in_every_row_layout(layout):
    tok = tiny_tokenizer()
    model = tiny_model(tok, seed=0, kind="reward").eval()
    setattr(model.config, REWARD_BIAS, 0.75)
    groups = tokenized(tok)
    rankings = [seqs for seqs, _ in groups]
    starts = [p for seqs, p in groups for _ in seqs]
    assert pays_to_share(rankings) and pays_to_pack([len(s) for seqs in rankings for s in seqs])  # each layout runs
    with torch.no_grad():
        last = ranking_scores(model, rankings, tok.pad_token_id, CPU, layout, batch_size=2)
        setattr(model.config, REWARD_POOL, "mean")
        mean = ranking_scores(model, rankings, tok.pad_token_id, CPU, layout, batch_size=2, starts=starts)
        flat = [(s, p) for seqs, p in groups for s in seqs]
        want_mean = [by_hand(model, s, p, "mean") for s, p in flat]
        want_last = [by_hand(model, s, p, "last") for s, p in flat]
    assert mean.tolist() == pytest.approx(want_mean, abs=1e-5)  # the bias is in each position's head: in the mean
    assert last.tolist() == pytest.approx(want_last, abs=1e-5)
    assert max(abs(a - b) for a, b in zip(want_mean, want_last)) > 1e-3  # the two reads differ on these
    with pytest.raises(ValueError, match="where each response starts"):
        ranking_scores(model, rankings, tok.pad_token_id, CPU, layout)


def test_the_pooled_score_trains_the_head_from_every_response_token():
    tok = tiny_tokenizer()
    model = tiny_model(tok, seed=0, kind="reward").train()
    setattr(model.config, REWARD_POOL, "mean")
    (seqs, prompt_len), _ = tokenized(tok)
    scores = ranking_scores(model, [seqs], tok.pad_token_id, CPU, Layout(), starts=[prompt_len] * len(seqs))
    scores.sum().backward()
    head = next(p for n, p in model.named_parameters() if n.startswith("score"))
    assert head.grad is not None and head.grad.abs().sum() > 0


def test_ppo_eval_and_compares_rollout_path_reads_the_same_pooled_score():
    """The rollout path (left-padded queries, sampled responses: ``Runner.scores``) and the rankings path agree,
    for a response that ended with EOS and one cut off without it."""
    tok = tiny_tokenizer()
    model = tiny_model(tok, seed=1, kind="reward").eval()
    setattr(model.config, REWARD_POOL, "mean")
    setattr(model.config, REWARD_BIAS, -0.5)
    groups = tokenized(tok)
    queries = [seqs[0][:p] for seqs, p in groups]
    responses = [groups[0][0][1][groups[0][1]:], groups[1][0][2][groups[1][1]:-1]]  # the second without its EOS
    with torch.no_grad():
        got = score_responses(Runner.for_eval(model), tok, queries, responses, batch_size=2)
        want = [by_hand(model, q + r, len(q), "mean") for q, r in zip(queries, responses)]
    assert got.tolist() == pytest.approx(want, abs=1e-5)


def test_train_rm_score_mean_saves_the_read_with_the_model_and_normalises_by_it(tmp_path):
    rankings = write_jsonl(tmp_path / "ranks.jsonl", marker_rankings(40))
    demos = write_jsonl(tmp_path / "demos.jsonl", arithmetic_demos(12))
    run_dir = tmp_path / "run"
    result = igpt("train-rm", "--model", "tiny", "--rankings", rankings, "--demos", demos, "--run-dir", run_dir,
                  "--score", "mean", "--lr", "2e-3", "--batch-size", "8", "--epochs", "2", "--ensemble", "2")
    assert result.exit_code == 0, result.output
    final = run_dir / "rm" / "final"
    for member in (final, run_dir / "rm" / "members" / "member-1" / "rm" / "final"):  # every member reads alike
        assert json.loads((member / "config.json").read_text())[REWARD_POOL] == "mean"
    outputs = json.loads((run_dir / "manifest.json").read_text())["stages"]["rm"]["outputs"]
    assert 0 <= outputs["ensemble/accuracy"] <= 1  # the ensemble's mean, scored where each response starts
    # the bias makes the demonstrations' pooled scores mean 0 (their last-token scores would not be)
    tok, path = load_tokenizer(ModelConfig(name=str(final)))
    model = load_model(ModelConfig(name=str(final)), tok, path, CPU, 0, kind="reward")
    scored = [tokenize_scored(tok, d.messages, [d.response], 256, d.where, []) for d in read_demos(demos)]
    seqs, starts = [s[0][0] for s in scored], [s[2] for s in scored]
    assert abs(score_sequences(model, seqs, tok.pad_token_id, 5, starts).double().mean().item()) < 1e-4
    # eval --rankings reads the pooled score: its accuracy is that of the scores by hand
    read = read_rankings(rankings)
    with torch.no_grad():
        report = ranking_accuracy(Runner.for_eval(model), tok, read, 4)
        hand = [[by_hand(model, s, g.prompt_len, "mean") for s in g.sequences]
                for g in tokenize_rankings(tok, read, 256)[0]]
    pairs = [(h[b] > h[w]) for h, r in zip(hand, read) for b, w in r.pairs()]
    assert report["rm_pairs"] == len(pairs) and report["rm_accuracy"] == pytest.approx(sum(pairs) / len(pairs))
    delattr(model.config, REWARD_POOL)
    assert abs(score_sequences(model, seqs, tok.pad_token_id, 5).double().mean().item()) > 1e-3
    # the default leaves no field: any other tool's reward model reads at the last token, as before
    again = igpt("train-rm", "--model", "tiny", "--rankings", rankings, "--demos", demos, "--run-dir",
                 tmp_path / "last", "--max-steps", "1")
    assert again.exit_code == 0, again.output
    assert REWARD_POOL not in json.loads((tmp_path / "last" / "rm" / "final" / "config.json").read_text())


def test_score_takes_last_or_mean_only(tmp_path):
    rankings = write_jsonl(tmp_path / "ranks.jsonl", marker_rankings(8))
    result = igpt("train-rm", "--model", "tiny", "--rankings", rankings, "--run-dir", tmp_path / "run",
                  "--score", "max", "--no-normalize")
    assert result.exit_code == 2 and "must be one of last, mean" in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_read_igpt_does_not_know_is_refused_never_taken_for_another():
    from instructgpt_cli.errors import BadInput
    from instructgpt_cli.forward import reward_pool

    tok = tiny_tokenizer()
    model = tiny_model(tok, seed=0, kind="reward")
    assert reward_pool(model) == "last"  # no field: any other tool's reward model
    setattr(model.config, REWARD_POOL, "Mean")
    with pytest.raises(BadInput, match="igpt_reward_pool: 'Mean' must be one of last, mean"):
        reward_pool(model)


def test_ppo_s_cached_trunk_and_an_ensemble_of_mixed_reads_score_as_each_member_alone():
    """PPO hands the reward model its frozen layers' output (``trunk``) under LoRA, and an ensemble's members may
    read differently: each member's score is the one it gives alone, pooled or not, on either forward path."""
    from instructgpt_cli import forward
    from instructgpt_cli.rollout import build_rollout
    from instructgpt_cli.runners import RewardEnsemble

    tok = tiny_tokenizer()
    pooled, last = (tiny_model(tok, seed=s, kind="reward").eval() for s in (2, 3))
    setattr(pooled.config, REWARD_POOL, "mean")
    groups = tokenized(tok)
    queries = [seqs[0][:p] for seqs, p in groups]
    responses = [seqs[1][p:] for seqs, p in groups]
    ro = build_rollout(queries, responses, tok.pad_token_id, tok.eos_token_id)
    want = [by_hand(m, q + r, len(q), pool) for q, r in zip(queries, responses)
            for m, pool in ((pooled, "mean"), (last, "last"))]  # (B, M) row by row
    with torch.no_grad():
        for path in (forward.LEAN, forward.TRANSFORMERS):
            runners = [Runner.for_eval(m) for m in (pooled, last)]
            for r in runners:
                r.path = path
            states = runners[0].trunk(1, ro.query_response, ro.attention_mask)
            alone = runners[0].scores(ro.query_response, ro.attention_mask, ro.context_len, ro.lengths)
            cached = runners[0].scores(ro.query_response, ro.attention_mask, ro.context_len, ro.lengths, (1, states))
            assert cached.tolist() == pytest.approx(alone.tolist(), abs=1e-5), path
            both = RewardEnsemble(runners, "mean", 1.0).member_scores(ro.query_response, ro.attention_mask,
                                                                       ro.context_len, ro.lengths, (1, states))
            assert both.flatten().tolist() == pytest.approx(want, abs=1e-5), path
