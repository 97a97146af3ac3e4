"""python -m runtime.generate: text-to-image from built engines to a PNG."""
from __future__ import annotations

import argparse
import sys

EPILOG = """examples:
  python -m runtime.generate --engines artifacts/tiny-fp8 --prompt "a red bicycle" --out bike.png
  python -m runtime.generate --engines artifacts/full-fp8 --prompt "a cute girl" --seed 11 --cfg-text 3 --out girl.png
"""


def main(argv=None) -> int:
    from .cli_common import add_engine_args, open_runtime, setup_logging

    p = argparse.ArgumentParser("python -m runtime.generate", description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(p)
    g = p.add_argument_group("generation")
    g.add_argument("--prompt", required=True)
    g.add_argument("--out", required=True, help="PNG path")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--cfg-text", type=float, default=None, help="text guidance (default 3.0, upstream's)")
    g.add_argument("--cfg-image", type=float, default=None, help="image guidance when editing (default 1.1)")
    g.add_argument("--temperature", type=float, default=1.0)
    a = p.parse_args(argv)
    setup_logging(a.verbose)
    from tqdm import tqdm

    from .errors import MingRuntimeError

    try:
        rt = open_runtime(a)
        with tqdm(total=rt.cfg.num_image_tokens, desc="image tokens", unit="tok") as bar:
            out = rt.generate_image(a.prompt, seed=a.seed, cfg_text=a.cfg_text, cfg_image=a.cfg_image,
                                    temperature=a.temperature, on_token=lambda done, total: bar.update(1))
    except (MingRuntimeError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out.image.save(a.out)
    print(f"wrote {a.out} ({out.image.width}x{out.image.height})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
