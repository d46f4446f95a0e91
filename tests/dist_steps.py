"""One PPO update (score_rollout + ppo_update, with ptx) and one reward-model step (train, evaluate,
score demonstrations) on fixed data, computed the way each rank of a launched run computes them: every
rank takes its share of the same rollout / micro-batches. Run alone it is the single-process reference;
under torchrun rank 0 saves what DDP and then FSDP produced:

    python -m torch.distributed.run --nproc-per-node 2 tests/dist_steps.py OUT.pt
"""
from __future__ import annotations

import random
import sys

import torch

from instructgpt_cli import distributed
from instructgpt_cli.config import OptimConfig, PPOConfig
from instructgpt_cli.data import read_rankings
from instructgpt_cli.batches import tokenize_rankings
from instructgpt_cli.families import supports_packing, supports_sharing
from instructgpt_cli.models import tiny_model, tiny_tokenizer
from instructgpt_cli.rollout import Rollout, build_rollout
from instructgpt_cli.stages import ppo, reward
from instructgpt_cli.runners import Runner
from instructgpt_cli.train import TrainState, micro_batches

CPU = torch.device("cpu")


def full_weights(model: torch.nn.Module) -> dict:
    """Every weight, gathered from the shards under FSDP (rank 0; others get {})."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if distributed.is_sharded(model):
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def rollout_data(tok) -> tuple[list, list, list]:
    """8 queries and responses of varied lengths (half end in EOS) and 10 pretraining blocks."""
    rng = random.Random(0)
    tokens = lambda n: [rng.randrange(4, len(tok)) for _ in range(n)]  # noqa: E731
    queries = [tokens(rng.randint(3, 9)) for _ in range(8)]
    responses = [tokens(rng.randint(1, 11)) + ([tok.eos_token_id] if i % 2 else []) for i in range(8)]
    blocks = [tokens(rng.randint(5, 20)) for _ in range(10)]
    return queries, responses, blocks


def ppo_on_ranks(fsdp: bool) -> dict:
    tok = tiny_tokenizer()
    policy, value = tiny_model(tok, seed=0), tiny_model(tok, seed=1, kind="reward")
    ref = tiny_model(tok, seed=0).requires_grad_(False).eval()
    rm = tiny_model(tok, seed=2, kind="reward").requires_grad_(False).eval()
    cfg = PPOConfig(rollout_batch_size=8, mini_batch_size=8, ppo_epochs=2, temperature=0.7, ptx_coef=0.5,
                    ptx_batch_size=3, optim=OptimConfig(batch_size=2), fsdp=fsdp)
    trained = ppo.PolicyAndValue(policy, value)
    models = ppo.as_runners(ppo.PPOModules(policy, value, reference=ref, reward=rm), cfg, CPU)
    # SGD: the weight change is the gradient itself (Adam would amplify float noise in tiny gradients);
    # policy and value in their own parameter groups, as ppo.run builds them
    optimizer = torch.optim.SGD([{"params": [p for p in m.parameters() if p.requires_grad]} for m in (policy, value)],
                                lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    queries, responses, blocks = rollout_data(tok)
    mine = list(range(8))[distributed.rank()::distributed.world_size()]  # as ppo.run shares a step's prompts
    ro = Rollout(*build_rollout([queries[j] for j in mine], [responses[j] for j in mine], tok.pad_token_id,
                                tok.eos_token_id))
    sc = ppo.score_rollout(models, ro, cfg, 0.05, cfg.optim.batch_size)
    stats, _ = ppo.ppo_update(models, ppo.PPOState(trained, optimizer, scheduler), ro, sc, cfg, blocks, tok.pad_token_id)
    return {"weights": full_weights(trained), "stats": stats}


def rm_step(fsdp: bool, rankings_path: str) -> dict:
    tok = tiny_tokenizer()
    model = tiny_model(tok, seed=3, kind="reward")
    run = Runner(model, CPU, fsdp)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    groups, _ = tokenize_rankings(tok, read_rankings(rankings_path), 256)
    # 9 prompts in micro-batches of 2: 5 chunks, so under 2 ranks one rank adds a weight-0 chunk
    # the default layout: a ranking's prompt run once where that pays, else responses packed end to end
    layout = reward.Layout(shared=supports_sharing(model), packed=supports_packing(model))
    record = reward.train_step(run, TrainState(model, optimizer, scheduler), micro_batches(groups[:9], 2),
                               tok.pad_token_id, layout, CPU, 100.0)
    held_out = reward.evaluate(run, groups[9:14], 2, tok.pad_token_id, layout, CPU)
    scores = reward.demo_scores(run, [s for g in groups[14:17] for s in g.sequences],
                                [s for g in groups[14:17] for s in g.starts()], tok.pad_token_id, 3)
    return {"weights": full_weights(model), "record": record, "eval": held_out, "scores": scores}


def all_steps(rankings_path: str, fsdp: bool) -> dict:
    return {"ppo": ppo_on_ranks(fsdp), "rm": rm_step(fsdp, rankings_path)}


if __name__ == "__main__":
    out, rankings_path = sys.argv[1], sys.argv[2]
    with distributed.launched("cpu"):
        results = {mode: all_steps(rankings_path, mode == "fsdp") for mode in ("ddp", "fsdp")}
        if distributed.is_main():
            torch.save(results, out)
