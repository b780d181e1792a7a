"""`python -m train.export checkpoint=runs/x[/checkpoints/step_N] out=DIR`: the model weights as one
model.safetensors with config.json (and the run's tokenizer.model), loadable on one device without DCP or
torch.distributed (`train.weights.load_exported`), and usable as `checkpoint.init_from=DIR`."""
from __future__ import annotations

import sys

USAGE = __doc__


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    args = {}
    for a in argv:
        key, sep, value = a.partition("=")
        if not sep or key not in ("checkpoint", "out", "tokenizer"):
            print(f"config error: {a}: expected checkpoint=PATH out=DIR [tokenizer=PATH]", file=sys.stderr)
            return 2
        args[key] = value
    for key in ("checkpoint", "out"):
        if not args.get(key):
            print(f"config error: {key}: required ({USAGE.strip().splitlines()[0]})", file=sys.stderr)
            return 2
    from .weights import export_checkpoint

    try:
        out = export_checkpoint(args["checkpoint"], args["out"], args.get("tokenizer"))
    except (OSError, ValueError) as e:
        print(f"config error: checkpoint: {e}", file=sys.stderr)
        return 2
    print(f"exported {args['checkpoint']} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
