"""report.html: a strict HTML5 page (html5lib) that references nothing outside itself, with every section a
researcher keeps, built from small records written here (no model is trained)."""
import json
import re

import html5lib
import pytest
import yaml

from conftest import write_jsonl
from instructgpt_cli import __version__
from instructgpt_cli import report as report_page
from instructgpt_cli.stages.compare import tally
from instructgpt_cli.storage import sha256_file, weights_sha256

EOS = 2


def parse(page: str):
    """The page as html5lib's strict parser reads it: any HTML5 parse error raises."""
    return html5lib.HTMLParser(strict=True, namespaceHTMLElements=False).parse(page)


def outside_references(doc) -> list[str]:
    """Every src/href that is not a data: URI or an in-page anchor, every element that loads or runs
    something (script, link, iframe, object, embed), every CSS url() and @import."""
    bad = []
    for el in doc.iter():
        if el.tag in ("script", "link", "iframe", "object", "embed", "base"):
            bad.append(el.tag)
        for attr in ("src", "href", "srcset", "action", "poster", "data"):
            value = el.get(attr)
            if value is not None and not (value.startswith("data:") or value.startswith("#")):
                bad.append(f"{attr}={value[:60]}")
        text = (el.text or "") + (el.get("style") or "")
        bad += [m for m in re.findall(r"url\([^)]*\)|@import", text) if not m.startswith("url(data:")]
    return bad


def model_dir(path, payload: bytes):
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(payload)
    return path


def judgment(i, category, winner, a_ended, b_ended, text="resp"):
    return {"index": i, "prompt": f"prompt {i}", "category": category, "a": f"{text} a{i}", "b": f"{text} b{i}",
            "a_ids": [5, 6] + ([EOS] if a_ended else [7]), "b_ids": [8] + ([EOS] if b_ended else [9]),
            "winner": winner, "judge": "rm", "score_a": 0.5, "score_b": 0.25}


def compare_report(tmp_path, judgments, a_path, b_path, prompts):
    return {"a": "ppo", "b": "sft", "a_path": str(a_path), "b_path": str(b_path), "judge": "rm",
            "prompts": str(prompts), "n_prompts": len(judgments), "judged": len(judgments), **tally(judgments),
            "categories": tally(judgments, "category"),
            "settings": {"temperature": 0.7, "max_new_tokens": 48, "seed": 11},
            "responses_from": {"a": "sampled", "b": "sampled"}, "ci_method": "Wilson score interval, 95%"}


@pytest.fixture
def full_run(tmp_path):
    """A run directory with every record the page reads: SFT, RM and PPO metrics, both models' eval reports."""
    run = tmp_path / "run"
    a, b = model_dir(run / "ppo" / "final" / "policy", b"policy weights"), model_dir(run / "sft" / "final", b"sft")
    rm = model_dir(run / "rm" / "final", b"rm weights")
    write_jsonl(run / "sft" / "metrics.jsonl", [{"step": s, "train/loss": 3.0 / s, **({"eval/loss": 3.2 / s}
                                                 if s % 2 == 0 else {})} for s in range(1, 7)])
    write_jsonl(run / "rm" / "metrics.jsonl", [{"step": s, "train/loss": 0.7 / s, "train/accuracy": 0.5 + s / 20,
                                                "eval/loss": 0.8 / s, "eval/accuracy": 0.55 + s / 25}
                                               for s in (1, 2, 3)])
    write_jsonl(run / "ppo" / "metrics.jsonl", [
        {"step": s, "episode": 8 * s, "objective/kl": 0.1 * s, "objective/scores": 0.2 * s, "objective/beta": 0.05,
         "objective/rlhf_reward": 0.2 * s - 0.005 * s, "objective/entropy": float("nan") if s == 2 else 2.0 - s / 10,
         "policy/clipfrac": 0.1, "val/clipfrac": 0.05, "loss/ptx": 3.0, "val/response_length": 10.0 + s,
         "val/num_eos_tokens": s, "val/eos_rate": s / 8} for s in (1, 2, 3)])
    evals = {"ppo": {"model_sha256": weights_sha256(a), "n": 8, "score_mean": 0.61, "score_sd": 0.12,
                     "kl_to_sft": 0.4321, "kl_temperature": 0.7, "ptx_loss": 3.1, "ptx_perplexity": 22.198,
                     "alignment_tax": 0.05, "response_length": 12.5, "eos_rate": 0.25, "rm_accuracy": 0.75,
                     "rm_pairs": 4},
             "sft": {"model_sha256": "0" * 64, "n": 8, "kl_to_sft": 0.0, "response_length": 20.0, "eos_rate": 0.0}}
    for name, r in evals.items():
        (run / "eval" / name).mkdir(parents=True)
        (run / "eval" / name / "report.json").write_text(json.dumps(r))
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"prompt {i}"} for i in range(8)])
    judgments = [judgment(i, ["open_qa", "generation"][i % 2], "AB"[i % 3 == 0], i % 2 == 0, False) for i in range(8)]
    return run, a, b, rm, prompts, judgments


def write(tmp_path, run, report, judgments, **kw):
    out = tmp_path / "report.html"
    report_page.write_html(out, report, judgments, run, **kw)
    return out.read_text(encoding="utf-8")


def test_the_page_is_strict_html5_and_references_nothing_outside_itself(full_run, tmp_path):
    run, a, b, rm, prompts, judgments = full_run
    judgments[0]["b"] = "<script src='https://example.com/x.js'></script> & <img src=http://x>"  # escaped
    page = write(tmp_path, run, compare_report(tmp_path, judgments, a, b, prompts), judgments, eos_id=EOS,
                 rm_path=rm, device="cpu")
    doc = parse(page)  # raises on any HTML5 parse error
    assert outside_references(doc) == []
    assert len(doc.findall(".//img")) == 13  # win chart, 3 SFT/RM charts, 9 PPO charts
    assert doc.find(".//style") is not None and doc.find(".//script") is None  # the escaped response stayed text


def test_the_page_has_provenance_eval_table_curves_and_samples(full_run, tmp_path):
    run, a, b, rm, prompts, judgments = full_run
    page = write(tmp_path, run, compare_report(tmp_path, judgments, a, b, prompts), judgments, eos_id=EOS,
                 rm_path=rm, device="cpu")
    doc = parse(page)
    # provenance: both weights digests and the RM's, the prompts file's, decoding, seed, version, date, device
    prov = "".join(doc.find(".//table[@class='prov']").itertext())
    for digest in (weights_sha256(a), weights_sha256(b), weights_sha256(rm), sha256_file(prompts)):
        assert digest in prov
    assert weights_sha256(a) != weights_sha256(b)
    assert "temperature 0.7, max_new_tokens 48" in prov and "seed11" in prov.replace(" ", "")
    assert f"{__version__} (torch" in prov and "device cpu" in prov and re.search(r"20\d\d-\d\d-\d\dT", prov)
    # eval table: one row per model, numbers as eval measured them, whether eval saw these weights
    rows = [[c.strip() for c in tr.itertext()] for tr in doc.findall(".//table[@class='eval']/tbody/tr")]
    ppo_row = next(r for r in rows if r[0] == "ppo")
    sft_row = next(r for r in rows if r[0] == "sft")
    assert ["0.610 ± 0.120", "0.432", "3.1000", "22.20", "+0.0500", "12.5", "25%", "75.0% of 4 pairs", "yes"] == \
        ppo_row[2:]
    assert sft_row[2] == "-" and sft_row[-1] == "no (evaluated other weights)"
    # training curves: each chart by its alt text
    alts = {img.get("alt") for img in doc.findall(".//img")}
    assert {"win rate chart", "SFT loss (nats/token)", "RM loss", "RM accuracy", "reward vs KL",
            "PPO reward and its terms",
            "KL to SFT (nats)", "pretraining loss (ptx)", "β, KL coefficient (fixed)", "policy entropy (nats/token)",
            "clip fraction", "response length (tokens)", "EOS rate"} <= alts
    assert "not available" not in page
    # samples: 3 per category drawn, B never ended (marked each time), A ended on even prompts
    samples = page.split("id='samples'")[1]
    assert "ppo: 4 of 8 responses ended with EOS (50%)" in samples and "sft: 0 of 8 responses ended" in samples
    shown = re.findall(r"<h4>prompt (\d+)</h4>", samples)
    assert len(shown) == 6
    odd_a = sum(int(i) % 2 for i in shown)  # A's responses to odd prompts never ended
    assert samples.count("class='noeos'") == len(shown) + odd_a


def test_ppo_curves_are_drawn_against_episodes_also_for_records_without_them(full_run, tmp_path, monkeypatch):
    run, a, b, rm, prompts, judgments = full_run
    drawn = drawn_charts(monkeypatch)
    report = compare_report(tmp_path, judgments, a, b, prompts)
    write(tmp_path, run, report, judgments, eos_id=EOS)
    xlabel, lines = drawn["KL to SFT (nats)"]
    assert xlabel == "episodes" and [x for x, _ in lines[0][1]] == [8, 16, 24]
    assert [x for x, _ in drawn["policy entropy (nats/token)"][1][0][1]] == [8, 24]  # the NaN of a skipped step
    assert drawn["SFT loss (nats/token)"][1][1][1] == [(2, 1.6), (4, 0.8), (6, 3.2 / 6)]  # held-out every 2 steps
    # records from before `episode` and `val/eos_rate` were logged: iteration x rollout batch size (config.yaml)
    metrics = [json.loads(line) for line in (run / "ppo" / "metrics.jsonl").read_text().splitlines()]
    write_jsonl(run / "ppo" / "metrics.jsonl", [{k: v for k, v in m.items() if k not in ("episode", "val/eos_rate")}
                                                for m in metrics])
    (run / "ppo" / "config.yaml").write_text(yaml.safe_dump({"ppo": {"rollout_batch_size": 4}}))
    drawn.clear()
    write(tmp_path, run, report, judgments, eos_id=EOS)
    assert [x for x, _ in drawn["KL to SFT (nats)"][1][0][1]] == [4, 8, 12]
    assert drawn["EOS rate (responses that ended)"][1][0][1] == [(4, 0.25), (8, 0.5), (12, 0.75)]  # count / 4


def drawn_charts(monkeypatch) -> dict:
    """Every line chart the page draws, by title: (x label, [(label, points)])."""
    drawn = {}
    real = report_page.line_chart
    monkeypatch.setattr(report_page, "line_chart", lambda title, xlabel, lines, *r: drawn.setdefault(
        title, (xlabel, lines)) and real(title, xlabel, lines, *r))
    return drawn


def test_the_ppo_reward_chart_shows_score_missing_eos_penalty_and_kl_term_apart(full_run, tmp_path, monkeypatch):
    """Issue 31 item 11: objective/rlhf_reward is the score less the missing-EOS penalty less β·KL; a line
    labelled "score − β·KL" hid the penalty. Each term is its own line, the sum labelled with all three."""
    run, a, b, rm, prompts, judgments = full_run
    (run / "ppo" / "config.yaml").write_text(yaml.safe_dump({"ppo": {"missing_eos_penalty": 2.0, "reward_clip": 3}}))
    metrics = [json.loads(line) for line in (run / "ppo" / "metrics.jsonl").read_text().splitlines()]
    write_jsonl(run / "ppo" / "metrics.jsonl", [{**m, "objective/non_score_reward": -0.005 * m["step"]}
                                                for m in metrics])
    drawn = drawn_charts(monkeypatch)
    page = write(tmp_path, run, compare_report(tmp_path, judgments, a, b, prompts), judgments, eos_id=EOS)
    lines = dict(drawn["PPO reward and its terms"][1])
    assert lines["RM score"] == [(8, 0.2), (16, 0.4), (24, 0.2 * 3)]
    assert lines["− missing-EOS penalty"] == [(8, -2.0 * 7 / 8), (16, -2.0 * 6 / 8), (24, -2.0 * 5 / 8)]
    assert lines["− β·KL"] == [(8, -0.005), (16, -0.01), (24, -0.015)]
    total = lines["reward = score − penalty − β·KL (score clipped to ±3)"]
    assert [y for _, y in total] == [m["objective/rlhf_reward"] for m in metrics]
    assert "score − β·KL<" not in page and "'score − β·KL'" not in str(drawn)


def test_a_comparison_with_dpo_shows_dpo_curves_not_ppo(full_run, tmp_path, monkeypatch):
    """Issue 31 item 11: comparing the DPO model, the page shows DPO's loss, pair accuracy and margins (from
    dpo/metrics.jsonl), not PPO's curves, which say nothing of it."""
    run, a, b, rm, prompts, judgments = full_run
    (run / "dpo").mkdir()
    write_jsonl(run / "dpo" / "metrics.jsonl", [
        {"step": s, "train/loss": 0.69 / s, "rewards/accuracies": 0.5 + s / 10, "rewards/margins": 0.1 * s,
         **({"eval/loss": 0.7 / s, "eval/rewards/accuracies": 0.6, "eval/rewards/margins": 0.05 * s} if s == 2 else {})}
        for s in (1, 2)])
    drawn = drawn_charts(monkeypatch)
    report = {**compare_report(tmp_path, judgments, a, b, prompts), "a": "dpo", "a_path": str(a)}
    page = write(tmp_path, run, report, judgments, eos_id=EOS)
    alts = {img.get("alt") for img in parse(page).findall(".//img")}
    assert {"DPO loss", "DPO pair accuracy", "DPO margins"} <= alts
    assert not alts & {"reward vs KL", "PPO reward and its terms", "KL to SFT (nats)", "EOS rate"}
    accuracy = dict(drawn["DPO pair accuracy (chosen's implicit reward higher)"][1])
    assert accuracy == {"train": [(1, 0.6), (2, 0.7)], "held-out": [(2, 0.6)]}
    assert "<h3>PPO</h3>" not in page and "<h3>DPO</h3>" in page
    # PPO against DPO: both; PPO against SFT: PPO's only
    both = write(tmp_path, run, {**report, "b": "ppo"}, judgments, eos_id=EOS)
    assert "<h3>PPO</h3>" in both and "<h3>DPO</h3>" in both
    ppo_only = write(tmp_path, run, compare_report(tmp_path, judgments, a, b, prompts), judgments, eos_id=EOS)
    assert "<h3>PPO</h3>" in ppo_only and "<h3>DPO</h3>" not in ppo_only


def test_an_eval_sampled_at_another_temperature_than_the_comparison_says_so(full_run, tmp_path):
    """Issue 31 item 10: eval at T=1.0 and compare at T=0.7 give the same model other EOS rates; the eval
    table says its row was sampled at another temperature."""
    run, a, b, rm, prompts, judgments = full_run
    for name, t in (("ppo", 1.0), ("sft", 0.7)):
        path = run / "eval" / name / "report.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "kl_temperature": t,
                                    "settings": {"temperature": t, "seed": 11}}))
    page = write(tmp_path, run, compare_report(tmp_path, judgments, a, b, prompts), judgments, eos_id=EOS)
    table = page.split("id='eval'")[1].split("id='training'")[0]
    assert "ppo: eval sampled at T=1; the comparison at T=0.7" in table
    assert "sft: eval sampled at" not in table  # the same temperature: nothing to say


@pytest.mark.parametrize("config, title", [({"target_kl": 0.5}, "adaptive, target KL 0.5"), ({"target_kl": 0}, "fixed"),
                                           (None, "fixed"), ("moved", "adaptive")])
def test_beta_is_titled_by_the_kl_controller_the_run_had(full_run, tmp_path, config, title):
    run, a, b, rm, prompts, judgments = full_run
    if isinstance(config, dict):
        (run / "ppo" / "config.yaml").write_text(yaml.safe_dump({"ppo": config}))
    elif config == "moved":  # no config.yaml: beta that changed was adapted
        metrics = [json.loads(line) for line in (run / "ppo" / "metrics.jsonl").read_text().splitlines()]
        write_jsonl(run / "ppo" / "metrics.jsonl", [{**m, "objective/beta": 0.05 + m["step"] * 1e-7} for m in metrics])
    page = write(tmp_path, run, compare_report(tmp_path, judgments, a, b, prompts), judgments, eos_id=EOS)
    assert f"alt='β, KL coefficient ({title})'" in page


@pytest.mark.parametrize("ends", ["all", "none", "unknown"])
def test_a_compare_of_paths_outside_a_run_with_no_categories_says_what_is_missing(tmp_path, ends):
    a, b = model_dir(tmp_path / "a", b"a"), tmp_path / "b"
    b.mkdir()  # no safetensors: no digest
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "p"}])
    judgments = [judgment(i, None, "tie", ends == "all", ends == "all") for i in range(15)]
    if ends == "unknown":  # judgments of an older igpt carry no token ids
        judgments = [{k: v for k, v in j.items() if not k.endswith("_ids")} for j in judgments]
    report = compare_report(tmp_path, judgments, a, b, prompts)
    page = write(tmp_path, tmp_path / "no-run", report, judgments, eos_id=EOS)
    doc = parse(page)
    assert outside_references(doc) == []
    assert weights_sha256(a) in page and "not available (no safetensors)" in page
    assert "not available (run igpt eval on the models)" in page
    assert page.count("<p class='na'>not available</p>") == 3  # SFT, RM and PPO curves
    assert {img.get("alt") for img in doc.findall(".//img")} == {"win rate chart"}
    assert len(re.findall(r"<h4>", page)) == 12 and "<h3>" not in page.split("id='samples'")[1]
    marks = page.count("class='noeos'")
    assert marks == {"all": 0, "none": 24, "unknown": 0}[ends]
    counted = "15 of 15 responses ended" if ends == "all" else "0 of 15 responses ended"
    assert (counted in page) == (ends != "unknown")


def test_control_characters_of_a_sampled_response_are_shown_escaped_not_written(full_run, tmp_path):
    """A byte-level tokenizer decodes any byte: HTML5 forbids C0/C1 controls and noncharacters in a page."""
    run, a, b, rm, prompts, judgments = full_run
    for j in judgments:
        j["a"] = "bell\x07 nul\x00 del\x7f c1\x85 non\ufffe astral\U0010ffff tab\tok é"
    page = write(tmp_path, run, compare_report(tmp_path, judgments, a, b, prompts), judgments, eos_id=EOS)
    parse(page)  # raised 'Invalid codepoint in stream' before
    assert "bell\\x07 nul\\x00 del\\x7f c1\\x85 non\\ufffe astral\\U0010ffff tab\tok é" in page


def test_no_judgments_yet_still_makes_a_page(tmp_path):
    a = model_dir(tmp_path / "a", b"a")
    report = compare_report(tmp_path, [], a, a, tmp_path / "gone.jsonl")
    page = write(tmp_path, tmp_path, report, [])
    parse(page)
    assert "not available (no judgments)" in page and "not available (file gone)" in page


def test_samples_are_drawn_at_random_per_category_and_reproducibly():
    js = [{"index": i, "category": c} for i, c in enumerate(["x"] * 10 + ["y"] * 2 + [None] * 5)]
    picked = report_page.pick_samples(js, seed=3)
    assert set(picked) == {"", "x", "y"} and [len(picked[c]) for c in ("", "x", "y")] == [3, 3, 2]
    assert picked == report_page.pick_samples(js, seed=3)  # the same page from the same compare
    assert all(g == sorted(g, key=lambda j: j["index"]) for g in picked.values())  # prompt order in a group
    draws = {tuple(j["index"] for j in report_page.pick_samples(js, seed=s)["x"]) for s in range(20)}
    assert len(draws) > 5 and draws != {(0, 1, 2)}  # random, not the first three
    flat = report_page.pick_samples([{"index": i} for i in range(30)], seed=0)
    assert list(flat) == [""] and len(flat[""]) == 12
    assert report_page.pick_samples([], seed=0) == {}


def test_ended_reads_the_token_ids_as_sampled():
    assert report_page.ended([4, EOS], EOS) is True
    assert report_page.ended([EOS, 4], EOS) is False  # only the last token counts
    assert report_page.ended([], EOS) is False
    assert report_page.ended(None, EOS) is None and report_page.ended([4], None) is None
