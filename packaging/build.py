"""Build the one-file binary (dist/stox): PyInstaller, with the commit it was built from.

The commit reaches the binary through a runtime hook that registers the module
`stox._build` (see stox/version.py) before anything imports stox, so the source tree is not
written to.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import PyInstaller.__main__

ROOT = Path(__file__).resolve().parent.parent


def build_info_hook(commit: str, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    hook = folder / "stox_build_info.py"
    hook.write_text(
        "import sys\nimport types\n\n"
        'build = types.ModuleType("stox._build")\n'
        f"build.COMMIT = {commit!r}\n"
        'sys.modules["stox._build"] = build\n'
    )
    return hook


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--distpath", type=Path, default=ROOT / "dist")
    parser.add_argument("--workpath", type=Path, default=ROOT / "build" / "pyinstaller")
    args = parser.parse_args(argv)
    commit = subprocess.run(
        ["git", "rev-parse", "--short=12", "HEAD"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    os.environ["STOX_BUILD_HOOK"] = str(build_info_hook(commit, args.workpath))
    PyInstaller.__main__.run(
        [
            str(ROOT / "packaging" / "stox.spec"),
            "--noconfirm",
            "--log-level=WARN",
            f"--distpath={args.distpath}",
            f"--workpath={args.workpath}",
        ]
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
