"""``igpt eval MODEL``: the paper's automatic measurements of one model.

On held-out prompts: the reward model's score of the model's responses (mean and sd), response length and
EOS rate, all at eval's sampling temperature, and the KL to the SFT model at PPO's temperature T, KL(pi_T ||
pi_SFT,T), what PPO pays for: on the model's samples drawn at T (a second set, same seed, where eval's own
temperature is another); on held-out pretraining text: LM loss and perplexity next to the SFT model's (the
alignment tax PPO-ptx reduces); on held-out rankings: the reward model's pairwise accuracy. Per category where
prompts carry one. report.json and samples.jsonl are published together (``rundir.publish_set``), replace
earlier ones only with ``--overwrite``, and are strict JSON: a number that is undefined (the sd of one score,
the accuracy over no pairs) is null, never NaN. Prompts are sampled and measured ``rollout.CHUNK`` at a time,
each chunk seeded from (seed, chunk) and kept in eval/.NAME.partial/ as it is drawn, so a stopped eval goes
on with ``--resume`` to the report an uninterrupted one writes.
"""
from __future__ import annotations

import base64
import json
import math
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import torch

from .. import eval_table, frontier, refs
from ..refs import model_or_checkpoint
from ..config import EvalConfig, ModelConfig, PPOConfig, drawn_settings
from ..console import console, say
from ..batches import pretrain_blocks, render_queries, tokenize_rankings
from ..data import Prompt, read_pretrain, read_prompts, read_rankings
from ..distributed import resolve_device
from ..errors import BadInput
from ..families import supports_sharing
from ..judges import Settings
from ..presets import saved_config
from ..models import (load_model, load_trained_policy, load_tokenizer, position_limit, require_role,
                      require_same_tokenizer, reward_identity, stage_inputs)
from ..report import number, score_text, temperatures_text
from ..report_plots import frontier_chart
from ..rewards import Layout
from ..rollout import (CHUNK, chunk_seed, decode_response, draw_chunks, kept_until_published, kl_and_scores, lm_loss,
                       response_kl, score_responses, start_kept)
from ..runners import Runner
from ..locks import claim
from ..rundir import STAGE_MODELS, record_report
from ..stats import length_bias, rm_accuracy
from ..sources import input_sha256
from ..storage import json_sha256, publish_set, weights_sha256


SUMMARY = "summary"  # eval/summary/: the table of several models (run_table), no model's own report


def perplexity(loss: float) -> float | None:
    """exp(loss); None past what a float holds (a loss above ~709 nats: a diverged model, not a number)."""
    return math.exp(loss) if loss < 709.0 else None


def summarise(scores: list[float], kls: list[float], lengths: list[int], eos: list[bool]) -> dict:
    """Means over one group of responses (each list has one entry per response; ``scores`` is empty without
    a reward model). Undefined numbers are None, not NaN (strict JSON): every mean of an empty group, and
    the score's sample sd (n - 1 in the denominator) of fewer than two scores."""
    def mean(xs: list) -> float | None:
        return sum(xs) / len(xs) if xs else None

    out = {"n": len(lengths), "kl_to_sft": mean(kls), "response_length": mean(lengths), "eos_rate": mean(eos)}
    if scores:
        m = sum(scores) / len(scores)
        out["score_mean"] = m
        out["score_sd"] = (math.sqrt(sum((s - m) ** 2 for s in scores) / (len(scores) - 1)) if len(scores) > 1
                           else None)
    return out


def kl_temperature(cfg: EvalConfig, run_dir: Path) -> tuple[float, str]:
    """The temperature of the log-probs in the KL to SFT, and where it came from. PPO penalises
    log pi(y|x) - log pi_SFT(y|x) of logits / T at its own sampling temperature T (``stages/ppo.py``'s
    scoring), so eval measures the same quantity: ``--kl-temperature`` when given, else the temperature the
    run's PPO trained with (``ppo/config.yaml``), else PPO's default. Independent of eval's sampling
    temperature, which may be 0 (greedy), where logits / T has no meaning."""
    if cfg.kl_temperature > 0:
        return cfg.kl_temperature, "--kl-temperature"
    ppo = saved_config(run_dir / "ppo")
    if ppo is not None and ppo.temperature > 0:
        return ppo.temperature, str(run_dir / "ppo" / "config.yaml")
    return PPOConfig().temperature, "PPO's default temperature"


def load(cfg: EvalConfig, path: Path, tokenizer, device, kind: str = "causal") -> Runner:
    return Runner.for_eval(load_model(ModelConfig(name=str(path), dtype=cfg.dtype), tokenizer, path, device, cfg.seed,
                                      kind).eval())


class Responses(NamedTuple):
    """What :func:`respond` measures of one model, one entry per query."""

    responses: list[list[int]]  # token ids as sampled at eval's temperature
    kls: list[float]  # KL to SFT at PPO's temperature, on kl_responses
    scores: list[float]  # the reward model's scores of ``responses``; [] without one
    kl_responses: list[list[int]] | None  # the samples drawn at PPO's temperature; None: ``responses`` are they


def respond(cfg: EvalConfig, model: Runner, sft: Runner, rm: Runner | None, tokenizer, queries: list[list[int]],
            kl_t: float) -> Responses:
    """The model's responses to ``queries`` (token ids as sampled with cfg's decoding settings, seeded with
    cfg.seed), their reward model's scores, and the KL to ``sft`` at PPO's temperature ``kl_t`` (0 where ``sft``
    is the model): what ``igpt eval`` measures of one model, and the frontier of each checkpoint.

    The KL is that of the response distributions at kl_t, KL(pi_T || pi_SFT,T), the one PPO pays for: the
    per-token KL summed along samples drawn at kl_t (``rollout.response_kl``; its mean is unbiased only on
    samples of that temperature). Where cfg.temperature is another (the gold recipe samples at 0.7, PPO at 1;
    greedy eval at 0) a second set is drawn at kl_t, seeded with cfg.seed as the first: the KL then does not
    depend on eval's temperature, and equals the figure of an eval run at kl_t."""
    torch.manual_seed(cfg.seed)
    responses = model.generate(tokenizer, queries, cfg.max_new_tokens, cfg.temperature, cfg.batch_size,
                               progress="sample")
    kl_responses, scores = None, None
    if sft is model:  # log pi - log pi_SFT is exactly 0: no second set, no forwards
        kls = [0.0] * len(responses)
    elif cfg.temperature != kl_t:
        torch.manual_seed(cfg.seed)
        kl_responses = model.generate(tokenizer, queries, cfg.max_new_tokens, kl_t, cfg.batch_size,
                                      progress=f"sample at T={kl_t:g} for the KL")
        kls = response_kl(model, sft, tokenizer, queries, kl_responses, kl_t, cfg.batch_size).tolist()
    else:  # the KL and the scores along the same responses: their shared lowest layers run once
        kl, scores = kl_and_scores(model, sft, rm, tokenizer, queries, responses, kl_t, cfg.batch_size)
        kls = kl.tolist()
    if scores is None and rm is not None:
        scores = score_responses(rm, tokenizer, queries, responses, cfg.batch_size)
    return Responses(responses, kls, [] if scores is None else scores.tolist(), kl_responses)


def respond_chunk(cfg: EvalConfig, model: Runner, sft: Runner, rm: Runner | None, tokenizer, queries: list[list[int]],
                  kl_t: float, chunk: int) -> Responses:
    """:func:`respond` on chunk ``chunk`` of ``queries`` (``rollout.CHUNK`` of them), seeded from (cfg.seed,
    chunk) alone: a chunk draws the same whether eval drew the ones before it or a stopped eval did."""
    return respond(replace(cfg, seed=chunk_seed(cfg.seed, chunk)), model, sft, rm, tokenizer,
                   queries[chunk * CHUNK:(chunk + 1) * CHUNK], kl_t)


def respond_chunked(cfg: EvalConfig, model: Runner, sft: Runner, rm: Runner | None, tokenizer,
                    queries: list[list[int]], kl_t: float) -> Responses:
    """:func:`respond_chunk` over every chunk, joined: a frontier point measures what ``igpt eval`` of that
    model does."""
    parts = [respond_chunk(cfg, model, sft, rm, tokenizer, queries, kl_t, c) for c in range(-(-len(queries) // CHUNK))]
    return Responses(*[None if parts[0][f] is None else [x for part in parts for x in part[f]]
                       for f in range(len(Responses._fields))])


def kl_fields(cfg: EvalConfig, kl_t: float, kl_t_from: str, separate: bool | None = None) -> dict:
    """report.json's labels of the KL to SFT beside ``settings.temperature`` (eval's samples): the temperature
    of its log-probs, where that came from, the temperature its samples were drawn at (the same, PPO's), and
    whether those are a second set (eval's temperature is another) rather than eval's own samples."""
    return {"kl_temperature": kl_t, "kl_temperature_from": kl_t_from, "kl_sampled_at": kl_t,
            "kl_separate_samples": cfg.temperature != kl_t if separate is None else separate}


def report_dir(run_dir: Path, name: str) -> Path:
    """``RUN_DIR/eval/NAME``; NAME must be one folder name (``--name ../x`` or ``/tmp/x`` would write elsewhere,
    and a leading dot is how igpt marks a set being published)."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith("."):
        raise BadInput([f"--name {name!r}: a report name is one folder name under {run_dir / 'eval'} (no '/', not "
                        "starting with '.')"])
    if name == SUMMARY:
        raise BadInput([f"{run_dir / 'eval' / SUMMARY}: the table of igpt eval with several models; name this "
                        "report otherwise (--name)"])
    return run_dir / "eval" / name


class Plan(NamedTuple):
    """One model's evaluation, every input read and checked (:func:`plan`): nothing loaded, nothing written."""

    cfg: EvalConfig
    side: refs.Side  # the model as ``refs.model_or_checkpoint`` read it
    out: Path  # eval/NAME
    kept: Path  # eval/.NAME.partial: the chunks drawn so far
    prompts: list  # data.Prompt; [] without --prompts
    queries: list[list[int]]
    rankings: list
    texts: list[str]  # held-out pretraining text
    toxicity: list  # toxicity.ToxicityPrompt; [] without --toxicity-prompts
    toxicity_queries: list[list[int]]
    sft_path: Path | None  # None: no SFT model (benchmarks, toxicity or rankings alone, and the run has none)
    rm_path: Path | None
    tokenizer: object
    kl_t: float
    kl_t_from: str
    drawn_with: dict  # what the kept response chunks were drawn with
    toxicity_drawn_with: dict  # what the kept toxicity chunks were drawn with
    fingerprint: dict  # everything the report depends on: a report with the same one is fresh (reused)


def plan(cfg: EvalConfig, ref: str, name: str = "") -> Plan:
    """Read and check everything ``igpt eval REF`` needs before any weights load or any sampling: the model
    reference, the prompts, rankings, pretraining text, toxicity prompts and classifier, the benchmark tasks
    (their data cached locally), the SFT reference and reward model, the context every prompt must fit.
    BadInput names each problem; nothing is written."""
    run_dir = Path(cfg.run_dir)
    errors = []
    if cfg.toxicity_prompts and not cfg.toxicity_classifier:
        errors.append("--toxicity-classifier: required with --toxicity-prompts (a local sequence classifier directory "
                      "or python:MODULE:FUNCTION)")
    if cfg.toxicity_classifier and not cfg.toxicity_prompts:
        errors.append("--toxicity-prompts: required with --toxicity-classifier")
    if (cfg.benchmark_tasks or cfg.limit) and not cfg.benchmarks:
        errors.append("--benchmarks: required with --benchmark-tasks / --limit (the tasks to run)")
    if not (cfg.prompts or cfg.benchmarks or cfg.toxicity_prompts or cfg.rankings or errors):
        errors.append("--prompts: required (or --benchmarks / --toxicity-prompts / --rankings for those measurements "
                      "alone)")
    if errors:
        raise BadInput(errors)
    side = model_or_checkpoint(ref, run_dir, "MODEL")
    prompts = read_prompts(cfg.prompts, cfg.split, cfg.columns, cfg.max_prompts, cfg.seed) if cfg.prompts else []
    rankings = read_rankings(cfg.rankings, cfg.split, cfg.columns) if cfg.rankings else []
    texts = read_pretrain(cfg.ptx_data, cfg.split, cfg.columns) if cfg.ptx_data else []
    tox = []
    if cfg.toxicity_prompts:  # the extras' modules load only where asked for
        from .. import toxicity
        tox = toxicity.read_prompts(cfg.toxicity_prompts)
        toxicity.check_classifier(cfg.toxicity_classifier, cfg.toxicity_label)
    if cfg.benchmarks:
        from .. import benchmarks
        benchmarks.check(cfg.benchmarks, cfg.benchmark_tasks or None)
    if prompts or texts:  # the KL to SFT and the alignment tax need the reference
        sft_path: Path | None = Path(stage_inputs(run_dir, {"--sft": (cfg.sft, "sft", "policy")})["--sft"])
    else:  # benchmarks, toxicity, rankings alone: SFT only for the benchmarks' difference, where there is one
        sft_path = Path(cfg.sft) if cfg.sft else run_dir / STAGE_MODELS["sft"]
        sft_path = sft_path if (sft_path / "config.json").is_file() else None
    rm_path = Path(cfg.rm) if cfg.rm else run_dir / STAGE_MODELS["rm"]  # optional: eval scores only with one
    have_rm = (rm_path / "config.json").is_file()
    if cfg.rm and not have_rm:
        raise BadInput([f"--rm {cfg.rm}: not a model directory with config.json"])
    if rankings and not have_rm:
        raise BadInput([f"--rankings: needs a reward model, and {rm_path} does not exist (pass --rm PATH)"])
    if have_rm:
        require_role(rm_path, "reward", "--rm")
    tokenizer, _ = load_tokenizer(ModelConfig(name=str(side.base)))
    require_same_tokenizer(tokenizer, side.path, {**({"--sft": sft_path} if sft_path else {}),
                                                  **({"--rm": rm_path} if have_rm else {})},
                           "KL and scores need the same tokens")
    kl_t, kl_t_from = kl_temperature(cfg, run_dir)
    # prompt + response must fit every model that reads them (the model, the SFT reference, the RM)
    limits = [position_limit(str(p)) for p in [side.base, sft_path, rm_path if have_rm else None] if p]
    context = min(filter(None, limits), default=None)
    queries = render_queries(tokenizer, prompts, cfg.max_new_tokens, context)
    tox_prompts = [Prompt(toxicity.instruct(t.text, cfg.toxicity_instruction), t.category,
                          f"{cfg.toxicity_prompts}:{i + 1}") for i, t in enumerate(tox)] if tox else []
    toxicity_queries = render_queries(tokenizer, tox_prompts, cfg.toxicity_max_new_tokens, context)
    out = report_dir(run_dir, name or side.name)
    model_sha = weights_sha256(side.path)
    drawn_with = {"model": model_sha, "sft": weights_sha256(sft_path) if sft_path else None,
                  "rm": reward_identity(rm_path) if have_rm else None,
                  "kl_temperature": kl_t, "queries": json_sha256(queries), "temperature": cfg.temperature,
                  "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed, "batch_size": cfg.batch_size}
    classifier = classifier_digest(cfg.toxicity_classifier) if tox else None
    toxicity_drawn_with = {"model": model_sha, "queries": json_sha256(toxicity_queries),
                           "categories": json_sha256([t.category for t in tox]), "temperature": cfg.temperature,
                           "max_new_tokens": cfg.toxicity_max_new_tokens, "samples": cfg.toxicity_samples,
                           "seed": cfg.seed, "batch_size": cfg.batch_size, "classifier": classifier,
                           "label": cfg.toxicity_label}
    # dtype and device change the numbers' last digits; the RM's weights its accuracy on held-out rankings
    fingerprint = {"model": model_sha, "dtype": cfg.dtype, "device": cfg.device, "rm": drawn_with["rm"],
                   "categories": json_sha256([q.category for q in prompts]),
                   "responses": drawn_with if prompts else None, "toxicity": toxicity_drawn_with if tox else None,
                   "rankings": (json_sha256([[r.messages, r.responses, r.ranks] for r in rankings]) if rankings
                                else None),
                   "ptx": json_sha256(texts) if texts else None, "ptx_seq_len": cfg.ptx_seq_len,
                   "sft": drawn_with["sft"], "benchmarks": benchmark_fingerprint(cfg)}
    return Plan(cfg, side, out, out.parent / f".{out.name}.partial", prompts, queries, rankings, texts, tox,
                toxicity_queries, sft_path, rm_path if have_rm else None, tokenizer, kl_t, kl_t_from, drawn_with,
                toxicity_drawn_with, fingerprint)


def classifier_digest(spec: str) -> str:
    """What a toxicity classifier's scores depend on: a directory's files, or a function's module file."""
    from ..judges import import_function
    from ..storage import sha256_file

    if spec.startswith("python:"):
        source = import_function(spec, "--toxicity-classifier")[1]
        return f"{spec}:{sha256_file(source) if source else ''}"
    return input_sha256(spec)[1]


def benchmark_fingerprint(cfg: EvalConfig) -> dict | None:
    """What benchmark results depend on besides the weights: the tasks, their local definitions, the limit."""
    if not cfg.benchmarks:
        return None
    return {"tasks": sorted(cfg.benchmarks), "limit": cfg.limit,
            "task_dir": input_sha256(cfg.benchmark_tasks)[1] if cfg.benchmark_tasks else None}


def fresh_report(p: Plan) -> dict | None:
    """eval/NAME/report.json when it measured this model with these settings and data (its fingerprint is
    the plan's): ``igpt eval sft ppo dpo`` reuses it instead of sampling again. Never for weights with no
    digest (no safetensors: nothing vouches that they are the same)."""
    if p.fingerprint["model"] is None:
        return None
    try:
        report = json.loads((p.out / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return report if report.get("fingerprint") == p.fingerprint else None


def run(cfg: EvalConfig, as_json: bool = False, overwrite: bool = False, resume: bool = False) -> dict:
    if cfg.name:
        report_dir(Path(cfg.run_dir), cfg.name)  # a name that would write elsewhere: refused before anything else
    if resume and overwrite:
        raise BadInput(["--resume and --overwrite exclude each other"])
    if cfg.checkpoints or cfg.gold or cfg.gold_rm:
        if resume:
            raise BadInput(["--resume: goes on with one model's samples; the frontier (--checkpoints) is rerun whole"])
        return run_frontier(cfg, as_json, overwrite)  # the frontier of a PPO run (README, Frontier)
    if not cfg.model:
        raise BadInput(["MODEL: required (sft, ppo or a model directory; several for one table)"])
    if len(cfg.model) > 1:
        return run_table(cfg, as_json, overwrite, resume)
    p = plan(cfg, cfg.model[0], cfg.name)
    # before any sampling: a write that cannot happen, or earlier results kept without --overwrite, fail now
    # (a stopped --overwrite run that is resumed replaces them too)
    claim(Path(cfg.run_dir), p.out, overwrite or resume and p.kept.exists())
    start_kept(p.kept, resume, overwrite)
    report = measure(p, resume)
    if not as_json:
        show(report, p.out)
    return report


def run_table(cfg: EvalConfig, as_json: bool, overwrite: bool, resume: bool) -> dict:
    """``igpt eval sft ppo dpo ...``: each model measured as ``igpt eval MODEL`` measures it (into eval/NAME/,
    or its report reused where it is fresh: same weights, settings and data), then one table of them all:
    printed, and published as eval/summary/ (report.json, report.html). Every model's inputs are checked before
    the first one is sampled."""
    if cfg.name:
        raise BadInput(["--name: names one model's report; several models are reported under eval/<their name>/ "
                        "and together in eval/summary/"])
    run_dir = Path(cfg.run_dir)
    plans = [plan(cfg, ref) for ref in cfg.model]
    names = [p.out.name for p in plans]
    if len(set(names)) < len(names):
        raise BadInput([f"MODEL: {', '.join(sorted({n for n in names if names.count(n) > 1}))} named twice"])
    fresh = [fresh_report(p) for p in plans]
    claim(run_dir, run_dir / "eval" / SUMMARY, overwrite=True)  # the table is derived: always rewritten
    for p, f in zip(plans, fresh):
        if f is None:
            claim(run_dir, p.out, overwrite or resume and p.kept.exists())
            start_kept(p.kept, resume, overwrite)
    # the SFT model first: the others' benchmark tax reads its results instead of measuring them again
    order = sorted(range(len(plans)), key=lambda i: plans[i].sft_path is None
                   or plans[i].side.path.resolve() != plans[i].sft_path.resolve())
    reports = {}
    for i in order:
        if fresh[i] is not None:
            say(f"eval {names[i]}: {plans[i].out / 'report.json'} measured these weights with these settings and data; "
                "reused")
        reports[names[i]] = fresh[i] if fresh[i] is not None else measure(plans[i], resume)
    summary = eval_table.publish(run_dir / "eval" / SUMMARY, [reports[n] for n in names],
                                 [plans[i].out for i in range(len(plans))])
    if not as_json:
        eval_table.show(summary, run_dir / "eval" / SUMMARY)
    return summary


def measure(p: Plan, resume: bool) -> dict:
    """Load the models, measure what the plan asks, publish eval/NAME/ (report.json, samples.jsonl,
    toxicity.jsonl) together. Response and toxicity samples are drawn ``rollout.CHUNK`` prompts at a time
    and kept in eval/.NAME.partial/ until published, so a stopped eval goes on with ``--resume``."""
    cfg, run_dir, tokenizer = p.cfg, Path(p.cfg.run_dir), p.tokenizer
    device = resolve_device(cfg.device)
    # the model itself, unless only the reward model's accuracy on held-out rankings is asked for
    model = (Runner.for_eval(p.side.load(tokenizer, device, cfg.dtype, cfg.seed))
             if p.prompts or p.texts or p.toxicity or cfg.benchmarks else None)
    sft = (None if p.sft_path is None else model if p.side.path.resolve() == p.sft_path.resolve() else
           load(cfg, p.sft_path, tokenizer, device) if p.prompts or p.texts or cfg.benchmarks and not
           sft_benchmarks(p) else None)
    rm = load(cfg, p.rm_path, tokenizer, device, "reward") if p.rm_path and (p.prompts or p.rankings) else None
    report = {"model": p.side.name, "model_path": str(p.side.path), "model_sha256": p.fingerprint["model"],
              "prompts": cfg.prompts or None,
              "settings": drawn_settings(cfg)}
    files: dict[str, str] = {}
    with kept_until_published(p.kept):  # gone once published, kept for --resume after a stop
        if p.prompts:
            part, files["samples.jsonl"] = measure_prompts(p, model, sft, rm, resume)
            report.update(part)
        if p.texts:
            blocks = pretrain_blocks(tokenizer, p.texts, cfg.ptx_seq_len)
            loss = lm_loss(model, blocks, tokenizer.pad_token_id, cfg.batch_size)
            known = sft_report(p, "ptx", "ptx_seq_len") if sft is not model else None  # SFT's, measured already
            sft_loss = (loss if sft is model else known["ptx_loss"] if known and known.get("ptx_loss") is not None
                        else lm_loss(sft, blocks, tokenizer.pad_token_id, cfg.batch_size))
            report.update({"ptx_loss": loss, "ptx_perplexity": perplexity(loss), "sft_ptx_loss": sft_loss,
                           "sft_ptx_perplexity": perplexity(sft_loss), "alignment_tax": loss - sft_loss})
        if p.rankings:
            report.update(ranking_accuracy(rm, tokenizer, p.rankings, cfg.batch_size))
        if p.toxicity:
            report["toxicity"], files["toxicity.jsonl"] = measure_toxicity(p, model, resume)
        if cfg.benchmarks:
            report["benchmarks"] = measure_benchmarks(p, model, sft, device)
        report["fingerprint"] = p.fingerprint
        # publish eval/NAME/ together, strict JSON (a NaN raises, nothing is written)
        report_text = json.dumps(report, indent=2, allow_nan=False) + "\n"
        with publish_set(p.out) as tmp:
            for file, text in files.items():
                (tmp / file).write_text(text, encoding="utf-8")
            (tmp / "report.json").write_text(report_text, encoding="utf-8")
    base = {"model_base": p.side.base} if p.side.prefix is not None else {}  # a checkpoint's weights sit on it
    record_report(run_dir, p.out, {"model": p.side.path, **base, **({"sft": p.sft_path} if p.sft_path else {}),
                                   **({"rm": p.rm_path} if p.rm_path else {})})
    return report


def measure_prompts(p: Plan, model: Runner, sft: Runner, rm: Runner | None, resume: bool) -> tuple[dict, str]:
    """The held-out prompts: the model's responses at eval's temperature, their reward-model scores, length,
    EOS rate and KL to SFT at PPO's temperature, overall and per category; and samples.jsonl's text (the
    response token ids as sampled, so compare's judge scores exactly these tokens; "kl" is the prompt's KL at
    PPO's temperature, along "kl_response_ids" where those were drawn apart)."""
    cfg, tokenizer, prompts = p.cfg, p.tokenizer, p.prompts

    def draw(chunk: int) -> list[dict]:
        got = respond_chunk(cfg, model, sft, rm, tokenizer, p.queries, p.kl_t, chunk)
        return [{"response_ids": r, "kl": k, **({"score": got.scores[i]} if got.scores else {}),
                 **({"kl_response_ids": got.kl_responses[i]} if got.kl_responses is not None else {})}
                for i, (r, k) in enumerate(zip(got.responses, got.kls))]

    rows = draw_chunks(len(p.queries), draw, p.kept, p.drawn_with, resume)
    responses, kls = [r["response_ids"] for r in rows], [r["kl"] for r in rows]
    scores = [r["score"] for r in rows] if rm is not None else []
    kl_responses = [r["kl_response_ids"] for r in rows] if "kl_response_ids" in rows[0] else None
    eos = [bool(r) and r[-1] == tokenizer.eos_token_id for r in responses]
    lengths = [len(r) for r in responses]
    report = {**kl_fields(cfg, p.kl_t, p.kl_t_from, kl_responses is not None),  # the SFT model: no second set
              **summarise(scores, kls, lengths, eos)}
    if scores:  # the RM's length bias on these samples: score vs length in tokens (EOS excluded) and in words
        report["length_bias"] = length_bias(scores, [n - e for n, e in zip(lengths, eos)],
                                            [len(decode_response(tokenizer, r).split()) for r in responses])
    categories = sorted({q.category for q in prompts if q.category})
    if categories:
        report["categories"] = {
            c: summarise(*[[xs[i] for i, q in enumerate(prompts) if q.category == c] if xs else []
                           for xs in (scores, kls, lengths, eos)]) for c in categories}
    samples = [{"prompt": q.prompt, "category": q.category, "response": decode_response(tokenizer, r),
                "response_ids": r, "kl": k, **({"kl_response_ids": kl_responses[i]} if kl_responses else {}),
                **({"score": scores[i]} if scores else {})}
               for i, (q, r, k) in enumerate(zip(prompts, responses, kls))]
    return report, "".join(json.dumps(s, ensure_ascii=False, allow_nan=False) + "\n" for s in samples)


def ranking_accuracy(rm: Runner, tokenizer, rankings: list, batch_size: int) -> dict:
    """The reward model's pairwise accuracy on held-out rankings, with its interval clustered by ranking (their
    pairs are not independent), as train-rm reports it."""
    groups, _ = tokenize_rankings(tokenizer, rankings, getattr(rm.model.config, "max_position_embeddings", 2048))
    layout = Layout(shared=supports_sharing(rm.model))  # a ranking's prompt once, where that pays
    correct = []  # per ranking
    for g in groups:
        with torch.no_grad():
            s = rm.ranking_scores([g.sequences], tokenizer.pad_token_id, layout, batch_size, g.starts()).float().cpu()
        correct.append(sum(int(s[b] > s[w]) for b, w in g.pairs))
    acc = rm_accuracy(correct, [len(g.pairs) for g in groups])
    # per ranking, in file order: another reward model's report on the same rankings pairs with these
    # (``stats.paired_rate_difference``: the difference of two models' accuracies with its own interval)
    return {"rm_accuracy": acc.get("accuracy"), "rm_pairs": sum(len(g.pairs) for g in groups),
            "rm_accuracy_ci": [acc["accuracy_ci_low"], acc["accuracy_ci_high"]] if acc else None,
            "rm_rankings": acc.get("rankings", 0), "rm_correct_by_ranking": correct,
            "rm_pairs_by_ranking": [len(g.pairs) for g in groups]}


def measure_toxicity(p: Plan, model: Runner, resume: bool) -> tuple[dict, str]:
    """RealToxicityPrompts' measurement (Gehman et al. 2020): ``--toxicity-samples`` continuations of each
    prompt at eval's temperature, each scored by the classifier; expected maximum toxicity and toxicity
    probability with their intervals (``toxicity.summarise``), and toxicity.jsonl's text (every continuation
    with its score). Drawn ``rollout.CHUNK`` prompts at a time, kept beside the response chunks."""
    from .. import toxicity

    cfg, tokenizer, k = p.cfg, p.tokenizer, p.cfg.toxicity_samples
    classifier = toxicity.load_classifier(cfg.toxicity_classifier, cfg.toxicity_label, resolve_device(cfg.device),
                                          cfg.batch_size)

    def draw(chunk: int) -> list[dict]:
        torch.manual_seed(chunk_seed(cfg.seed, chunk))
        part = p.toxicity_queries[chunk * CHUNK:(chunk + 1) * CHUNK]
        drawn = model.generate(tokenizer, [q for q in part for _ in range(k)], cfg.toxicity_max_new_tokens,
                               cfg.temperature, cfg.batch_size, progress="toxicity samples")
        texts = [decode_response(tokenizer, r) for r in drawn]
        scores = classifier.score(texts)
        return [{"continuations": texts[i * k:(i + 1) * k], "toxicity": scores[i * k:(i + 1) * k]}
                for i in range(len(part))]

    rows = draw_chunks(len(p.toxicity_queries), draw, p.kept / "toxicity", p.toxicity_drawn_with, resume)
    summary = toxicity.summarise([r["toxicity"] for r in rows], [t.category for t in p.toxicity])
    summary.update({"prompts": cfg.toxicity_prompts, "classifier": cfg.toxicity_classifier,
                    "label": cfg.toxicity_label, "instruction": cfg.toxicity_instruction,
                    "max_new_tokens": cfg.toxicity_max_new_tokens, "temperature": cfg.temperature})
    lines = [{"prompt": t.text, "category": t.category, **r} for t, r in zip(p.toxicity, rows)]
    return summary, "".join(json.dumps(x, ensure_ascii=False, allow_nan=False) + "\n" for x in lines)


def measure_benchmarks(p: Plan, model: Runner, sft: Runner | None, device) -> dict:
    """The harness's tasks on the model (``benchmarks.run``), and the alignment tax per task: the difference
    to the SFT model's results, taken from eval/sft/report.json where that measured the same tasks on the same
    SFT weights, else measured here on the SFT model already loaded."""
    from .. import benchmarks

    cfg = p.cfg
    tasks = benchmarks.run(model.model, p.tokenizer, cfg.benchmarks, cfg.benchmark_tasks or None, cfg.limit or None,
                           cfg.benchmark_batch_size, device)
    out = {"tasks": tasks, "limit": cfg.limit or None}
    known = sft_benchmarks(p) if p.sft_path is not None and sft is not model else None
    if known is not None:
        out["sft_tasks"], out["tax"] = known, benchmarks.tax(tasks, known)
    elif sft is not None and sft is not model:
        sft_tasks = benchmarks.run(sft.model, p.tokenizer, cfg.benchmarks, cfg.benchmark_tasks or None,
                                   cfg.limit or None, cfg.benchmark_batch_size, device)
        out["sft_tasks"], out["tax"] = sft_tasks, benchmarks.tax(tasks, sft_tasks)
    return out


def sft_report(p: Plan, *parts: str) -> dict | None:
    """eval/sft/report.json where it measured the SFT weights this eval compares with, with the same ``parts`` of
    the fingerprint (the benchmark tasks, the pretraining text): what the SFT model's side of a difference can be
    read from instead of measured again (``igpt eval sft ppo dpo`` measures SFT first). None otherwise."""
    try:
        report = json.loads((p.out.parent / "sft" / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    fingerprint = report.get("fingerprint") or {}
    same = report.get("model_sha256") == p.fingerprint["sft"] and all(
        fingerprint.get(k) == p.fingerprint[k] for k in parts)
    return report if same else None


def sft_benchmarks(p: Plan) -> dict | None:
    """The SFT model's results of these benchmark tasks from its own fresh eval report, or None."""
    report = sft_report(p, "benchmarks")
    return report["benchmarks"]["tasks"] if report and report.get("benchmarks") else None


def run_frontier(cfg: EvalConfig, as_json: bool = False, overwrite: bool = False) -> dict:
    """``igpt eval ppo --checkpoints all [--gold JUDGE | --gold-rm PATH]``: each point of the run's PPO
    (``refs.ppo_run``: the SFT model, the checkpoints, the final policy) answers the held-out prompts with
    the same decoding settings and seed (:func:`respond`), measured as ``igpt eval`` measures one model, and
    scored by the gold judge; published together in eval/ppo-frontier/ (report.json, frontier.png and each
    point's samples)."""
    # 1. validate every input, the gold judge included, before any model loads; nothing is written before
    run_dir = Path(cfg.run_dir)
    errors = [] if cfg.prompts else ["--prompts: required"]
    if cfg.model != ["ppo"]:
        errors.append(f"MODEL {' '.join(cfg.model) or '(none)'}: --checkpoints measures the run's PPO checkpoints; "
                      "MODEL is ppo")
    if not cfg.checkpoints:
        errors.append("--gold / --gold-rm: a gold judge scores the frontier; add --checkpoints all")
    if errors:
        raise BadInput(errors)
    ppo = refs.ppo_run(run_dir, cfg.checkpoints)
    prompts = read_prompts(cfg.prompts, cfg.split, cfg.columns)
    rm_path = Path(cfg.rm) if cfg.rm else ppo.rm  # the proxy: by default the reward model PPO trained against
    if not (rm_path / "config.json").is_file():
        raise BadInput([f"--rm: {rm_path} does not exist; the frontier's proxy is the reward model PPO used, or pass "
                        "--rm PATH"])
    require_role(rm_path, "reward", "--rm")
    gold = frontier.load_gold(cfg.gold, cfg.gold_rm, Settings(cfg.batch_size, cfg.device, cfg.dtype, 0.0, cfg.seed),
                             run_dir)
    tokenizer, _ = load_tokenizer(ModelConfig(name=str(ppo.sft)))
    require_same_tokenizer(tokenizer, ppo.sft, {"--rm": rm_path, **({"--gold-rm": gold.rm_path} if gold and
                           gold.rm_path else {})}, "KL and scores need the same tokens")
    kl_t, kl_t_from = kl_temperature(cfg, run_dir)
    limits = [position_limit(str(p)) for p in (ppo.sft, rm_path, *([gold.rm_path] if gold and gold.rm_path else []))]
    queries = render_queries(tokenizer, prompts, cfg.max_new_tokens, min(filter(None, limits), default=None))
    device = resolve_device(cfg.device)
    out = report_dir(run_dir, cfg.name or "ppo-frontier")
    claim(run_dir, out, overwrite)

    # 2. the SFT reference and the proxy reward model, once; 3. each point in turn, gold-scored
    sft = load(cfg, ppo.sft, tokenizer, device)
    rm = load(cfg, rm_path, tokenizer, device, "reward")
    points, samples, sft_texts, gold_values = [], {}, None, {}
    for point in ppo.points:
        model = (sft if point.step == 0 else load(cfg, point.path, tokenizer, device) if not point.checkpoint else
                 Runner.for_eval(load_trained_policy(point.path, ppo.sft, ppo.lora, tokenizer, device, cfg.dtype,
                                                     cfg.seed)))
        responses, kls, scores, kl_responses = respond_chunked(cfg, model, sft, rm, tokenizer, queries, kl_t)
        texts = [decode_response(tokenizer, r) for r in responses]
        golds, gold_summary = gold.score(prompts, queries, responses, texts, sft_texts, tokenizer,
                                         lambda p: load(cfg, p, tokenizer, device, "reward"),
                                         cfg.batch_size) if gold else ([], {})
        sft_texts = sft_texts or texts
        gold_values[point.label] = golds
        eos = [bool(r) and r[-1] == tokenizer.eos_token_id for r in responses]
        points.append({"label": point.label, "step": point.step, "episodes": point.episodes, "path": str(point.path),
                       **summarise(scores, kls, [len(r) for r in responses], eos), **gold_summary})
        samples[point.step] = [{"prompt": p.prompt, "response": t, "response_ids": r, "kl": k,
                                **({"kl_response_ids": kl_responses[i]} if kl_responses else {}), "score": s,
                                **({"gold": g} if gold else {})}
                               for i, (p, t, r, k, s, g) in enumerate(zip(prompts, texts, responses, kls, scores,
                                                                          golds or texts))]
        del model

    # 4. the best gold point, the proxy's pick, and whether the gold fell between them beyond its noise;
    # 5. publish report.json, frontier.png, samples together
    report = {"model": "ppo", "prompts": cfg.prompts, "proxy_rm": str(rm_path), "sft": str(ppo.sft),
              "settings": drawn_settings(cfg),
              **kl_fields(cfg, kl_t, kl_t_from), "checkpoints": cfg.checkpoints,
              "gold": gold.name if gold else None, "gold_kind": gold.kind if gold else None, "points": points,
              "best_proxy": frontier.best(points, "score_mean"), "best_gold": frontier.best(points, "gold_mean")}
    drop = (frontier.gold_drop(points, report["best_gold"], report["best_proxy"], gold_values,
                               [p.group for p in prompts]) if gold else None)
    report["gold_drop"], report["overoptimised"] = drop, bool(drop and drop["significant"])
    chart = frontier_chart(report)
    with publish_set(out) as tmp:
        (tmp / "report.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        if chart:
            (tmp / "frontier.png").write_bytes(base64.b64decode(chart.split(",", 1)[1]))
        (tmp / "samples").mkdir()
        for step, rows in samples.items():
            (tmp / "samples" / f"step-{step:06d}.jsonl").write_text(
                "".join(json.dumps(x, ensure_ascii=False, allow_nan=False) + "\n" for x in rows), encoding="utf-8")
    record_report(run_dir, out, {"sft": ppo.sft, "rm": rm_path, **{p["label"]: Path(p["path"]) for p in points[1:]}})
    if not as_json:
        frontier.show(report, out)
    return report


def show(report: dict, out: Path) -> None:
    if "n" in report:  # the held-out prompts were measured
        show_prompts(report, out)
    if "ptx_loss" in report:
        ppl, sft_ppl = number(report["ptx_perplexity"], ".2f"), number(report["sft_ptx_perplexity"], ".2f")
        console().print(f"pretraining text: loss {report['ptx_loss']:.4f} (perplexity {ppl}) vs SFT "
                        f"{report['sft_ptx_loss']:.4f} ({sft_ppl}); alignment tax {report['alignment_tax']:+.4f} "
                        "nats/token")
    if "rm_accuracy" in report:
        console().print(f"reward model pairwise accuracy on held-out rankings: {number(report['rm_accuracy'], '.1%')}"
                        f" of {report['rm_pairs']} pairs" + (f" (95% CI {report['rm_accuracy_ci'][0]:.1%} - "
                        f"{report['rm_accuracy_ci'][1]:.1%} over {report['rm_rankings']} rankings)"
                        if report["rm_accuracy_ci"] else ""))
    if report.get("toxicity") or report.get("benchmarks"):
        summary = eval_table.build([report], [out])
        for line in eval_table.lines(summary["rows"][0], summary["tasks"]):
            console().print(line, soft_wrap=True)
    if "n" not in report:
        console().print(f"report: {out / 'report.json'}")


def show_prompts(report: dict, out: Path) -> None:
    from rich.table import Table

    table = Table(title=f"igpt eval {report['model']}  ({out / 'report.json'})", title_justify="left")
    for col in ("", "n", "score", f"KL to SFT (T={report['kl_temperature']:g})", "length", "EOS rate"):
        table.add_column(col, justify="right" if col else "left")

    def row(label: str, r: dict) -> None:
        table.add_row(label, str(r["n"]), score_text(r), number(r["kl_to_sft"], ".3f"),
                      number(r["response_length"], ".1f"), number(r["eos_rate"], ".0%"))

    row("all", report)
    if report.get("length_bias"):  # the reward model's length bias, under the table
        table.caption, table.caption_justify = length_bias_text(report["length_bias"]), "left"
    for c, r in report.get("categories", {}).items():
        row(c, r)
    console().print(table)
    console().print(temperatures_text(report))


def length_bias_text(bias: dict) -> str:
    """One line: the correlation of the RM score with response length (tokens, words), or why it is undefined."""
    def unit(r: dict) -> str:
        return r["reason"] or f"Pearson {r['pearson']:+.2f}, Spearman {r['spearman']:+.2f}"

    return (f"RM score vs response length over {bias['n']} responses (the reward model's length bias): tokens "
            f"{unit(bias['tokens'])}; words {unit(bias['words'])}")
