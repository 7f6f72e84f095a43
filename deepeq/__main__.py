"""Command line: ``python -m deepeq demo`` (training commands arrive with the training system)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deepeq", description="Deep Equilibrium Models.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="solve small DEQ layers with every solver; print stats")
    p_demo.add_argument("--smoke", action="store_true", help="tiny batch, for tests")
    sub.add_parser("version", help="print the version")
    args = parser.parse_args(argv)
    if args.command == "version":
        from . import __version__

        print(__version__)
        return 0
    import torch

    from ._demo import demo

    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(
        f"deepeq demo: solve z = f(z, x) for seeded random DEQ layers (torch {torch.__version__}, CPU)"
    )
    print(
        "stopping rule per sample: ||f(z)-z|| <= atol + rtol*||f(z)||, defaults atol=0, rtol=1e-3\n"
    )
    print(demo(smoke=args.smoke))
    return 0


if __name__ == "__main__":
    sys.exit(main())
