"""Write the figure tables of docs/ from the artifacts that own the figures.

A measurement lives once, in its artifact: the release model's in ``models/release/metrics.json``,
``trust.json`` and ``model.json`` (its int8 section), the benchmark's in ``bench/results.json`` and
``bench/gpu.json``. Each table sits in a docs page between ``<!-- generated:NAME -->`` and
``<!-- /generated:NAME -->`` and is rewritten from them here; ``--check`` writes nothing and exits 1
when a page is stale (tests/test_docs.py runs it). As scripts/chart_readme.py does for the chart.

    python -m scripts.docs_tables            # rewrite the tables
    python -m scripts.docs_tables --check    # exit 1 if a table is out of date
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Callable

from returns_model.fileio import write_text
from returns_model.names import META_FILE, METRICS_FILE, TRUST_FILE
from training.unfamiliar import group_name

REPO = Path(__file__).resolve().parents[1]
RELEASE = REPO / "models" / "release"
BENCH = REPO / "bench"


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _pct(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}%"


def _md(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _certified(cert: dict[str, Any]) -> str:
    if cert.get("accept_nothing"):
        return "nothing certified: everything goes to review"
    return (f"{cert['threshold']:.4f}: {cert['errors']} errors among {cert['n_accepted']:,} accepted of "
            f"{cert['n_calibration']:,}, precision ≥ {_pct(cert['precision_lower_bound'])} with probability "
            f"{1 - cert['delta']:g}")


def model_figures(model_dir: Path = RELEASE) -> str:
    """The release model on its test split, under each served rule (float network, int8 graph)."""
    m, meta = _json(model_dir / METRICS_FILE), _json(model_dir / META_FILE)
    int8 = meta.get("int8") or {}
    i8 = int8.get("test", {})
    rows = [("accuracy", _pct(m["accuracy"]), _pct(i8.get("accuracy"))),
            ("macro-F1", f"{m['macro_f1']:.3f}", "-"),
            ("NLL before → after calibration", f"{m['nll_before_calibration']:.4f} → {m['nll_after_calibration']:.4f}",
             "-"),
            ("ECE (15 bins) before → after calibration",
             f"{_pct(m['ece_before_calibration'])} → {_pct(m['ece_after_calibration'])}",
             _pct(i8.get("ece_after_calibration"))),
            ("temperature", f"{m['temperature']:.3f}", f"{int8['calibration']['temperature']:.3f}" if int8 else "-"),
            ("certified threshold (validation)", _certified(m["certificate"]),
             _certified(int8["calibration"]["certificate"]) if int8 else "-"),
            ("test photos auto-accepted (precision)",
             f"{_pct(m['test_coverage_at_threshold'], 1)} ({_pct(m['test_precision_at_threshold'])})",
             f"{_pct(i8.get('auto_accepted'), 1)} ({_pct(i8.get('precision'))})" if i8 else "-"),
            ("test photos the gate flags unfamiliar", _pct(m["test_flagged_unfamiliar"]),
             _pct(i8.get("flagged_unfamiliar")) if i8 else "-"),
            ("area under the risk–coverage curve", f"{m['aurc']:.4f}", "-")]
    agree = int8.get("agreement_with_float_path")
    if agree:
        rows.append(("same label / same review decision as the float rule", "-",
                     f"{_pct(agree['same_label'])} / {_pct(agree['same_review_decision'])}"))
    return (f"Test split: {m['test_size']:,} photos; validation (calibration): {m['val_size']:,}.\n\n"
            + _md(("measure", "float rule", "int8 rule"), rows))


def unfamiliar_kinds(model_dir: Path = RELEASE) -> str:
    """Each kind of unfamiliar photo in the trust report, with its group as ``training.unfamiliar.GROUPS``
    names it (``group_name``): how many go to review under each rule."""
    trust, meta = _json(model_dir / TRUST_FILE), _json(model_dir / META_FILE)
    int8 = ((meta.get("int8") or {}).get("trust") or {}).get("unfamiliar_kinds_routed", {})
    rows = [(kind, group_name(v["group"]), f"{v['n']:,}", _pct(v["routed_to_review"], 1), _pct(int8.get(kind), 1))
            for kind, v in trust["unfamiliar_kinds"].items()]
    night = trust["mixed_night"]
    mixed = (f"A night of {night['ordinary']:,} test photos and {night['unfamiliar']:,} unfamiliar ones: "
             f"{_pct(night['unfamiliar_routed_to_review'], 1)} of the unfamiliar ones go to review, and "
             f"{_pct(night['ordinary_auto_accepted'], 1)} of the ordinary ones are auto-accepted at "
             f"{_pct(night['ordinary_accepted_precision'])}.")
    return _md(("kind", "group", "photos", "to review (float rule)", "to review (int8 rule)"), rows) + "\n\n" + mixed


def performance(bench_dir: Path = BENCH) -> str:
    """``make bench``'s figures (bench/results.json): the machine, then every figure as the bench prints it."""
    from scripts.bench import rows

    r = _json(bench_dir / "results.json")
    env = r["environment"]
    ts = env["torchserve_batch"]
    isa = f" ({', '.join(env['cpu_isa'])}; torch's kernels: {env['cpu_capability']})" if "cpu_isa" in env else ""
    head = (f"CPU: {env['cpu']}{isa}, {env['cpus']} CPUs; torch {env['torch']}, TorchServe {env['torchserve']}, "
            f"ONNX Runtime {env['onnxruntime']}, KServe {env['kserve']}. Archive: `cpu_backend: {env['cpu_backend']}`, "
            f"server batch {ts['batch_size']}, {env['worker_threads']} thread(s) per worker; returns-submit sends "
            f"{env['submit_batch_size']} photos per request, {env['submit_concurrency']} in flight. Each figure is the "
            f"median of {r['runs']} runs (min–max); served over {r['n']:,} photos.")
    return head + "\n\n" + _md(("figure", "value"), rows(r))


def gpu(bench_dir: Path = BENCH) -> str:
    """``make bench-gpu``'s figures (bench/gpu.json), where a GPU run has been made."""
    path = bench_dir / "gpu.json"
    if not path.exists():
        return "No GPU run has been recorded (`make bench-gpu` writes bench/gpu.json)."
    g = _json(path)
    agree = g["gpu_vs_cpu_answers"]
    rows = [("raw forward, fp16 autocast", f"{g['raw_amp_images_per_s']:,.0f} photos/s"),
            ("raw decode + forward, fp16 autocast", f"{g['raw_amp_decode_images_per_s']:,.0f} photos/s"),
            ("raw forward, fp32", f"{g['raw_fp32_images_per_s']:,.0f} photos/s"),
            ("served (returns-submit -> returns-kserve)", f"{g['served_images_per_s']:,.0f} photos/s"),
            ("naive, one photo per request", f"{g['naive_images_per_s']:,.0f} photos/s"),
            ("served / raw decode + forward (fp16)", f"{g['served_over_raw_amp_decode']:.2f}"),
            ("latency c=1 p50/p95/p99", "{p50}/{p95}/{p99} ms".format(**g["latency_ms_concurrency_1"])),
            ("GPU vs CPU answers: same label / same review decision",
             f"{agree['same_label']:,} / {agree['same_review_decision']:,} of {agree['photos']:,}"),
            ("GPU vs CPU answers: largest confidence difference", f"{agree['max_confidence_difference']:.4f}")]
    return (f"GPU: {g['gpu']}; torch {g['torch']}; median of {g['runs']} runs over {g['n']:,} photos.\n\n"
            + _md(("figure", "value"), rows))


def _machine(run: dict[str, Any]) -> str:
    isa = ", ".join(run.get("cpu_isa") or []) or "no ISA flags recorded"
    return f"{run['cpu']} (family/model {run.get('cpu_family_model') or '?'}; {isa}), {run['cpus']} CPUs"


def mutation(bench_dir: Path = BENCH) -> str:
    """``make mutation``'s kill rates (bench/mutation.json): per module, with the survivors by name."""
    path = bench_dir / "mutation.json"
    if not path.exists():
        return "No mutation run has been recorded (`make mutation` writes bench/mutation.json)."
    m = _json(path)
    run, mods = m["run"], m["modules"]
    sample = (f"{run['sample_per_module']} mutants per module drawn at random (seed {run['seed']})"
              if run["sample_per_module"] else "every mutant")
    wall = f", {run['wall_minutes']:.1f} minutes" if run.get("wall_minutes") is not None else ""
    rows = []
    for mod, t in mods.items():
        ci = "{:.1%}–{:.1%}".format(*t["kill_rate_95"]) if "kill_rate_95" in t else "all tested"
        rows.append((f"`{mod}`", f"{t['mutants']:,}", t["tested"], t["killed"], f"**{t['kill_rate']:.1%}**", ci))
    tested, killed = sum(t["tested"] for t in mods.values()), sum(t["killed"] for t in mods.values())
    rows.append(("all tested", f"{sum(t['mutants'] for t in mods.values()):,}", f"{tested:,}", f"{killed:,}",
                 f"**{killed / tested:.1%}**", ""))
    # a mutant's name is "<dotted module>.<function>__mutmut_<n>: <status>"
    survivors = "\n".join(f"- `{mod}`: " + ", ".join(f"`{name.split(': ')[0].rsplit('.', 1)[-1]}`"
                                                     for name in t["not_killed"])
                          for mod, t in mods.items() if t["not_killed"])
    return (f"Run of {run['date']} on {_machine(run)}: {sample}{wall}.\n\n"
            + _md(("module", "mutants", "tested", "killed", "kill rate", "95% interval"), rows)
            + ("\n\nNot killed (function and mutant number; `python -m mutmut show NAME` prints one):\n\n" + survivors
               if survivors else ""))


def soak(bench_dir: Path = BENCH) -> str:
    """``make soak``'s figures (bench/soak.json): load, answers and memory of a bounded TorchServe soak."""
    path = bench_dir / "soak.json"
    if not path.exists():
        return "No soak has been recorded (`make soak` writes bench/soak.json)."
    s = _json(path)
    run, mem0, mem1 = s["run"], s["rss_mb_before"], s["rss_mb_after"]
    rows = [("load", f"{s['seconds']:.0f} s at concurrency {s['concurrency']}: {s['requests']:,} requests "
                     f"({s['photos']:,} photos; {s['requests_per_s']:,.0f} requests/s, {s['photos_per_s']:,.0f} photos/s)"),
            ("answers", f"{s['2xx']:,} 2xx, **{s['4xx']}** 4xx, **{s['5xx']}** 5xx"),
            ("worker restarts", f"**{s['worker_restarts']}**"),
            ("memory (RSS) before → after", f"worker {mem0['worker']:,} → {mem1['worker']:,} MB, "
                                            f"frontend {mem0['frontend']:,} → {mem1['frontend']:,} MB"),
            ("worker growth after the first tenth", f"{s['worker_growth_after_warmup_mb']:.1f} MB")]
    return (f"Run of {run['date']} on {_machine(run)}; model {run['model_version']}, served rule {run['rule']} "
            f"on {run['runtime']}, server batch {run['server_batch']}"
            + (", load average after {:.2f} / {:.2f} / {:.2f}".format(*run["load_average_after"])
               if run.get("load_average_after") else "") + ".\n\n" + _md(("what", "figure"), rows))


# page -> the tables in it
PAGES: dict[str, dict[str, Callable[[], str]]] = {
    "docs/model-card.md": {"model-figures": model_figures, "unfamiliar-kinds": unfamiliar_kinds},
    "docs/performance.md": {"performance": performance, "gpu": gpu},
    "docs/reliability.md": {"soak": soak},
    "docs/testing.md": {"mutation": mutation},
}


def render(text: str, tables: dict[str, Callable[[], str]], page: str) -> str:
    """``text`` with each table's section rewritten; ValueError when a marker pair is missing."""
    for name, make in tables.items():
        start, end = f"<!-- generated:{name} -->", f"<!-- /generated:{name} -->"
        pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
        if not pattern.search(text):
            raise ValueError(f"{page}: no {start} ... {end} section")
        body = make()
        text = pattern.sub(lambda _: f"{start}\n{body}\n{end}", text)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Write docs/ figure tables from their artifacts.")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if a table is out of date")
    args = p.parse_args(argv)
    stale = []
    for page, tables in PAGES.items():
        path = REPO / page
        old = path.read_text()
        new = render(old, tables, page)
        if new != old:
            stale.append(page)
            if not args.check:
                write_text(path, new)
    if args.check and stale:
        print(f"stale: {', '.join(stale)}; run `python -m scripts.docs_tables`", file=sys.stderr)
        return 1
    print("docs tables: " + (f"rewrote {', '.join(stale)}" if stale and not args.check else "up to date"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
