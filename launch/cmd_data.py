r"""``mptrec data``: convert sources to Parquet shards (``convert``) or generate them (``synth``).

Examples::

    mptrec data convert --format census --input ../shared/data/census/census-income.test.dev.data.gz \\
        --split-input train=../shared/data/census/census-income.data.subset.gz --out runs/data/census
    mptrec data convert --format aliccp-raw --input raw/sample_skeleton_train.csv \\
        --split train=0.9,valid=0.1 --split-input test=raw/sample_skeleton_test.csv --shards 64 --out DIR
    mptrec data synth --dataset aliccp --rows 1000000 --shards 8 --seed 1 --out /tmp/synth1m
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

FORMATS = ("aliccp-raw", "aliccp-csv", "aliccp-paddle", "census")
# = mptrec.data_loaders.layout.DEFAULT_ROW_GROUP_SIZE (not imported: pyarrow stays out of CLI start-up)
ROW_GROUP_SIZE = 16_384
# option -> formats it applies to (given for another format, it is an error)
_FORMAT_OPTIONS = {
    "min_count": ("aliccp-raw", "aliccp-paddle"),
    "multi_fields": ("aliccp-raw", "aliccp-paddle"),
    "common": ("aliccp-raw",),
    "max_bad_lines": ("aliccp-raw",),
    "drop_purchase_without_click": ("aliccp-raw", "aliccp-csv", "aliccp-paddle"),
    "drop_instance_weight": ("census",),
}


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output shard folder (schema.json + <split>/part-*.parquet)")
    p.add_argument("--shards", type=int, default=1, help="Parquet files per split (default 1)")
    p.add_argument(
        "--split",
        default="train=0.8,valid=0.1,test=0.1",
        help="split fractions, deterministic for --seed (default train=0.8,valid=0.1,test=0.1)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed (split permutation; synth: everything)")
    p.add_argument(
        "--row-group-size",
        type=int,
        default=ROW_GROUP_SIZE,
        help=f"rows per Parquet row group (default {ROW_GROUP_SIZE:,}); row groups are what ranks and "
        "DataLoader workers share and what a shuffled epoch permutes, so keep several per split",
    )
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --out")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``mptrec data``."""
    sub = parser.add_subparsers(dest="data_command", metavar="{convert,synth}")
    sub.required = True
    _convert_arguments(
        sub.add_parser(
            "convert",
            help="convert Ali-CCP or Census-Income files to shards",
            description="Convert source files to Parquet shards and schema.json.",
        )
    )
    syn = sub.add_parser(
        "synth",
        help="generate synthetic shards from a planted model",
        description="Generate synthetic shards (same schema as converted data) with known "
        "Bayes-optimal AUCs.",
    )
    syn.add_argument("--dataset", required=True, choices=("aliccp",))
    syn.add_argument("--rows", type=int, required=True)
    syn.add_argument("--click-rate", type=float, default=0.04, help="mean click rate (default 0.04)")
    syn.add_argument(
        "--purchase-rate", type=float, default=0.005, help="mean purchase rate among clicks (default 0.005)"
    )
    syn.add_argument(
        "--scenario2-rate",
        type=float,
        default=0.3,
        help="fraction of rows with 301 == 2, i.e. T3 label 0 (default 0.3)",
    )
    _common(syn)


def _convert_arguments(conv: argparse.ArgumentParser) -> None:
    conv.add_argument("--format", required=True, choices=FORMATS)
    conv.add_argument(
        "--input",
        nargs="*",
        default=[],
        metavar="PATH",
        help="files pooled and split by --split (aliccp-raw: sample_skeleton_*.csv)",
    )
    conv.add_argument(
        "--split-input",
        action="append",
        default=[],
        metavar="SPLIT=PATH",
        help="a file whose rows all go to SPLIT (repeatable), e.g. train=census-income.data.subset.gz",
    )
    conv.add_argument(
        "--common",
        nargs="+",
        default=None,
        metavar="PATH",
        help="aliccp-raw: common_features files, one per skeleton (--input then --split-input); "
        "default: sample_skeleton_X -> common_features_X",
    )
    conv.add_argument(
        "--min-count",
        type=int,
        default=None,
        help="ids seen fewer times in train map to 0 (aliccp-raw default 12 = AITM's 'count > 10'; "
        "aliccp-paddle default 1)",
    )
    conv.add_argument(
        "--multi-fields",
        default=None,
        help="comma-separated list fields (default 210,109_14,110_14,127_14,150_14)",
    )
    conv.add_argument(
        "--drop-purchase-without-click",
        action="store_true",
        default=None,
        help="drop rows with click 0 and purchase 1 (AITM's preprocessing)",
    )
    conv.add_argument(
        "--drop-instance-weight",
        action="store_true",
        default=None,
        help="census: drop the instance_weight dense input (D_in 126 instead of 127)",
    )
    conv.add_argument(
        "--max-bad-lines",
        type=int,
        default=None,
        help="aliccp-raw: malformed lines skipped (and counted) before failing (default 0)",
    )
    _common(conv)


def _assigned(items: list[str]) -> list[tuple[str, str]]:
    from mptrec.data_loaders.schema import DataError

    out = []
    for item in items:
        split, sep, path = item.partition("=")
        if not sep or not split or not path:
            raise DataError(f"--split-input: expected SPLIT=PATH, got {item!r}")
        out.append((split, path))
    return out


def _convert(args: argparse.Namespace) -> dict[str, Any]:
    from mptrec.data_loaders.aliccp import convert_aliccp_csv, convert_aliccp_paddle
    from mptrec.data_loaders.aliccp_raw import convert_aliccp_raw
    from mptrec.data_loaders.census import convert_census
    from mptrec.data_loaders.layout import parse_split_spec
    from mptrec.data_loaders.schema import ALICCP_MULTI_FIELDS, DataError

    for opt, formats in _FORMAT_OPTIONS.items():
        if getattr(args, opt) is not None and args.format not in formats:
            raise DataError(f"--{opt.replace('_', '-')} does not apply to --format {args.format}")
    assigned = _assigned(args.split_input)
    if not args.input and not assigned:
        raise DataError("give --input and/or --split-input files")
    common: dict[str, Any] = dict(
        split=parse_split_spec(args.split),
        seed=args.seed,
        shards=args.shards,
        assigned=assigned,
        row_group_size=args.row_group_size,
        overwrite=args.overwrite,
    )
    multi = tuple(args.multi_fields.split(",")) if args.multi_fields else ALICCP_MULTI_FIELDS
    drop = bool(args.drop_purchase_without_click)
    if args.format == "census":
        return convert_census(
            args.input, args.out, keep_instance_weight=not args.drop_instance_weight, **common
        )
    if args.format == "aliccp-csv":
        return convert_aliccp_csv(args.input, args.out, drop_purchase_without_click=drop, **common)
    if args.format == "aliccp-paddle":
        return convert_aliccp_paddle(
            args.input,
            args.out,
            min_count=args.min_count or 1,
            multi_fields=multi,
            drop_purchase_without_click=drop,
            **common,
        )
    return convert_aliccp_raw(
        args.input,
        args.out,
        commons=args.common,
        min_count=12 if args.min_count is None else args.min_count,
        multi_fields=multi,
        drop_purchase_without_click=drop,
        max_bad_lines=args.max_bad_lines or 0,
        **common,
    )


def run(args: argparse.Namespace) -> int:
    """Run ``mptrec data``."""
    from mptrec.data_loaders.layout import parse_split_spec
    from mptrec.data_loaders.schema import DataError

    try:
        if args.shards <= 0 or args.row_group_size <= 0:
            raise DataError(
                f"--shards and --row-group-size must be positive, got {args.shards}, {args.row_group_size}"
            )
        if args.data_command == "convert":
            schema = _convert(args)
        else:
            from mptrec.data_loaders.synth import generate_aliccp

            schema = generate_aliccp(
                args.out,
                rows=args.rows,
                shards=args.shards,
                seed=args.seed,
                split=parse_split_spec(args.split),
                click_rate=args.click_rate,
                purchase_rate=args.purchase_rate,
                scenario2_rate=args.scenario2_rate,
                row_group_size=args.row_group_size,
                overwrite=args.overwrite,
            )
    except DataError as e:
        print(f"mptrec data: error: {e}", file=sys.stderr)
        return 2
    rows = {s: sum(v["rows"]) for s, v in schema["splits"].items()}
    extra = f", bayes_auc {schema['bayes_auc']}" if "bayes_auc" in schema else ""
    print(f"mptrec data: wrote {args.out}/schema.json: {schema['dataset']}, rows {rows}{extra}")
    return 0
