"""The markdown table and the PNG chart (Pillow only) of one benchmark run."""

from __future__ import annotations

from typing import Dict, List

from bench.cases import ALLOCATOR_NOTE

SET_TITLES = {"imagenet": "ImageNet-like (~430x370, ~33 KB)", "hd": "1920x1080 (~430 KB)",
              "mem-500": "one 500-image tar", "mem-5000": "one 5,000-image tar"}


def _fmt(value, digits=0, suffix=""):
    if value is None:
        return "—"
    if isinstance(value, float) and digits:
        return f"{value:,.{digits}f}{suffix}"
    return f"{value:,.0f}{suffix}"


def markdown(run: Dict) -> str:
    m = run["machine"]
    m.setdefault("git", {"commit": "unknown", "subject": "", "local_changes": []})
    lines = [
        f"Run {run['started']} ({run['mode']} mode), total {run['total_s']:.0f} s "
        f"(corpus {run['corpus_s']:.0f} s), {run['reps']} rounds{' after a warm-up run per case' if run['warmup'] else ''}. "
        f"Code: commit {m['git']['commit']} ({m['git']['subject']})"
        f"{'; local changes in ' + ', '.join(m['git']['local_changes']) if m['git']['local_changes'] else ''}. Machine: {m['cores']} cores ({m['cpu_model']}), "
        f"{m['mem_gb']:.0f} GB; load average (1/5/15 min) at start {m['load_start']}, at end {m['load_end']}.",
        "",
        "Throughput is the marginal rate (N - N/4) / (T(N) - T(N/4)), the median of the repetitions after one "
        "warm-up run; start-up is T(N) - N / rate. CPU = process-tree CPU time / wall / cores over the same "
        "marginal region (1.00 = every core busy); CPU ms/img = marginal process-tree CPU time per image, and "
        "CPU-eff. x limit = limit's CPU ms/img / this case's: what x limit would be if both kept every core busy "
        "(steadier than wall-clock rates on a shared machine). Peak RSS: the worker's VmHWM for one process; for a process "
        "tree the sampled peak of the tree's summed PSS. *load* = median 1-minute load average over the case's runs. "
        "The cases run in rounds (every case once per round) so that each samples the machine's load over the "
        "whole run, and *x limit* is the median over the rounds of the case's rate / the limit's rate in the same "
        "round. Memory cases (†) run one size only: their rate is N / total time, start-up included.",
        "",
        "| case | set | N | allocator | images/s | MP/s | x limit | CPU | CPU ms/img | CPU-eff. x limit "
        "| peak RSS MB | start-up s | load | runs |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in run["cases"]:
        if r.get("skipped"):
            lines.append(f"| {r['name']} | {r['corpus']} | | | skipped: {r['skipped']} | | | | | | | | | |")
            continue
        if r.get("error"):
            lines.append(f"| {r['name']} | {r['corpus']} | | | failed: {r['error_short']} | | | | | | | | | |")
            continue
        ratio = r.get("x_limit")
        dagger = "" if r.get("marginal", True) else " †"
        lines.append(
            f"| {r['name']}{dagger} | {r['corpus']} | {r['n']:,} | {r['allocator']} | {_fmt(r['images_per_s'])} | "
            f"{_fmt(r['mp_per_s'])} | {_fmt(ratio, 2) if ratio is not None else '—'} | "
            f"{_fmt(r['cpu_util'], 2)} | {_fmt(r.get('cpu_ms_per_image'), 3)} | "
            f"{_fmt(r.get('cpu_x_limit'), 2)} | {_fmt(r['peak_rss_mb'])} | {_fmt(r['startup_s'], 2)} | "
            f"{r['load_start']:.2f} | {r['runs']} |"
        )
    lines += ["", "Cases:", ""]
    for r in run["cases"]:
        lines.append(f"- `{r['name']}`: {r['title']}.")
    lines += ["", "Allocator settings: " + "; ".join(f"*{k}* = {v}" for k, v in ALLOCATOR_NOTE.items()) + ".", ""]
    lines += ["Targets:", ""]
    for t in run["targets"]:
        verdict = "met" if t["met"] else ("not met" if t["met"] is not None else "not measured")
        value = "—" if t["value"] is None else f"{t['value']:.2f}"
        lines.append(f"- {t['name']}: {value} (target {t['op']} {t['target']}): **{verdict}**. {t.get('detail', '')}")
    return "\n".join(lines) + "\n"


def chart(run: Dict, path: str) -> None:
    """Horizontal bars of images/s per case, one panel per corpus set, each bar labelled with its value and
    its ratio to that set's limit; a dashed line marks 0.9 x limit."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=15)
    small = ImageFont.load_default(size=13)
    bold = ImageFont.load_default(size=17)
    panels: List[tuple] = []
    for corpus in ("imagenet", "hd"):
        rows = [r for r in run["cases"] if r["corpus"] == corpus and r.get("images_per_s") and r.get("decodes", True)]
        if rows:
            panels.append((corpus, rows))
    width, left, right, bar_h, gap = 1100, 190, 270, 22, 8
    height = 88 + sum(50 + len(rows) * (bar_h + gap) for _, rows in panels) + 20
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    m = run["machine"]
    d.text((12, 10), f"beam-tarimg benchmark: images/s per case ({run['mode']}, {run['started']})", fill="black",
           font=bold)
    d.text((12, 34), f"{m['cores']} cores {m['cpu_model']}, load avg at start {m['load_start']}, at end "
           f"{m.get('load_end', '?')} (the benchmark itself adds about {m['cores']}); marginal rate, median of "
           f"{run['reps']} rounds", fill=(80, 80, 80), font=small)
    d.text((12, 52), "(x limit: ratio to the limit in the same round; CPU-eff.: limit's CPU time per image / the "
           "case's); dashed line = 0.9 x limit; core-tario (no decode) left out", fill=(80, 80, 80), font=small)
    y = 82
    colours = {"limit": (90, 90, 90), "dali": (118, 185, 0), "breakdown": (160, 200, 120), "reader": (31, 119, 180),
               "pipeline": (255, 127, 14)}
    for corpus, rows in panels:
        d.text((12, y + 8), SET_TITLES.get(corpus, corpus), fill="black", font=bold)
        y += 36
        top = max(r["images_per_s"] for r in rows)
        scale = (width - left - right) / top
        limit = next((r["images_per_s"] for r in rows if r["group"] == "limit" and r["allocator"] == "tuned"), None)
        if limit:  # behind the bars and labels
            x = left + int(0.9 * limit * scale)
            for yy in range(y - 4, y + len(rows) * (bar_h + gap), 8):
                d.line([x, yy, x, yy + 4], fill=(200, 0, 0), width=2)
        for r in rows:
            w = max(1, int(r["images_per_s"] * scale))
            d.text((left - 8, y + bar_h // 2), r["name"], fill="black", font=font, anchor="rm")
            d.rectangle([left, y, left + w, y + bar_h], fill=colours.get(r["group"], (120, 120, 120)))
            label = f"{r['images_per_s']:,.0f}"
            if r.get("x_limit") is not None:
                label += f"  ({r['x_limit']:.2f}x"
                label += f"; CPU-eff. {r['cpu_x_limit']:.2f}x)" if r.get("cpu_x_limit") is not None else ")"
            box = d.textbbox((left + w + 6, y + bar_h // 2), label, font=font, anchor="lm")
            d.rectangle([box[0] - 2, box[1] - 1, box[2] + 2, box[3] + 1], fill="white")
            d.text((left + w + 6, y + bar_h // 2), label, fill="black", font=font, anchor="lm")
            y += bar_h + gap
        y += 14
    img.save(path, optimize=True)
