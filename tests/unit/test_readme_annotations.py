"""README.md's readme-test annotations (tests/e2e/test_readme.py documents them), checked in
seconds without a stack: a block added without one fails here first."""

from __future__ import annotations

import pytest

from tests.e2e.test_readme import README, parse_readme


def test_every_readme_block_says_how_it_is_checked() -> None:
    blocks = parse_readme(README.read_text())
    assert any(block.background for block in blocks), "README.md no longer starts the stack"


def test_readme_annotations_are_understood() -> None:
    blocks = parse_readme(
        "text\n\n<!-- readme-test: background \"is up\" -->\n"
        "<!-- readme-test: expect \"stopped.\" -->\n\n```sh\n./scripts/up\n```\n"
        "```json\n{}\n```\n<!-- readme-test: skip takes minutes -->\n```bash\nsleep 600\n```\n"
        "<!-- readme-test: quiet -->\n```shell\ntrue\n```\n")
    assert [(b.line, b.code, b.background, b.expects, b.skip, b.quiet) for b in blocks] == [
        (6, "./scripts/up", "is up", ["stopped."], None, False),
        (13, "sleep 600", None, [], "takes minutes", False),
        (17, "true", None, [], None, True),
    ]


@pytest.mark.parametrize("readme", [
    "```sh\nls\n```\n",  # no annotation
    "<!-- readme-test: expect -->\n```sh\nls\n```\n",  # expect what?
    "<!-- readme-test: expcet \"x\" -->\n```sh\nls\n```\n",  # misspelt
    "<!-- readme-test: quiet -->\nprose between\n```sh\nls\n```\n",  # not above the block
    "<!-- readme-test: quiet -->\n```text\nls\n```\n",  # above a block that is not run
    "<!-- readme-test: quiet -->\n<!-- readme-test: expect \"x\" -->\n```sh\nls\n```\n",
    "```sh\nls\n```\n<!-- readme-test: quiet -->\n",  # after the last block
])
def test_a_block_whose_check_is_missing_or_unclear_is_refused(readme: str) -> None:
    with pytest.raises(AssertionError):
        parse_readme(readme)
