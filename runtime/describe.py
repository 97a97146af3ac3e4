"""python -m runtime.describe: answer a question about an image (greedy decoding)."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    from .cli_common import add_engine_args, open_runtime, setup_logging

    p = argparse.ArgumentParser("python -m runtime.describe", description=__doc__,
                                epilog="example:\n  python -m runtime.describe --engines artifacts/tiny-fp8 --image cat.png "
                                       "--question 'What is in the picture?'",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(p)
    p.add_argument("--image", required=True)
    p.add_argument("--question", default="Please describe the picture in detail.")
    p.add_argument("--max-new-tokens", type=int, default=128)
    a = p.parse_args(argv)
    setup_logging(a.verbose)
    from .errors import MingRuntimeError

    try:
        print(open_runtime(a).describe(a.image, a.question, max_new_tokens=a.max_new_tokens))
    except (MingRuntimeError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
