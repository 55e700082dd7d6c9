"""lm-evaluation-harness's own command line with the `caracal` model registered.

lm-eval's CLI finds models only in its built-in mapping, so `lm_eval --model caracal` needs this entry point:

    python -m caracal_cli.lm_eval_entry --model caracal --model_args checkpoint=runs/demo --tasks hellaswag \
        --device cpu --batch_size 16
    caracal lm-eval --model caracal --model_args checkpoint=runs/demo --tasks hellaswag --batch_size 16

Everything after the command goes to lm-eval unchanged (`ls tasks`, `--include_path`, `--output_path`, …).
Like `caracal eval`, it runs offline unless HF_HUB_OFFLINE=0 and HF_DATASETS_OFFLINE=0 are set; a dataset missing
from the local cache is reported in one line. Give the device and batch size as lm-eval's own flags (`--device`,
`--batch_size`), not inside --model_args: lm-eval always passes those two to the model itself (defaults cuda:0,
which falls back to the CPU on a machine without CUDA, and 1).
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Run lm-eval's CLI on `argv` (default: this process's arguments); returns its exit status."""
    from caracal_cli.evaluate import missing_dataset_message, use_offline_hub

    use_offline_hub(online=False)  # before lm-eval imports `datasets`; the user's HF_*_OFFLINE settings win
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]  # lm-eval's parser reads sys.argv itself
    try:
        cli_evaluate()
    except SystemExit as exit_:
        if exit_.code is None or isinstance(exit_.code, int):
            return exit_.code or 0
        print(exit_.code, file=sys.stderr)
        return 1
    except Exception as err:
        message = missing_dataset_message(err)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 1
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
