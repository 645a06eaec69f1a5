"""``padnet export RUN_DIR``: write the deployment form of a trained run and show what it gains.

Rebuilds the run's model (its final weights, or the latest checkpoint with ``--checkpoint``),
folds it with :func:`padnet.export`, checks that the deployed model computes what the trained one
computes (eval mode, on a batch of random inputs), writes it with :func:`padnet.save` (default
``RUN_DIR/deployed.safetensors``; ``padnet.load`` reads it back with nothing else for registry
and Hugging Face models) and, with ``--onnx FILE``, an ONNX graph with a dynamic batch size.
Prints the stored bytes of the training form and of the deployed file, and the latency of the
trained and the deployed model beside the static model at batch 1 and 32 (medians of interleaved
repetitions).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from padnet.cli.options import add_config_arguments, batch_sizes, config_overrides


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write the deployment form of a trained run",
                       description=__doc__, allow_abbrev=False,
                       usage="%(prog)s RUN_DIR [--out FILE] [--onnx FILE] [--checkpoint] "
                             "[--batch-sizes B,...] [--reps N] [--KEY VALUE ...]")
    p.add_argument("run_dir", type=Path, help="a run directory written by `padnet train`")
    p.add_argument("--out", type=Path, default=None,
                   help="deployment file (default RUN_DIR/deployed.safetensors)")
    p.add_argument("--onnx", type=Path, default=None, help="also write an ONNX graph here")
    p.add_argument("--checkpoint", action="store_true", help="use the latest checkpoint")
    p.add_argument("--batch-sizes", default="1,32", help="latency batch sizes (default 1,32)")
    p.add_argument("--reps", type=int, default=20, help="timed repetitions per model")
    add_config_arguments(p, title="config keys (override the run's config.yaml)")
    p.set_defaults(run=run)


def _check_same(trained, deployed, x) -> float:  # noqa: ANN001
    """Largest difference relative to the largest output, on inputs ``x``."""
    import torch

    from padnet.train.build import model_logits

    with torch.no_grad():
        ref = model_logits(trained.eval(), x).float()
        got = model_logits(deployed, x).float()
    rel = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
    if rel > 1e-4:
        raise RuntimeError(f"the deployed model differs from the trained one (relative "
                           f"difference {rel:.2e}); please report this")
    return rel


def run(args: argparse.Namespace) -> int:
    import padnet
    from padnet.bench import measure_latency
    from padnet.train.build import build_model, load_run, random_inputs
    from padnet.utils.checks import check_int

    sizes = batch_sizes(args.batch_sizes)
    check_int(args.reps, "--reps", 1)
    loaded = load_run(args.run_dir, overrides=config_overrides(args), checkpoint=args.checkpoint,
                      with_data=False)
    cfg, info, trained = loaded.cfg, loaded.info, loaded.model
    if cfg.method == "none":
        raise ValueError(f"{args.run_dir} trained a static model (method 'none'): there is "
                         "nothing to export")
    deployed = padnet.export(trained)
    rel = _check_same(trained, deployed, random_inputs(cfg, trained, info, 4))
    out = args.out if args.out is not None else args.run_dir / "deployed.safetensors"
    written = padnet.save(deployed, out)
    before = loaded.weights.stat().st_size
    print(f"{loaded.weights}: {before:,} bytes (training form)")
    print(f"{out}: {written:,} bytes (deployed, {written / before:.2f}x); max relative "
          f"difference to the trained model {rel:.1e}")
    if args.onnx is not None:
        from padnet.deploy.graph import export_onnx

        export_onnx(trained, random_inputs(cfg, trained, info, 2), args.onnx)
        print(f"{args.onnx}: ONNX graph with a dynamic batch size")
    static = build_model(cfg.replace(method="none", imp_mode="none"),
                         num_classes=info["num_classes"], in_chans=info.get("in_chans"),
                         pretrained=False)
    models = {"static": static, "trained": trained, "deployed": deployed}
    head = f"{'batch':>5}  {'static ms':>9}  {'trained':>9}  {'deployed':>9}"
    print(f"\nlatency, median of {args.reps} interleaved repetitions (ratio to static):")
    print(head + "\n" + "-" * len(head))
    for batch in sizes:
        ms = measure_latency(models, random_inputs(cfg, static, info, batch), reps=args.reps)
        print(f"{batch:>5}  {ms['static']:>9.3f}  {ms['trained'] / ms['static']:>8.2f}x  "
              f"{ms['deployed'] / ms['static']:>8.2f}x")
    return 0
