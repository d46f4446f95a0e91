"""``igpt compare A B``: how often people (or the reward model) prefer A's response to B's.

Both models answer every prompt with the same decoding settings and seed; a judge picks the better
response or a tie. The win rate counts a tie as half a win, so swapping A and B gives exactly 1 minus
the win rate; its 95% confidence interval is the Wilson score interval at that proportion and n
(symmetric under the swap too). Results: compare/A-vs-B/report.json, judgments.jsonl, report.html.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from ..config import CompareConfig, ModelConfig
from ..data import read_prompts, render_queries
from ..errors import BadInput
from ..models import load_model, load_tokenizer, position_limit, resolve_device, same_tokenizer, stage_model
from ..rollout import decode_response, generate, score_responses
from ..rundir import atomic_write_text, read_metrics
from ..stats import win_rate
from ..train import console
from .. import tui

def tally(judgments: list[dict], key: str | None = None) -> dict:
    """Win rate of A over all judgments, or per value of ``key`` (e.g. category)."""
    def count(js: list[dict]) -> dict:
        return win_rate(*(sum(j["winner"] == w for j in js) for w in ("A", "tie", "B")))

    if key is None:
        return count(judgments)
    groups = sorted({j.get(key) for j in judgments if j.get(key)})
    return {g: count([j for j in judgments if j.get(key) == g]) for g in groups}


def eval_samples(cfg: CompareConfig, path: Path, prompts: list) -> list[str] | None:
    """Responses ``igpt eval`` already sampled from this model for these prompts with these decoding
    settings and seed (the same responses compare would sample), or None."""
    settings = {"temperature": cfg.temperature, "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed}
    for report_file in sorted((Path(cfg.run_dir) / "eval").glob("*/report.json")):
        report = json.loads(report_file.read_text(encoding="utf-8"))
        if (Path(report["model_path"]).resolve() != path.resolve() or report.get("settings") != settings
                or Path(report["prompts"]).resolve() != Path(cfg.prompts).resolve()):
            continue
        samples = [json.loads(line) for line in (report_file.parent / "samples.jsonl").read_text().splitlines()]
        if [x["prompt"] for x in samples] == [p.prompt for p in prompts]:
            return [x["response"] for x in samples]
    return None


def answers(cfg: CompareConfig, path: Path, tokenizer, queries: list[list[int]], prompts: list, device) -> list[str]:
    """Both models answer with the same settings and seed; reuses ``igpt eval``'s samples when they match."""
    reused = eval_samples(cfg, path, prompts)
    if reused is not None:
        return reused
    model = load_model(ModelConfig(name=str(path), dtype=cfg.dtype), tokenizer, path, device, cfg.seed).eval()
    torch.manual_seed(cfg.seed)  # the same seed for both models
    return [decode_response(tokenizer, r)
            for r in generate(model, tokenizer, queries, cfg.max_new_tokens, cfg.temperature, cfg.batch_size)]


def run(cfg: CompareConfig) -> dict:
    # 1. validate inputs; nothing is written before they pass
    run_dir = Path(cfg.run_dir)
    errors = [f"{k.upper()}: required" for k in ("a", "b") if not getattr(cfg, k)]
    if not cfg.prompts:
        errors.append("--prompts: required")
    if errors:
        raise BadInput(errors)
    (name_a, path_a), (name_b, path_b) = stage_model(cfg.a, run_dir, "A"), stage_model(cfg.b, run_dir, "B")
    if name_a == name_b:
        name_a, name_b = f"{name_a}-a", f"{name_b}-b"
    prompts = read_prompts(cfg.prompts)
    tokenizer, _ = load_tokenizer(ModelConfig(name=str(path_a)))
    rm_path = Path(cfg.rm) if cfg.rm else run_dir / "rm" / "final"
    if cfg.judge == "rm":
        if not (rm_path / "config.json").is_file():
            raise BadInput([f"--rm: {rm_path} does not exist; train a reward model or pass --rm PATH (or --judge human)"])
        if not same_tokenizer(tokenizer, load_tokenizer(ModelConfig(name=str(rm_path)))[0]):
            raise BadInput([f"--rm {rm_path}: its tokenizer differs from {path_a}'s"])
    # prompt + response must fit both models and the reward model that judges them
    limits = [position_limit(str(p)) for p in [path_a, path_b] + ([rm_path] if cfg.judge == "rm" else [])]
    queries = render_queries(tokenizer, prompts, cfg.max_new_tokens, min(filter(None, limits), default=None))
    out = run_dir / "compare" / f"{name_a}-vs-{name_b}"
    device = resolve_device(cfg.device)

    # 2. both models answer every prompt (kept, so a human judging session can stop and resume)
    pairs_file = out / "responses.jsonl"
    pairs = []
    if pairs_file.exists() and cfg.judge == "human":  # a human session resumes on the responses it was shown
        pairs = [json.loads(line) for line in pairs_file.read_text(encoding="utf-8").splitlines()]
        if [x["prompt"] for x in pairs] != [p.prompt for p in prompts]:
            pairs = []  # other prompts this time: answer them afresh
    if not pairs:
        resp_a = answers(cfg, path_a, tokenizer, queries, prompts, device)
        resp_b = answers(cfg, path_b, tokenizer, queries, prompts, device)
        pairs = [{"prompt": p.prompt, "category": p.category, "a": a, "b": b}
                 for p, a, b in zip(prompts, resp_a, resp_b)]
        atomic_write_text(pairs_file, "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in pairs))

    # 3. judge
    judgments_file = out / "judgments.jsonl"
    if cfg.judge == "rm":
        judgments = judge_rm(cfg, rm_path, tokenizer, queries, pairs, device)
        atomic_write_text(judgments_file, "".join(json.dumps(j, ensure_ascii=False) + "\n" for j in judgments))
    else:
        judgments = judge_human(cfg, pairs, judgments_file)

    # 4. report: numbers, per category, and a page people can look at
    report = {"a": name_a, "b": name_b, "a_path": str(path_a), "b_path": str(path_b), "judge": cfg.judge,
              "prompts": cfg.prompts, "n_prompts": len(pairs), "judged": len(judgments), **tally(judgments),
              "categories": tally(judgments, "category"),
              "settings": {"temperature": cfg.temperature, "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed},
              "ci_method": "Wilson score interval, 95%, ties counted as half a win"}
    atomic_write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    from ..report import write_html

    write_html(out / "report.html", report, judgments, read_metrics(run_dir / "ppo" / "metrics.jsonl"))
    show(report, judgments)
    show_evals(run_dir, [name_a, name_b])
    console().print(f"report: {out / 'report.html'}")
    return report


def show_evals(run_dir: Path, names: list[str]) -> None:
    """Next to the win rate, what ``igpt eval`` measured of the same models, where it has run: mean RM
    score, KL to SFT and pretraining perplexity (the alignment tax)."""
    from rich.table import Table

    reports = {n: json.loads(p.read_text(encoding="utf-8")) for n in names
               if (p := run_dir / "eval" / n / "report.json").is_file()}
    if not reports:
        return
    table = Table(title="igpt eval of the same models (held-out prompts and text)", title_justify="left")
    for col in ("model", "RM score", "KL to SFT", "pretraining perplexity", "length", "EOS rate"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for n, r in reports.items():
        score = f"{r['score_mean']:.3f} ± {r['score_sd']:.3f}" if "score_mean" in r else "-"
        ppl = f"{r['ptx_perplexity']:.2f}" if "ptx_perplexity" in r else "-"
        table.add_row(n, score, f"{r['kl_to_sft']:.3f}", ppl, f"{r['response_length']:.1f}", f"{r['eos_rate']:.0%}")
    console().print(table)


def judge_rm(cfg: CompareConfig, rm_path: Path, tokenizer, queries, pairs: list[dict], device) -> list[dict]:
    rm = load_model(ModelConfig(name=str(rm_path), dtype=cfg.dtype), tokenizer, rm_path, device, cfg.seed, "reward")
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]  # noqa: E731
    sa = score_responses(rm, tokenizer, queries, [encode(p["a"]) for p in pairs], cfg.batch_size).tolist()
    sb = score_responses(rm, tokenizer, queries, [encode(p["b"]) for p in pairs], cfg.batch_size).tolist()
    out = []
    for i, (p, a, b) in enumerate(zip(pairs, sa, sb)):
        winner = "A" if a > b + cfg.tie_margin else "B" if b > a + cfg.tie_margin else "tie"
        out.append({"index": i, **p, "score_a": a, "score_b": b, "winner": winner, "judge": "rm"})
    return out


def judge_human(cfg: CompareConfig, pairs: list[dict], path: Path) -> list[dict]:
    """Show each pair in a seeded random order and side; append each judgment as it is made, so a session
    can stop (q, or the end of input) and resume where it stopped."""
    done = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []
    if any(j.get("judge") != "human" or j["prompt"] != pairs[j["index"]]["prompt"] for j in done):
        done = []  # judgments of the reward model or of other prompts: a human session starts its own
        atomic_write_text(path, "")
    seen = {j["index"] for j in done}
    rng = random.Random(cfg.seed)
    order = list(range(len(pairs)))
    rng.shuffle(order)
    sides = [rng.random() < 0.5 for _ in pairs]  # True: A is shown as response 1
    todo = [i for i in order if i not in seen]
    for n, i in enumerate(todo):
        p = pairs[i]
        first, second = (p["a"], p["b"]) if sides[i] else (p["b"], p["a"])
        answer = tui.pick_better(len(seen) + n, len(pairs), p["prompt"], first, second)
        if answer == tui.QUIT:
            tui.say(f"stopped; {len(done)} judgments saved in {path} — run the same command to continue")
            break
        if answer == "s":
            continue
        winner = "tie" if answer == "t" else ("A" if (answer == "1") == sides[i] else "B")
        judgment = {"index": i, **p, "winner": winner, "judge": "human", "shown_first": "A" if sides[i] else "B"}
        done.append(judgment)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(judgment, ensure_ascii=False) + "\n")
    return done


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
    # one pair each side won (where there is one), so the examples show what the judge prefers
    first_win: dict[str, dict] = {}
    for j in examples:
        first_win.setdefault(j["winner"], j)
    for j in [first_win[w] for w in ("A", "B") if w in first_win] or examples[:2]:
        console().print(f"[bold]prompt:[/] {escape(j['prompt'][:300])}\n[bold]{report['a']}:[/] {escape(j['a'][:400])}\n"
                        f"[bold]{report['b']}:[/] {escape(j['b'][:400])}\n[dim]judge picked: {j['winner']}[/]\n")
