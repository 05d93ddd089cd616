"""Markdown tables of a ``mptrec bench`` results JSON (the README embeds ``bench/results.md``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def fmt(stat: Any, digits: int = 0, scale: float = 1.0) -> str:
    """``median (min-max)`` of a JSON Stat; a plain number as is; n/a for None."""
    if stat is None:
        return "n/a"
    if isinstance(stat, int | float):
        return f"{stat * scale:,.{digits}f}"
    med, lo, hi = (stat[k] * scale for k in ("median", "min", "max"))
    return f"{med:,.{digits}f} ({lo:,.{digits}f}-{hi:,.{digits}f})"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out + [""]


def _error(section: Mapping[str, Any] | None) -> list[str]:
    if section is None:
        return ["(not run)", ""]
    if "error" in section:
        return [f"**Failed:** `{section['error'][:300]}`", ""]
    return []


def _stage1(res: Mapping[str, Any]) -> list[str]:
    lines = ["## Stage-1 training throughput (samples/s)", ""]
    sec = res.get("stage1")
    if sec is None or "error" in sec:
        return lines + _error(sec)
    rows = []
    for name, r in sec.items():
        if "error" in r:
            rows.append([name, "failed", "", "", "", "", "", ""])
            continue
        sps = r["samples_per_s"]
        rows.append(
            [
                f"{name} (width {r['embedding_dim']}, batch {r['batch_size']}, D_in {r['d_in']})",
                fmt(sps["ours"]),
                fmt(sps.get("ours_fp32")),
                fmt(sps["plain"]),
                fmt(sps["sparse"]),
                fmt(r["speedup_vs_plain"], 2),
                fmt(r["speedup_vs_sparse"], 2),
                f"{fmt(r.get('speedup_vs_plain_fp32'), 2)} / {fmt(r.get('speedup_vs_sparse_fp32'), 2)}",
            ]
        )
    lines += _table(
        [
            "size",
            "ours (default config)",
            "ours, fp32 (autocast none)",
            "(a) paper's code",
            "(b) sparse PyTorch",
            "ours / (a)",
            "ours / (b)",
            "ours fp32 / (a), / (b)",
        ],
        rows,
    )
    first = next(iter(sec.values()))
    if "references" in first:
        refs = first["references"]
        lines += [
            f"(a): {refs['plain']} (r_emb {refs['r_emb']}). (b): {refs['sparse']}; both fp32 with "
            "nn.Dropout. Ours: TorchRec's fused "
            f"{first['ours']['embedding_optimizer']} for the tables in backward, fused Adam for the dense "
            "part, "
            f"MaskDropout, train.autocast = {first['ours'].get('autocast', 'none')} "
            f"(bf16 here: {first['ours'].get('bf16', False)}), no DDP on one rank, "
            f"pipelined={first['ours']['pipelined']}, r_emb {first['ours']['r_emb']} (the whole-table L2 "
            "cannot be applied to fused tables). Width 4, not the paper's 5: the fused CPU kernel needs a "
            "multiple of 4. Median (min-max) over repeats; ratios are per repeat (interleaved).",
            "",
        ]
    return lines


def _scaling(res: Mapping[str, Any]) -> list[str]:
    sec = res.get("scaling")
    lines = ["## 1 vs 2 processes (gloo, paper dims, batch per process)", ""]
    if sec is None or "error" in sec:
        return lines + _error(sec)
    rows = [[name, fmt(r["samples_per_s"])] for name, r in sec["runs"].items()]
    lines += _table(["configuration", "global samples/s"], rows)
    return lines + [f"2 vs 1 process (1 thread each): {fmt(sec['speedup_2_vs_1_process'], 2)}x.", ""]


def _profile(res: Mapping[str, Any]) -> list[str]:
    sec = res.get("profile")
    lines = ["## Where the time goes (our stage-1 step, paper dims, torch.profiler)", ""]
    if sec is None or "error" in sec:
        return lines + _error(sec)
    cats = [[c, f"{v['ms_per_step']:.2f}", f"{v['percent']:.1f}"] for c, v in sec["categories"].items()]
    lines += _table(["category", "ms/step", "%"], cats)
    ops = [
        [
            f"`{o['op'][:70]}`",
            f"{o['self_ms_per_step']:.2f}",
            f"{o['percent']:.1f}",
            f"{o['calls_per_step']:g}",
        ]
        for o in sec["top_ops"][:10]
    ]
    lines += _table(["top op (self time)", "ms/step", "%", "calls/step"], ops)
    return lines


def _allocator(res: Mapping[str, Any]) -> list[str]:
    sec = res.get("allocator")
    lines = ["## Allocator settings and thread pinning (our stage-1 step, paper dims)", ""]
    if sec is None or "error" in sec:
        return lines + _error(sec)
    names = (("glibc thresholds raised (`mptrec_pkg/runtime.py`, the default)", "tuned"),
             ("C library defaults (`MPTREC_MALLOC_TUNING=0`)", "defaults"),
             ("raised thresholds + OpenMP threads pinned (`OMP_PROC_BIND=close OMP_PLACES=cores`)", "pinned"))
    rows = [[name, fmt(sec[key]["samples_per_s"]), fmt(sec[key]["faults_per_step"])]
            for name, key in names if key in sec]
    lines += _table(["process settings", "samples/s", "minor page faults per step"], rows)
    applied = "" if sec.get("applied") else " (the settings could not be applied here: no glibc `mallopt`)"
    text = f"Raised thresholds / defaults: {fmt(sec['speedup'], 2)}x{applied}"
    if "pinned_speedup" in sec:
        text += f"; pinned / not pinned: {fmt(sec['pinned_speedup'], 2)}x"
    return lines + [text + "; one fresh process per figure, the modes alternating.", ""]


def _dense(res: Mapping[str, Any]) -> list[str]:
    sec = res.get("dense_speedups")
    lines = ["## Dense-side speedups (ours, paper dims)", ""]
    if sec is None or "error" in sec:
        return lines + _error(sec)
    rows = []
    for name, v in sec.items():
        if "error" in v:
            rows.append([name, v["kind"], "failed", f"`{v['error'][:80]}`"])
        else:
            note = f"compile {v['compile_s']} s" if "compile_s" in v else ""
            rows.append(
                [
                    name,
                    v["kind"],
                    fmt(v["samples_per_s"]),
                    fmt(v["vs_baseline"], 2) + (f"; {note}" if note else ""),
                ]
            )
    lines += _table(["variant", "kind", "samples/s", "vs baseline"], rows)
    summary = res.get("dense_speedups_summary")
    if summary:
        excluded = ", ".join(summary["bf16_excluded_auc_not_shown_to_hold"])
        lines += [
            f"Helped (>= {summary['threshold']:.2f}x): {', '.join(summary['helped']) or 'none'}. "
            f"Did not: {', '.join(summary['did_not_help']) or 'none'}."
            + (f" Not counted (bf16 AUC not shown to hold): {excluded}." if excluded else ""),
            "",
        ]
    auc = res.get("bf16_auc")
    if auc and "error" not in auc:
        aucs = ", ".join(
            f"{t}: fp32 {auc['auc']['fp32'][t]:.4f} / bf16 {auc['auc']['bf16'][t]:.4f}"
            for t in auc["auc"]["fp32"]
            if auc["auc"]["fp32"][t] is not None and auc["auc"]["bf16"][t] is not None
        )
        lines += [
            f"bf16 AUC check ({auc['train_steps']} steps, {auc['valid_rows']:,} validation rows): {aucs}; "
            f"holds (|delta| <= {auc['tolerance']}): **{_holds(auc)}**.",
            "",
        ]
    return lines


def _holds(auc: Mapping[str, Any]) -> str:
    if auc.get("holds") is None:
        return f"inconclusive (fp32 AUC below {auc.get('min_learned_auc')}: too few steps)"
    return "yes" if auc["holds"] else "no"


def _loader(res: Mapping[str, Any]) -> list[str]:
    sec = res.get("loader")
    lines = ["## Loader", ""]
    if sec is None or "error" in sec:
        return lines + _error(sec)
    vb, tb = sec.get("vs_bare"), sec.get("training")
    rows = []
    if vb and "error" not in vb:
        rows += [
            [f"loader, all {vb['columns']} columns, {vb['num_workers']} workers", fmt(vb["loader"])],
            ["bare pyarrow read, same columns", fmt(vb["bare_read"])],
            ["loader / bare read", fmt(vb["fraction"], 2)],
        ]
    if tb and "error" not in tb:
        rows += [
            [f"loader, training columns, {tb['num_workers']} workers", fmt(tb["loader_alone"])],
            ["training step alone (a few in-memory batches, cycled)", fmt(tb["step_alone"])],
        ]
        if "prebuilt_epoch" in tb:
            rows.append(["training epoch on the same batches built beforehand (in memory)",
                         fmt(tb["prebuilt_epoch"])])
        for n, st in tb.get("end_to_end_by_workers", {"": tb["end_to_end"]}).items():
            rows.append([f"training fed by the loader, {n} workers (end to end)", fmt(st)])
    lines += _table(["measurement", "samples/s"], rows)
    if tb and "error" not in tb:
        lines += [
            f"Training fed by the loader ({tb['num_workers']} workers) reaches "
            f"{fmt(tb['end_to_end_fraction_of_step'], 2)} of the same epoch on pre-built batches. "
            f"Bottleneck of a training run: **{tb['bottleneck']}**.",
            "",
        ]
    return lines


def _new_task(res: Mapping[str, Any]) -> list[str]:
    sec = res.get("new_task")
    lines = ["## New task cost (T3 = field 301, paper dims)", ""]
    if sec is None or "error" in sec:
        return lines + _error(sec)
    names = {
        "prompt_tune_cached": ("prompt tuning (ours, the job's default: cached backbone features + the "
                               f"shipped task config's head, {sec.get('head_method', '?')})"),
        "prompt_tune_cached_paper_head": "prompt tuning (ours, cached, the paper's head: mptrec, lr 1e-4)",
        "prompt_tune_cached_per_table_offsets": ("prompt tuning (ours, cached, the shipped head with one "
                                                 "lookup per offset table: diagnostic, the path until "
                                                 "2026-12-03)"),
        "prompt_tune": ("prompt tuning (ours, cache off: frozen no-grad backbone + the shipped head "
                        "each epoch)"),
        "full_retrain": "full retraining with the new task (ours, 3 tasks)",
        "paper_prompt": "prompt tuning the paper's way (backbone out of the optimizer only)",
    }
    rows = []
    for key, v in sec["variants"].items():
        flops = v["forward_flops_per_sample"]
        train = v["train_step_flops_per_sample"]
        rows.append(
            [
                names.get(key, key),
                fmt(v["epoch_s"], 2),
                fmt(v["samples_per_s"]),
                f"{v['backbone_grad_mib']:.1f}",
                f"{v['optimizer_state_mib']:.1f}",
                _mem(v),
                f"{v['trainable_parameters']:,}",
                "n/a" if flops is None else f"{flops:,.0f}",
                "n/a" if train is None else f"{train:,.0f}",
            ]
        )
    lines += _table(
        [
            "method",
            "s/epoch",
            "samples/s",
            "backbone grads MiB",
            "optimizer state MiB",
            "peak RSS MiB (growth in training)",
            "trainable params",
            "fwd FLOPs/sample",
            "train-step FLOPs/sample",
        ],
        rows,
    )
    fill = sec["variants"].get("prompt_tune_cached", {}).get("cache_fill_s")
    if fill is not None and "time_fraction_of_full_uncached" in sec:
        cached = (
            "With the feature cache (the job's default) prompt tuning takes "
            f"{fmt(sec['time_fraction_of_full'], 3)} of full retraining's time per epoch, the one-time "
            f"cache fill ({fmt(fill, 2)} s) amortised over the job's default {sec.get('job_epochs')} epochs "
            f"({fmt(sec['time_fraction_of_full_cached_epoch'], 3)} without the fill); with the cache off "
            f"{fmt(sec['time_fraction_of_full_uncached'], 3)}"
        )
        if "per_table_offsets_vs_fused" in sec:
            cached += (f"; one lookup per offset table instead of the stacked lookup takes "
                       f"{fmt(sec['per_table_offsets_vs_fused'], 2)}x the cached epoch")
        if "time_fraction_of_full_paper_head" in sec:
            cached += (f"; with the paper's head instead of the shipped one, cached: "
                       f"{fmt(sec['time_fraction_of_full_paper_head'], 3)}")
    else:
        frac = fmt(sec["time_fraction_of_full"], 3)
        cached = f"Prompt tuning takes {frac} of full retraining's time per epoch"
    gather = sec["variants"].get("prompt_tune_cached", {}).get("gather_ms_per_batch")
    gathered = ""
    if gather is not None:
        gathered = (f" Gathering a shuffled batch from the cache: {fmt(gather['index_select'], 2)} ms with "
                    f"`index_select` (the job's), {fmt(gather['indexing'], 2)} ms indexing with the index "
                    "tensor (before 2026-12-03).")
    return lines + [
        f"{sec['rows_per_epoch']:,} rows per epoch. {cached}; the paper's way "
        f"is {fmt(sec['paper_prompt_vs_ours'], 2)}x slower than ours. FLOPs: one multiply-add = one flop, "
        f"matrix products only; fwd = the trained part's forward (the paper's %FLOPs measure).{gathered}",
        "",
    ]


def _mem(v: Mapping[str, Any]) -> str:
    m = v.get("memory")
    return "n/a" if not m else f"{m['peak_rss_mib']:,.0f} (+{m['growth_mib']:,.0f})"


def _eval(res: Mapping[str, Any]) -> list[str]:
    sec = res.get("eval")
    lines = ["## Evaluation (scoring + exact AUC)", ""]
    if sec is None or "error" in sec:
        return lines + _error(sec)
    lines += _table(
        ["part", "rows/s"],
        [
            ["scoring", fmt(sec["scoring"])],
            ["exact metrics (AUC, logloss)", fmt(sec["exact_metrics"])],
            ["total", fmt(sec["total"])],
        ],
    )
    return lines


def _growth(res: Mapping[str, Any]) -> list[str]:
    sec = res.get("growth")
    lines = ["## How cost grows (rows, table size)", ""]
    if sec is None or "error" in sec:
        return lines + _error(sec)
    rows = [
        [
            f"{p['rows']:,}",
            f"x{p['vocab_scale']} ({p['table_rows']:,} rows, {p['table_mib']:,.0f} MiB)",
            f"{p['samples_per_s']:,.0f}",
            f"{p['epoch_s_estimate']:,.0f}",
            f"{p['rss_after_build_mib']:,.0f}",
            f"{p['peak_rss_mib']:,.0f}",
        ]
        for p in sec["points"]
    ]
    lines += _table(
        ["rows", "tables (vocabulary scale)", "samples/s", "epoch s (est.)", "RSS after build MiB",
         "peak RSS MiB"],
        rows,
    )
    lines += [
        f"Stage 1 at the paper's dims fed by the loader from the shards, {sec['steps_per_point']} timed "
        f"steps of {sec['batch_size']:,} per point, each point in a fresh process; the epoch time is "
        "extrapolated from the measured samples/s.",
        "",
    ]
    if sec.get("plot"):
        lines += [f"![growth]({sec['plot']})", ""]
    return lines


def _serving(res: Mapping[str, Any]) -> list[str]:
    from mptrec.bench.serving import markdown

    sec = res.get("serving")
    lines = ["## Serving (export + predict)", ""]
    if sec is None or "error" in sec:
        return lines + _error(sec)
    if "skipped" in sec:
        return lines + [f"(skipped: {sec['skipped']})", ""]
    return lines + [markdown(dict(sec)).rstrip(), ""]


def _targets(res: Mapping[str, Any]) -> list[str]:
    t = res.get("targets", {})
    rows = [
        [
            k,
            "n/a" if v["value"] is None else f"{v['value']:.3g}",
            v["target"],
            {True: "met", False: "**not met**", None: "n/a"}[v["met"]],
        ]
        for k, v in t.items()
    ]
    return ["## Headline figures", ""] + _table(["key", "median", "target", ""], rows)


def render(res: Mapping[str, Any]) -> str:
    """The Markdown report."""
    m, th = res.get("machine", {}), res.get("threads", {})
    vers = ", ".join(f"{k} {v}" for k, v in res.get("versions", {}).items())
    lines = [
        "# mptrec benchmarks" + (" (--quick)" if res.get("quick") else ""),
        "",
        f"{m.get('cpu_model', '?')}, {m.get('cores', '?')} cores ({', '.join(m.get('cpu_flags', []))}); "
        f"torch threads {th.get('torch_num_threads', '?')}; {vers}.",
        f"Generated by `{res.get('command', 'mptrec bench')}` on {res.get('created', '?')}; each figure is "
        f"median (min-max) over {res.get('settings', {}).get('repeats')} repeats. Data: synthetic Ali-CCP "
        "shards at the real vocabulary sizes (`mptrec data synth --dataset aliccp`).",
        "",
    ]
    for w in res.get("warnings", []):
        lines += [f"**Warning:** {w}.", ""]
    for part in (_targets, _stage1, _scaling, _profile, _allocator, _dense, _loader, _new_task, _eval,
                 _growth, _serving):
        lines += part(res)
    return "\n".join(lines).rstrip() + "\n"
