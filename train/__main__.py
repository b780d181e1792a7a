"""`python -m train config=configs/X.yaml key.sub=value ...` (also under torchrun)."""
import sys

from .checkpoint import CheckpointError
from .config import ConfigError, parse_cli
from .loop import run
from .nonfinite import NonFiniteError


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = parse_cli(argv)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    try:
        run(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except (CheckpointError, NonFiniteError) as e:  # bad checkpoints or a diverged run: what, where, what is kept
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
