"""`python -m train [config=configs/X.yaml] key.sub=value ...` (also under torchrun).

Trains the model of the preset (default configs/tiny.yaml) merged with the `key.sub=value` overrides; a
misspelt key, a value of the wrong type, a missing data or tokenizer file stops the run before any compute
with one `config error: <key>: ...` line (exit status 2). Running the same command again resumes from the
newest checkpoint in run_dir. Presets: configs/*.yaml. Every key, with its default (from the tiny preset):
"""
import os
import sys

from model.cli_config import describe_keys, wants_help

from .checkpoint import CheckpointError
from .config import ConfigError, TrainConfig, parse_cli
from .nonfinite import NonFiniteError


def usage() -> str:
    try:
        defaults = parse_cli([])
    except ConfigError:  # the preset is missing (an install without configs/): the dataclass defaults
        defaults = TrainConfig()
    return __doc__ + "\n".join(describe_keys(defaults)) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if wants_help(argv):
        print(usage())
        return 0
    from data import DataError

    from .inputs import check_inputs
    from .loop import run

    try:
        cfg = parse_cli(argv)
        warnings = check_inputs(cfg)
        if os.environ.get("RANK", "0") == "0":
            for warning in warnings:
                print(warning, file=sys.stderr)
        run(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except DataError as e:  # bad input met while training (data.strict, or a rank left without documents)
        print(f"data error: {e}", file=sys.stderr)
        return 2
    except (CheckpointError, NonFiniteError) as e:  # bad checkpoints or a diverged run: what, where, what is kept
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
