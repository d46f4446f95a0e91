"""``igpt compare A B``: how often people (or the reward model) prefer A's response to B's.

Both models answer every prompt with the same decoding settings and seed; a judge (``judges.py``: the reward
model, a human, a local LM, a Python function) picks the better response or a tie. The win rate counts a tie
as half a win, so swapping A and B gives exactly 1 minus the win rate; its 95% confidence interval is the
Wilson score interval at that proportion and n (symmetric under the swap too). Results: report.json,
judgments.jsonl, responses.jsonl and report.html, published together (``rundir.publish_set``): a crash leaves
the previous complete set. They replace earlier results only with ``--overwrite``.

Each judge has its own results, so one judge's never replace another's (:func:`result_dir`): the reward
model's in compare/A-vs-B/, any other judge's in compare/A-vs-B.JUDGE/ with JUDGE made a folder name
(compare/A-vs-B.human/; a judge ``model:runs/x/rm/final`` would be compare/A-vs-B.model-runs-x-rm-final/).
A human session appends each judgment as it is made to compare/A-vs-B.human.session/ (with the responses
shown), so it resumes where it stopped: running the command again goes on with an unfinished session without
--overwrite, and each run publishes the set from there; ``--overwrite`` starts a new session.

Each side's responses are sampled ``rollout.CHUNK`` prompts at a time, each chunk seeded from (seed, chunk) as
``igpt eval`` draws them, and kept in compare/.A-vs-B.partial/ as they are drawn: a stopped compare goes on with
``--resume`` to the results an uninterrupted one publishes.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import NamedTuple

import torch

from .. import judges
from .. import report as report_page
from ..config import CompareConfig, ModelConfig, drawn_settings
from ..console import console
from ..batches import render_queries
from ..data import read_prompts
from ..distributed import resolve_device
from ..errors import BadInput
from ..refs import Side, model_refs
from ..models import load_tokenizer, position_limit, require_role, require_same_tokenizer, reward_identity
from ..report import number, score_text, temperature_lines
from ..rollout import CHUNK, chunk_seed, decode_response, draw_chunks, kept_until_published, start_kept
from ..locks import claim
from ..rundir import STAGE_MODELS, record_report
from ..runners import Runner
from ..stats import WIN_VALUE, grouped_win_rate, length_controlled_win_rate, win_rate
from ..storage import atomic_write_text, json_sha256, publish_set, sha256_file, weights_sha256


def tally(judgments: list[dict], key: str | None = None) -> dict:
    """Win rate of A over all judgments, or per value of ``key`` (e.g. category). Where every prompt has a
    ``group`` (the prompts file's "group": one message under several framings), the interval is clustered by
    group (``stats.grouped_win_rate``); otherwise Wilson's over independent prompts."""
    def count(js: list[dict]) -> dict:
        if js and all(j.get("group") is not None for j in js):
            return grouped_win_rate([j["winner"] for j in js], [j["group"] for j in js])
        return win_rate(*(sum(j["winner"] == w for j in js) for w in ("A", "tie", "B")))

    if key is None:
        return count(judgments)
    groups = sorted({j.get(key) for j in judgments if j.get(key)})
    return {g: count([j for j in judgments if j.get(key) == g]) for g in groups}


class Reused(NamedTuple):
    """Responses ``igpt eval`` sampled (:func:`eval_samples`) and what it measured of them."""

    ids: list[list[int]]  # response token ids as sampled
    file: Path  # eval's samples.jsonl
    scores: list[float] | None  # its reward model's scores of them; None: eval had no reward model
    scored_by: tuple  # (the reward model's identity, dtype, device) eval scored with


def eval_samples(cfg: CompareConfig, path: Path, prompts: list, queries: list[list[int]]) -> Reused | None:
    """The responses ``igpt eval`` already sampled from the model now at ``path`` for these prompts, rendered
    as these queries, with these decoding settings and seed (the same responses compare would sample), or None.

    The model is recognised by the sha256 of its weights, which eval records, not by its path: a path
    retrained since (``--overwrite``) holds another model, whose samples eval has not seen."""
    settings = drawn_settings(cfg)
    weights = weights_sha256(path)
    if weights is None:
        return None
    for report_file in sorted((Path(cfg.run_dir) / "eval").glob("*/report.json")):
        if report_file.parent.name.startswith("."):  # a set being published, or one put aside
            continue
        report = json.loads(report_file.read_text(encoding="utf-8"))
        drawn = (report.get("fingerprint") or {}).get("responses") or {}
        if (report.get("model_sha256") != weights or report.get("settings") != settings or not report.get("prompts")
                or Path(report["prompts"]).resolve() != Path(cfg.prompts).resolve()
                or drawn.get("queries") != json_sha256(queries)  # prompts cut to another context: not these
                or not (report_file.parent / "samples.jsonl").is_file()):  # benchmarks / toxicity alone: no samples
            continue
        lines = (report_file.parent / "samples.jsonl").read_text(encoding="utf-8").splitlines()
        samples = [json.loads(line) for line in lines]
        if [x["prompt"] for x in samples] == [p.prompt for p in prompts] and all("response_ids" in x for x in samples):
            scores = [x["score"] for x in samples] if all("score" in x for x in samples) else None
            fingerprint = report["fingerprint"]
            return Reused([x["response_ids"] for x in samples], report_file.parent / "samples.jsonl", scores,
                          (fingerprint.get("rm"), fingerprint.get("dtype"), fingerprint.get("device")))
    return None


def reused_scores(cfg: CompareConfig, rm_path: Path, a: Reused | None, b: Reused | None) -> dict | None:
    """Both sides' reward-model scores as eval measured them, where both sides are eval's samples scored by
    this very reward model (weights, score reading and bias: ``models.reward_identity``) in compare's dtype on
    its device: the judge's scores without loading the reward model again. None otherwise."""
    if a is None or b is None or a.scores is None or b.scores is None:
        return None
    scored_by = (reward_identity(rm_path), cfg.dtype, cfg.device)
    if scored_by[0] is None or a.scored_by != scored_by or b.scored_by != scored_by:
        return None
    return {"a": a.scores, "b": b.scores, "from": {"a": str(a.file), "b": str(b.file)}}


def answers(cfg: CompareConfig, side: Side, tokenizer, queries: list[list[int]], prompts: list,
            device, kept: Path, resume: bool) -> tuple[list[list[int]], str, Reused | None]:
    """Response token ids as sampled (EOS only where the model emitted it), with the same settings and seed
    for both models, where they come from, and eval's samples when they are reused: ``igpt eval``'s samples of
    the same weights when they match (a checkpoint's too: eval records the digest of the checkpoint's weights).
    Sampled a chunk at a time as eval samples, each kept in ``kept`` as it is drawn (``rollout.draw_chunks``;
    ``resume`` goes on there)."""
    reused = eval_samples(cfg, side.path, prompts, queries)
    if reused is not None:
        return reused.ids, str(reused.file), reused
    model = Runner.for_eval(side.load(tokenizer, device, cfg.dtype, cfg.seed))
    drawn_with = {"model": weights_sha256(side.path), "queries": json_sha256(queries),
                  "temperature": cfg.temperature, "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed,
                  "batch_size": cfg.batch_size}

    def draw(chunk: int) -> list[dict]:
        torch.manual_seed(chunk_seed(cfg.seed, chunk))  # the same seeds for both models
        return [{"response_ids": r} for r in model.generate(tokenizer, queries[chunk * CHUNK:(chunk + 1) * CHUNK],
                                                            cfg.max_new_tokens, cfg.temperature, cfg.batch_size,
                                                            progress="sample")]

    return [r["response_ids"] for r in draw_chunks(len(queries), draw, kept, drawn_with, resume)], "sampled", None


def run(cfg: CompareConfig, overwrite: bool = False, resume: bool = False) -> dict:
    # 1. validate inputs; nothing is written before they pass
    run_dir = Path(cfg.run_dir)
    errors = [f"{k.upper()}: required" for k in ("a", "b") if not getattr(cfg, k)]
    if not cfg.prompts:
        errors.append("--prompts: required")
    if resume and overwrite:
        errors.append("--resume and --overwrite exclude each other")
    if errors:
        raise BadInput(errors)
    side_a, side_b = model_refs({"A": cfg.a, "B": cfg.b}, run_dir)
    (name_a, path_a), (name_b, path_b) = side_a[:2], side_b[:2]
    if name_a == name_b:
        name_a, name_b = f"{name_a}-a", f"{name_b}-b"
    prompts = read_prompts(cfg.prompts, cfg.split, cfg.columns, cfg.max_prompts, cfg.seed)
    tokenizer, _ = load_tokenizer(ModelConfig(name=str(side_a.base)))
    settings = judges.Settings(cfg.batch_size, cfg.device, cfg.dtype, cfg.tie_margin, cfg.seed)
    out = result_dir(run_dir, f"{name_a}-vs-{name_b}", cfg.judge)
    session = out.parent / f"{out.name}.session"  # a human judge's responses and judgments as they are made
    # a judge that cannot be imported or loaded fails now, before any model loads (judges.py)
    judge = None if cfg.judge == "rm" else judges.load(cfg.judge, settings, session / "judgments.jsonl", run_dir)
    rm_path = Path(cfg.rm) if cfg.rm else run_dir / STAGE_MODELS["rm"]
    if cfg.judge == "rm":
        if not (rm_path / "config.json").is_file():
            raise BadInput([f"--rm: {rm_path} does not exist; train a reward model or pass --rm PATH (or --judge human)"])
        require_role(rm_path, "reward", "--rm")
        require_same_tokenizer(tokenizer, side_a.base, {"--rm": rm_path}, "the judge must read the responses' tokens")
    # prompt + response must fit both models and the reward model that judges them
    limits = [position_limit(str(p)) for p in [side_a.base, side_b.base] + ([rm_path] if cfg.judge == "rm" else [])]
    queries = render_queries(tokenizer, prompts, cfg.max_new_tokens, min(filter(None, limits), default=None))
    device = resolve_device(cfg.device)
    # before any sampling: a write that cannot happen, or earlier results kept without --overwrite, fail now
    # (a human session with pairs left to judge goes on: its results are the ones it adds to)
    kept = out.parent / f".{out.name}.partial"  # each side's chunks drawn so far
    claim(run_dir, out,
          overwrite or (cfg.judge == "human" and unfinished(session, prompts)) or resume and kept.exists())
    start_kept(kept, resume, overwrite)
    if not session.exists() and (out / "responses.jsonl").is_file() and not (out / "report.json").is_file():
        out.replace(session)  # a session of an igpt that kept it in compare/A-vs-B.human/: it goes on from here

    # 2. both models answer every prompt: the text and the token ids as sampled (what the RM judge scores).
    #    A human session keeps them in compare/A-vs-B.human.session/ (with its judgments), so it can stop and
    #    resume on the responses it was shown.
    sources: dict[str, str] = {}  # where each side's responses come from: sampled, eval's samples, a session
    pairs, known = [], None
    if (session / "responses.jsonl").exists() and cfg.judge == "human" and not overwrite:
        pairs = read_jsonl(session / "responses.jsonl")
        sources = dict.fromkeys("ab", str(session / "responses.jsonl"))
        if [x["prompt"] for x in pairs] != [p.prompt for p in prompts]:
            pairs = []  # other prompts this time: answer them afresh
    if not pairs:
        resp_a, sources["a"], reused_a = answers(cfg, side_a, tokenizer, queries, prompts, device, kept / "a", resume)
        resp_b, sources["b"], reused_b = answers(cfg, side_b, tokenizer, queries, prompts, device, kept / "b", resume)
        known = reused_scores(cfg, rm_path, reused_a, reused_b) if cfg.judge == "rm" else None
        pairs = [{"prompt": p.prompt, "category": p.category, **({"group": p.group} if p.group else {}),
                  "a": decode_response(tokenizer, a),
                  "b": decode_response(tokenizer, b), "a_ids": a, "b_ids": b}
                 for p, a, b in zip(prompts, resp_a, resp_b)]
        if cfg.judge == "human":  # new responses: a new session, no judgments of other responses
            atomic_write_text(session / "responses.jsonl", jsonl(pairs))
            atomic_write_text(session / "judgments.jsonl", "")

    # the reward model judges; it is not loaded again where eval's scores of these responses are by it
    judge = judge or judges.RMJudge(settings, rm_path, tokenizer, queries, device,
                                    known and (known["a"], known["b"]))
    with kept_until_published(kept):  # gone once published, kept for --resume after a stop
        # 3. judge (a judge that fails raises BadInput here: nothing is published)
        judgments = judge.compare(pairs)

        # 4. report: numbers, per category, and a page people can look at
        overall = tally(judgments)
        report = {"a": name_a, "b": name_b, "a_path": str(path_a), "b_path": str(path_b), "judge": cfg.judge,
                  "prompts": cfg.prompts, "n_prompts": len(pairs), "judged": len(judgments), **overall,
                  "categories": tally(judgments, "category"),
                  "settings": drawn_settings(cfg),
                  "responses_from": sources, **({"scores_from": known["from"]} if known else {}),
                  **({"judge_source": {"file": str(judge.source), "sha256": sha256_file(judge.source)}}
                     if getattr(judge, "source", None) else {}),
                  "ci_method": ("95%, clustered by the prompts' group (cluster-robust CR2, Wilson at the effective n), "
                                "ties counted as half a win" if "groups" in overall else
                                "Wilson score interval, 95%, ties counted as half a win"),
                  **length_control(judgments, tokenizer.eos_token_id)}
        # 5. publish report.json, judgments.jsonl, responses.jsonl and report.html together (strict JSON: a NaN
        #    raises and nothing is replaced)
        with publish_set(out) as tmp:
            (tmp / "responses.jsonl").write_text(jsonl(pairs), encoding="utf-8")
            (tmp / "judgments.jsonl").write_text(jsonl(judgments), encoding="utf-8")
            (tmp / "report.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n", encoding="utf-8")
            report_page.write_html(tmp / "report.html", report, judgments, run_dir, eos_id=tokenizer.eos_token_id,
                                   rm_path=judge.path, device=str(device))
    bases = {f"{k}_base": side.base for k, side in (("a", side_a), ("b", side_b))
             if side.prefix is not None}  # a checkpoint's
    record_report(run_dir, out, {"a": path_a, "b": path_b, **bases, **({"rm": rm_path} if cfg.judge == "rm" else {}),
                          **({"judge": judge.path} if judge.path and cfg.judge != "rm" else {})})
    show(report, judgments)
    show_evals(run_dir, [name_a, name_b])
    console().print(f"report: {out / 'report.html'}")
    return report


def length_control(judgments: list[dict], eos_id: int | None) -> dict:
    """The win rate at equal length (``stats.length_controlled_win_rate``, AlpacaEval 2's length control) over
    all judgments, on the length difference in tokens as sampled (EOS excluded; in words where a judgment has no
    token ids, as an older human session), and each side's mean length in tokens and words. Overall only: a
    category's few judgments would leave the length slope to noise."""
    def tokens(j: dict, side: str) -> int | None:
        ids = j.get(f"{side}_ids")
        return None if ids is None else len(ids) - int(bool(ids) and ids[-1] == eos_id)

    def mean(xs: list) -> float | None:
        return sum(xs) / len(xs) if xs and None not in xs else None

    words = {s: [len(j[s].split()) for j in judgments] for s in "ab"}
    toks = {s: [tokens(j, s) for j in judgments] for s in "ab"}
    unit = "tokens" if None not in toks["a"] + toks["b"] else "words"
    lengths = toks if unit == "tokens" else words
    labels = [WIN_VALUE[j["winner"]] for j in judgments]
    lc = length_controlled_win_rate(labels, lengths["a"], lengths["b"])
    return {"length_controlled": {**lc, "length_unit": unit},
            "mean_length": {s: {"tokens": mean(toks[s]), "words": mean(words[s])} for s in "ab"}}


def result_dir(run_dir: Path, pair: str, judge: str) -> Path:
    """Where ``judge``'s results of ``pair`` (``A-vs-B``) go: compare/A-vs-B/ for the reward model,
    compare/A-vs-B.JUDGE/ for any other, JUDGE with each run of characters outside ``[A-Za-z0-9_.-]`` made one
    ``-`` (``human``; ``python:mod:fn`` -> ``python-mod-fn``), cut to 64 characters with a hash of the whole
    judge's name when longer."""
    if judge == "rm":
        return run_dir / "compare" / pair
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", judge).strip("-.") or "judge"
    if len(name) > 64:
        name = f"{name[:55]}-{hashlib.sha256(judge.encode('utf-8')).hexdigest()[:8]}"
    return run_dir / "compare" / f"{pair}.{name}"


def unfinished(session: Path, prompts: list) -> bool:
    """Whether a human session of these prompts has pairs left to judge (compare goes on with it)."""
    if not (session / "responses.jsonl").is_file():
        return False
    pairs = read_jsonl(session / "responses.jsonl")
    done = read_jsonl(session / "judgments.jsonl") if (session / "judgments.jsonl").is_file() else []
    return ([x["prompt"] for x in pairs] == [p.prompt for p in prompts]
            and len({j["index"] for j in done if j.get("judge") == "human"}) < len(pairs))


def jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in records)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def show_evals(run_dir: Path, names: list[str]) -> None:
    """Next to the win rate, what ``igpt eval`` measured of the same models, where it has run: mean RM
    score, KL to SFT and pretraining perplexity (the alignment tax)."""
    from rich.table import Table

    reports = {n: json.loads(p.read_text(encoding="utf-8")) for n in names
               if (p := run_dir / "eval" / n / "report.json").is_file()}
    if not reports:
        return
    table = Table(title="igpt eval of the same models (held-out prompts and text)", title_justify="left")
    temps = sorted({r["kl_temperature"] for r in reports.values() if "kl_temperature" in r})
    kl_col = "KL to SFT" + (f" (T={temps[0]:g})" if len(temps) == 1 else "")
    for col in ("model", "RM score", kl_col, "pretraining perplexity", "length", "EOS rate"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for n, r in reports.items():
        table.add_row(n, score_text(r), number(r.get("kl_to_sft"), ".3f"), number(r.get("ptx_perplexity"), ".2f"),
                      number(r.get("response_length"), ".1f"), number(r.get("eos_rate"), ".0%"))
    console().print(table)
    for line in temperature_lines(reports):  # eval's sampling temperature and the KL's, labelled
        console().print(line)


def length_text(report: dict) -> str:
    """The length-controlled win rate beside the raw one, and each side's mean length (terminal and page)."""
    lc, m = report["length_controlled"], report["mean_length"]
    rate = (f"- ({lc['method']})" if lc["win_rate"] is None
            else f"{lc['win_rate']:.1%} (95% CI {lc['ci_low']:.1%} - {lc['ci_high']:.1%})")
    lengths = "; ".join(f"{report[s]} {number(m[s]['tokens'], '.1f')} tokens, "
                        f"{number(m[s]['words'], '.1f')} words" for s in "ab")
    return (f"length-controlled win rate of {report['a']} (at equal length, AlpacaEval 2's GLM): {rate}; "
            f"mean length: {lengths}")


def show(report: dict, examples: list[dict]) -> None:
    """The comparison table and two example pairs."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"{report['a']} vs {report['b']} (judge: {report['judge']})", title_justify="left")
    for col in ("", "n", "A wins", "ties", "B wins", "A win rate", "95% CI"):
        table.add_column(col, justify="right" if col else "left")

    def row(label: str, r: dict) -> None:
        table.add_row(label, str(r["n"]), str(r["wins"]), str(r["ties"]), str(r["losses"]), f"{r['win_rate']:.1%}",
                      f"{r['ci_low']:.1%} - {r['ci_high']:.1%}")

    if report["n"]:
        row("all", report)
    for c, r in report["categories"].items():
        row(c, r)
    console().print(table)
    if report.get("length_controlled"):
        console().print(length_text(report))
    # one pair each side won (where there is one), so the examples show what the judge prefers
    first_win: dict[str, dict] = {}
    for j in examples:
        first_win.setdefault(j["winner"], j)
    for j in [first_win[w] for w in ("A", "B") if w in first_win] or examples[:2]:
        console().print(f"[bold]prompt:[/] {escape(j['prompt'][:300])}\n[bold]{report['a']}:[/] {escape(j['a'][:400])}\n"
                        f"[bold]{report['b']}:[/] {escape(j['b'][:400])}\n[dim]judge picked: {j['winner']}[/]\n")
