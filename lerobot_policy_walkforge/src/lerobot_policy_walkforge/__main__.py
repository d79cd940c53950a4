"""`python -m lerobot_policy_walkforge BUNDLE FOLDER [--backend B] [--threads N] [--device D]`:
write a policy folder for LeRobot commands that take only `--policy.path` (lerobot-rollout)."""

from __future__ import annotations

import argparse
import sys

from .configuration_walkforge import WalkforgeConfig
from .modeling_walkforge import save_policy_folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lerobot_policy_walkforge", description=__doc__)
    parser.add_argument("bundle", help="the bundle folder (walkforge compile's output)")
    parser.add_argument("folder", help="the policy folder to write (config.json + processor files)")
    parser.add_argument("--backend", default=None,
                        help="walkforge.load backend (default: auto on cuda, else cpu)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default=None,
                        help="LeRobot's policy device (default: the best available)")
    args = parser.parse_args(argv)
    try:
        config = WalkforgeConfig(bundle=args.bundle, backend=args.backend, threads=args.threads,
                                 device=args.device)
        folder = save_policy_folder(config, args.folder)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {folder}: use --policy.path={folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
