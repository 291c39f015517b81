"""Build the web apps (web/): TypeScript clients from protos/ and the bundles the edge serves.

`televote web [--check]`. Like `televote generate`, everything is rendered into a scratch
directory first and then compared with (or copied over) the committed tree, so `--check` (CI's
freshness gate) and a real build share one code path. The committed web/dist/ is what the edge
serves, so running the platform needs Python only; Node and npm are needed only to rebuild.

Steps: `npm ci` when web/node_modules is missing; protoc-gen-es (run by buf over the same
modules as gen/) writes web/src/gen/; `tsc --noEmit` type-checks; esbuild bundles one script
per app; web/static/ (pages, styles) is copied beside the bundles.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ops.codegen import ROOT, _tool, copy_third_party_protos, files, report_stale, stale_tree

WEB = ROOT / "web"
SRC = WEB / "src"
GEN = SRC / "gen"
STATIC = WEB / "static"
DIST = WEB / "dist"
NODE_MODULES = WEB / "node_modules"
#: One bundle per app; the results board, the overlay and the countdown share board.ts.
ENTRY_POINTS = ("voter.ts", "board.ts", "control.ts")
#: Khmer glyphs for every screen (the broadcast graphics machine, a desktop without Khmer
#: fonts): Noto Sans Khmer's Khmer subset (SIL OFL), loaded only where Khmer text appears.
FONTS = {"noto-sans-khmer.woff2": "@fontsource-variable/noto-sans-khmer/files/"
                                  "noto-sans-khmer-khmer-wght-normal.woff2",
         # The OFL asks that the licence travel with the font.
         "noto-sans-khmer-OFL.txt": "@fontsource-variable/noto-sans-khmer/LICENSE"}
#: Browsers the bundles are written for (the oldest that a viewer's phone still runs).
TARGETS = "es2022,chrome109,safari16,firefox115"

#: URL path -> file in web/dist/ served there as a page; every other file of web/dist/ is
#: served under /assets/. Read by ops/edge.py, which renders one route per file.
PAGES = {
    "/vote": "vote.html",
    "/results": "results.html",
    "/overlay": "overlay.html",
    "/countdown": "countdown.html",
    "/control": "control.html",
}
ASSETS_PREFIX = "/assets/"

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".woff2": "font/woff2",
    ".txt": "text/plain; charset=utf-8",
}


def _node_tool(name: str) -> str:
    path = NODE_MODULES / ".bin" / name
    if not path.exists():
        raise SystemExit(f"{path} is missing: run `npm ci` in web/")
    return str(path)


def _run(command: list[str], cwd: Path = ROOT) -> None:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command[:2])} failed:\n{result.stdout}{result.stderr}")


def npm_ci() -> None:
    """Install web/node_modules from the committed lock file when it is not there yet."""
    if (NODE_MODULES / ".package-lock.json").exists():
        return
    npm = shutil.which("npm")
    if npm is None:
        raise SystemExit("npm not found: install Node.js and npm (Debian: apt-get install npm)")
    _run([npm, "ci", "--no-fund", "--no-audit"], cwd=WEB)


def render(out: Path) -> None:
    """Write fresh sources to out/src (with gen/) and the served files to out/dist."""
    shutil.copytree(SRC, out / "src", ignore=shutil.ignore_patterns("gen"))
    template = {"version": "v2", "plugins": [{
        "local": _node_tool("protoc-gen-es"), "out": str(out / "src" / "gen"),
        "opt": ["target=ts", "import_extension=none"]}]}
    _run([_tool("buf"), "generate", "--template", json.dumps(template)])
    shutil.copyfile(WEB / "tsconfig.json", out / "tsconfig.json")
    _run([_node_tool("tsc"), "--noEmit", "-p", str(out / "tsconfig.json")], cwd=out)
    dist = out / "dist"
    _run([_node_tool("esbuild"), *(str(out / "src" / name) for name in ENTRY_POINTS),
          "--bundle", "--minify", "--format=esm", f"--target={TARGETS}",
          "--legal-comments=none", "--charset=utf8", f"--outdir={dist}"], cwd=WEB)
    shutil.copytree(STATIC, dist, dirs_exist_ok=True)
    for name, source in FONTS.items():
        shutil.copyfile(NODE_MODULES / source, dist / name)


def stale_files(out: Path) -> list[str]:
    """Committed paths that differ from a fresh render, are missing, or are extra."""
    return stale_tree(out / "src" / "gen", GEN) + stale_tree(out / "dist", DIST)


def gzipped_size(path: Path) -> int:
    """What a file weighs on the wire with gzip -9 (what a CDN in front of the edge sends)."""
    return len(gzip.compress(path.read_bytes(), compresslevel=9, mtime=0))


def build(check: bool = False) -> int:
    """Rebuild web/src/gen and web/dist, or with `check` only report what is stale."""
    npm_ci()
    copy_third_party_protos()
    # Inside web/ so esbuild and tsc find web/node_modules from the scratch sources.
    with tempfile.TemporaryDirectory(prefix=".build-", dir=WEB) as scratch:
        out = Path(scratch)
        render(out)
        stale = stale_files(out)
        if check:
            return report_stale(stale, "web/src/gen and web/dist", "televote web")
        for fresh, committed in ((out / "src" / "gen", GEN), (out / "dist", DIST)):
            shutil.rmtree(committed, ignore_errors=True)
            shutil.copytree(fresh, committed)
    for name in sorted(files(DIST)):
        if name.endswith(".js"):
            print(f"  dist/{name}: {(DIST / name).stat().st_size / 1024:.1f} KB, "
                  f"{gzipped_size(DIST / name) / 1024:.1f} KB gzipped")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m ops.web", description=__doc__)
    parser.add_argument("--check", action="store_true",
                        help="exit 1 listing stale files instead of writing them")
    args = parser.parse_args(argv)
    return build(check=args.check)


if __name__ == "__main__":
    sys.exit(main())


# ---- a real browser for tests and benchmarks ---------------------------------------------------

#: Debian's chromium: /usr/bin/chromium is a wrapper script; Playwright needs the binary itself
#: (its own browser download is not reachable here).
CHROMIUM_CANDIDATES = ("/usr/lib/chromium/chromium", "/usr/lib/chromium-browser/chromium-browser")
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def chromium_path() -> str | None:
    """The chromium binary Playwright should drive, or None when none is installed."""
    return next((path for path in CHROMIUM_CANDIDATES if Path(path).exists()), None)
