"""`lmmlab` subcommands: thin wrappers over the library. User mistakes become one line on stderr and exit code 2."""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from lmmlab import data
from lmmlab.files import write_json

RESULTS = Path("results")


def format_metrics(title: str, metrics) -> str:
    rows = [("accuracy", f"{metrics.accuracy:.3f}")]
    rows += [(f"  {kind}", f"{acc:.3f}") for kind, acc in metrics.accuracy_by_kind.items()]
    rows += [
        ("answer loss", f"{metrics.loss:.3f}"),
        ("latency / sample", f"{metrics.latency_s * 1e3:.2f} ms"),
        ("KV cache / sample", f"{metrics.kv_bytes / 1024:.1f} KiB"),
        ("peak memory", f"{metrics.peak_mem_bytes / 2**20:.0f} MiB"),
        ("samples", str(metrics.n)),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join([title, "-" * (width + 12)] + [f"{k:<{width}}  {v:>10}" for k, v in rows])


def cmd_train_default(args) -> None:
    from lmmlab import models

    start = time.perf_counter()
    path = models.train_default(out=args.out)
    print(f"default model trained in {time.perf_counter() - start:.0f} s and saved to {path}")


def cmd_eval(args) -> None:
    from lmmlab.evaluate import evaluate
    from lmmlab.models import load_model

    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    samples = data.split(args.split, args.n)
    metrics = evaluate(loaded, samples, batch_size=args.batch_size, progress=True)
    print(format_metrics(f"{args.model} on {args.split} ({metrics.n} samples)", metrics))
    if args.json:
        write_json(args.json, metrics.to_dict())
        print(f"wrote {args.json}")


def cmd_demo(args) -> None:
    from lmmlab import models
    from lmmlab.evaluate import evaluate

    start = time.perf_counter()
    if not (models.default_model_path() / "config.json").exists():
        print(f"training the default model into {models.default_model_path()} (once; a few minutes)")
    loaded = models.load_model(models.DEFAULT_MODEL)
    print(f"default model: {sum(p.numel() for p in loaded.model.parameters()) / 1e6:.2f} M parameters, "
          f"{loaded.num_layers} decoder layers")
    for sample in data.split("test", 4):
        print(f"  {sample}")
    metrics = evaluate(loaded, data.split("test"), progress=True)
    print(format_metrics("dense default model on the test split", metrics))
    write_json(RESULTS / "tables" / "demo_dense.json", metrics.to_dict())
    print(f"demo finished in {time.perf_counter() - start:.0f} s")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmmlab", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="train or load the default model and evaluate it on the test split")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train-default", help="(re)build the embedded default model and save it to the cache")
    p.add_argument("--out", type=Path, default=None, help="folder to save to (default: the cache, $LMMLAB_CACHE)")
    p.set_defaults(func=cmd_train_default)

    p = sub.add_parser("eval", help="accuracy, loss, latency and memory of a model on a split")
    p.add_argument("--model", default="lmmlab-default", help="lmmlab-default, a saved folder or a hub id")
    p.add_argument("--split", default="test", choices=list(data.SPLITS))
    p.add_argument("--n", type=int, default=None, help="number of samples (default: the split's size)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: float16 on GPU, else float32)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--json", type=Path, default=None, help="also write the metrics to this JSON file")
    p.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"lmmlab {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
