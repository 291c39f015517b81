"""Generate gen/ (Python, gRPC and .pyi stubs) and envoy/televote.pb from protos/.

`python -m ops.codegen [--check] [--lint]`, or `televote generate [--check]`;
`python -m ops.codegen --third-party-protos` only lays out build/third_party_protos (what
scripts/install does, so `buf lint` works before anything was generated).

Everything is rendered into a scratch directory first and then compared with (or copied over)
the committed tree, so `--check` and a real run share one code path and a failed protoc run
never leaves gen/ half-written.
"""

from __future__ import annotations

import argparse
import filecmp
import importlib.resources
import importlib.util
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
GEN = ROOT / "gen"
DESCRIPTOR_SET = ROOT / "envoy" / "televote.pb"
# Filled from installed packages on every run and git-ignored: the google protos are the
# packages' business, and a copy in the repo would drift from the _pb2 modules we import.
THIRD_PARTY = ROOT / "build" / "third_party_protos"

# (package that ships it, path inside the package, path as imported by .proto files)
THIRD_PARTY_PROTOS = [
    ("google.api", "annotations.proto", "google/api/annotations.proto"),
    ("google.api", "http.proto", "google/api/http.proto"),
    ("google.api", "field_behavior.proto", "google/api/field_behavior.proto"),
    ("google.rpc", "code.proto", "google/rpc/code.proto"),
    ("google.rpc", "status.proto", "google/rpc/status.proto"),
    ("google.rpc", "error_details.proto", "google/rpc/error_details.proto"),
]

# Not imported by our protos, but Envoy needs them in its descriptor set: with
# convert_grpc_status it renders grpc-status-details-bin (ErrorInfo, BadRequest, RetryInfo in
# Any) as JSON and must resolve those types.
DESCRIPTOR_EXTRAS = ["google/rpc/status.proto", "google/rpc/error_details.proto"]


def _tool(name: str) -> str:
    """A venv console script, found even when the venv is not activated (e.g. in CI)."""
    beside_python = Path(sys.executable).parent / name
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which(name)
    if found is None:
        raise SystemExit(f"{name} not found: install the dev extras (pip install -e '.[dev]')")
    return found


def copy_third_party_protos() -> None:
    """Refresh build/third_party_protos from the installed googleapis-common-protos."""
    shutil.rmtree(THIRD_PARTY, ignore_errors=True)
    for package, name, target in THIRD_PARTY_PROTOS:
        destination = THIRD_PARTY / target
        destination.parent.mkdir(parents=True, exist_ok=True)
        destination.write_bytes(importlib.resources.files(package).joinpath(name).read_bytes())


def _sources() -> list[str]:
    # Sorted import names, so protoc sees the same order on every machine.
    return sorted(path.relative_to(PROTOS).as_posix() for path in PROTOS.rglob("*.proto"))


def _protoc(*args: str) -> None:
    # grpcio-tools bundles google/protobuf/*.proto; found without importing (it has no stubs).
    spec = importlib.util.find_spec("grpc_tools")
    if spec is None or spec.origin is None:
        raise SystemExit("grpcio-tools is not installed: pip install -e '.[dev]'")
    well_known = Path(spec.origin).parent / "_proto"
    command = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"--proto_path={PROTOS}",
        f"--proto_path={THIRD_PARTY}",
        f"--proto_path={well_known}",
        *args,
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"protoc failed:\n{result.stderr}")


def render(out: Path) -> None:
    """Write the generated tree to out/gen and the descriptor set to out/televote.pb."""
    gen = out / "gen"
    gen.mkdir(parents=True)
    sources = _sources()
    _protoc(
        f"--plugin=protoc-gen-mypy={_tool('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_tool('protoc-gen-mypy_grpc')}",
        f"--python_out={gen}",
        f"--grpc_python_out={gen}",
        f"--mypy_out={gen}",
        f"--mypy_grpc_out={gen}",
        *sources,
    )
    # protoc writes modules but no packages; empty __init__.py files make gen/ an ordinary
    # import root that the packaging and mypy both understand.
    for directory in sorted({p.parent for p in gen.rglob("*.py")}):
        while directory != gen:
            (directory / "__init__.py").touch()
            directory = directory.parent
    _protoc(
        "--include_imports",
        "--include_source_info",
        f"--descriptor_set_out={out / 'televote.pb'}",
        *sources,
        *DESCRIPTOR_EXTRAS,
    )


def files(root: Path) -> set[str]:
    """Every file below `root`, relative to it."""
    # __pycache__ appears whenever gen/ is imported; it is never part of the output.
    return {
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


def stale_tree(fresh_root: Path, committed_root: Path) -> list[str]:
    """Committed files (relative to the repository) that differ from a fresh render, are
    missing from it, or are extra."""
    fresh = files(fresh_root)
    committed = files(committed_root) if committed_root.exists() else set()
    return [
        (committed_root / name).relative_to(ROOT).as_posix()
        for name in sorted(fresh | committed)
        if name not in fresh
        or name not in committed
        or not filecmp.cmp(fresh_root / name, committed_root / name, shallow=False)
    ]


def report_stale(stale: list[str], what: str, fix: str) -> int:
    """The exit code of a freshness check (`--check`), saying what is stale and how to fix it."""
    if stale:
        print(f"stale {what} (run `{fix}`):", file=sys.stderr)
        for name in stale:
            print(f"  {name}", file=sys.stderr)
        return 1
    print(f"{what} are up to date")
    return 0


def stale_files(out: Path) -> list[str]:
    """Committed paths that differ from a fresh render in `out`, are missing, or are extra."""
    stale = stale_tree(out / "gen", GEN)
    if not DESCRIPTOR_SET.exists() or not filecmp.cmp(
        out / "televote.pb", DESCRIPTOR_SET, shallow=False
    ):
        stale.append(DESCRIPTOR_SET.relative_to(ROOT).as_posix())
    return stale


def _install(out: Path) -> None:
    # Replace gen/ wholesale so files of deleted protos disappear too.
    shutil.rmtree(GEN, ignore_errors=True)
    shutil.copytree(out / "gen", GEN)
    DESCRIPTOR_SET.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(out / "televote.pb", DESCRIPTOR_SET)


def lint() -> int:
    """Run buf lint and buf format on the contracts; non-zero when either complains."""
    buf = _tool("buf")
    status = 0
    for command in ([buf, "lint"], [buf, "format", "--diff", "--exit-code"]):
        status |= subprocess.run(command, cwd=ROOT, check=False).returncode
    return 1 if status else 0


def generate(check: bool = False, lint_protos: bool = False) -> int:
    """Regenerate gen/ and the descriptor set, or with `check` only report what is stale."""
    copy_third_party_protos()
    if lint_protos and lint() != 0:
        print("buf lint / buf format failed", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="televote-codegen-") as scratch:
        out = Path(scratch)
        render(out)
        stale = stale_files(out)
        if check:
            return report_stale(stale, "generated files", "televote generate")
        if stale:
            _install(out)
        print(f"generated {len(files(GEN))} files in gen/ and {DESCRIPTOR_SET.name}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m ops.codegen", description=__doc__)
    parser.add_argument(
        "--check", action="store_true", help="exit 1 listing stale files instead of writing them"
    )
    parser.add_argument(
        "--lint",
        action="store_true",
        help="also run `buf lint` and `buf format --diff --exit-code`",
    )
    parser.add_argument(
        "--third-party-protos",
        action="store_true",
        help=f"only copy the google protos into {THIRD_PARTY.relative_to(ROOT)} (for buf)",
    )
    args = parser.parse_args(argv)
    if args.third_party_protos:
        copy_third_party_protos()
        return 0
    return generate(check=args.check, lint_protos=args.lint)


if __name__ == "__main__":
    sys.exit(main())
