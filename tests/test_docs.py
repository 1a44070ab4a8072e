"""Every relative link in the project's Markdown resolves: the file it names exists and, where it
names a heading (``FILE.md#anchor``), that heading is in the file, spelled as GitHub spells its
anchors. A newcomer walks in through README.md's links; a renamed heading or moved doc must fail
here, not on their first click."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIPPED_DIRS = {".venv", ".git", "third_party", "runs", "node_modules"}
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def github_anchor(heading: str) -> str:
    """GitHub's anchor for a heading: link text kept, markup and punctuation dropped, lower case,
    spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    """The anchors of a document's headings; a repeated heading gets -1, -2, ... as on GitHub."""
    counts: dict[str, int] = {}
    found = set()
    for heading in re.findall(r"^#{1,6}\s+(.+)$", FENCE.sub("", markdown), re.M):
        anchor = github_anchor(heading)
        seen = counts.get(anchor, 0)
        counts[anchor] = seen + 1
        found.add(anchor if seen == 0 else f"{anchor}-{seen}")
    return found


def broken_links(doc: Path) -> list[str]:
    broken = []
    for target in LINK.findall(FENCE.sub("", doc.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:, ...
            continue
        path, _, fragment = target.partition("#")
        dest = (doc.parent / path) if path else doc
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest.read_text()):
            broken.append(f"{target}: no such heading")
    return broken


def project_docs() -> list[Path]:
    return [p for p in ROOT.rglob("*.md")
            if not SKIPPED_DIRS & set(p.relative_to(ROOT).parts) and ".egg-info" not in str(p)]


def test_every_relative_link_in_the_docs_resolves():
    docs = project_docs()
    assert {"README.md", "docs/RESULTS.md", "docs/TRAINING.md"} <= {str(p.relative_to(ROOT)) for p in docs}
    broken = {str(doc.relative_to(ROOT)): links for doc in docs if (links := broken_links(doc))}
    assert not broken


def test_the_link_check_fires_on_a_missing_file_and_a_missing_heading(tmp_path):
    headings = "# The README's first command, measured\n## Sweeps (Ray Tune)\n## Sweeps (Ray Tune)\n"
    (tmp_path / "OTHER.md").write_text(headings)
    doc = tmp_path / "DOC.md"
    doc.write_text("[a](OTHER.md#the-readmes-first-command-measured) [b](OTHER.md#sweeps-ray-tune-1) "
                   "[c](https://example.com/x#y) [d](#local)\n# Local\n"
                   "```\n[e](IN_A_FENCE.md)\n```\n"
                   "[f](GONE.md) [g](OTHER.md#sweeps-ray-tune-2) [h](#nowhere)\n")
    assert broken_links(doc) == ["GONE.md: no such file", "OTHER.md#sweeps-ray-tune-2: no such heading",
                                 "#nowhere: no such heading"]
