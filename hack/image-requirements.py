"""Print the requirements an image installs before its source, read from pyproject.toml only.

Used by operator/Dockerfile and trainer-image/Dockerfile, so that the dependency layer is keyed by
pyproject.toml (and this file): a change to the Python source does not reinstall the dependencies.

    python3 image-requirements.py [--pyproject pyproject.toml] EXTRA... > requirements.txt

Prints the project's dependencies, those of the given extras and the build backend's
requirements (the project itself is then installed with --no-deps --no-build-isolation), one
per line, without duplicates. Standard library only: it runs on the base image's Python.
"""

from __future__ import annotations

import argparse
import sys
import tomllib


def requirements(pyproject: dict, extras: list[str]) -> list[str]:
    project = pyproject["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [e for e in extras if e not in optional]
    if unknown:
        raise SystemExit(f"unknown extra(s) {unknown}; pyproject.toml defines {sorted(optional)}")
    out: list[str] = []
    for req in [
        *pyproject.get("build-system", {}).get("requires", []),
        *project.get("dependencies", []),
        *(r for e in extras for r in optional[e]),
    ]:
        if req not in out:
            out.append(req)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pyproject", default="pyproject.toml")
    ap.add_argument("extras", nargs="*")
    args = ap.parse_args(argv)
    with open(args.pyproject, "rb") as f:
        data = tomllib.load(f)
    sys.stdout.write("".join(f"{r}\n" for r in requirements(data, args.extras)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
