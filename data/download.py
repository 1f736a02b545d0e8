"""Download the Russian Novels corpus that the tokenizer and the models learn from.

The corpus is 107 novels of 19th- and 20th-century Russian literature (Tolstoy,
Dostoevsky, Bulgakov, ...), one UTF-8 text file per novel, about 75 MB in all,
from github.com/JoannaBy/RussianNovels (the `corpus/` folder).

This script lists that folder through the GitHub API and downloads every `.txt`
file into `data/corpus/` (or `--out DIR`), printing one line per file. It can be
stopped and run again: a file already present and complete (same size and same
git blob hash as in the listing) is skipped, and a file is written under its
real name only once it has arrived whole and decodes as UTF-8.

    python data/download.py
    python data/download.py --out /somewhere/corpus

Offline? Every command that reads text takes `--data DIR`, or the environment
variable CORPUS_DIR=DIR, to use a local copy of the corpus instead.
"""

import argparse
import hashlib
import http.client
import json
import os
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

LISTING_URL = "https://api.github.com/repos/JoannaBy/RussianNovels/contents/corpus"
DEFAULT_OUT = Path(__file__).parent / "corpus"
# Seconds per request: a stalled connection becomes an error, not a hang.
TIMEOUT_S = 60
MB = 1_000_000


class DownloadError(Exception):
    """Why the corpus could not be downloaded, as one sentence for the user."""


@dataclass(frozen=True)
class CorpusFile:
    """One entry of the listing: where a file comes from and what it must be."""

    name: str  # file name, e.g. "Tolstoi_AnnaKarenina.txt"
    size: int  # in bytes
    sha: str  # git blob sha1 (see git_blob_sha1)
    url: str  # where to download the raw bytes


# ---------------------------------------------------------------------------
# Fetching and checking


def fetch(url: str) -> bytes:
    """Return the body found at `url`, or raise DownloadError saying why not."""
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            return response.read()
    # The server answered, e.g. "HTTP Error 403: rate limit exceeded".
    except urllib.error.HTTPError as e:
        raise DownloadError(f"{url}: {e}") from None
    # No answer: offline, a DNS failure, a connection refused.
    except urllib.error.URLError as e:
        raise DownloadError(f"{url}: {e.reason}") from None
    # Timed out, cut off, or not a URL.
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise DownloadError(f"{url}: {e}") from None


def fetch_listing(listing_url: str) -> list[CorpusFile]:
    """Ask the GitHub contents API which `.txt` files the corpus folder holds.

    The API answers with a JSON list of entries such as
    {"name": "...", "type": "file", "size": 123, "sha": "...", "download_url": "..."};
    anything else is a bad listing.
    """
    body = fetch(listing_url)
    try:
        entries = json.loads(body)
        if not isinstance(entries, list):
            raise ValueError("expected a JSON list of files")
        files = [
            CorpusFile(
                str(entry["name"]),
                int(entry["size"]),
                str(entry["sha"]),
                str(entry["download_url"]),
            )
            for entry in entries
            if entry["type"] == "file" and str(entry["name"]).endswith(".txt")
        ]
    except (ValueError, TypeError, KeyError) as e:
        raise DownloadError(f"bad listing from {listing_url}: "
                            f"{type(e).__name__}: {e}") from None
    if not files:
        raise DownloadError(f"the listing from {listing_url} names no .txt files")
    for file in files:
        # A name like "../x.txt" must not escape the folder.
        if Path(file.name).name != file.name:
            raise DownloadError(f"bad listing from {listing_url}: unsafe file name {file.name!r}")
    return sorted(files, key=lambda file: file.name)


def git_blob_sha1(content: bytes) -> str:
    """The hash git gives a file: the sha1 of a "blob <size>\\0" header, then the bytes."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def is_complete(path: Path, file: CorpusFile) -> bool:
    """True if `path` already holds exactly the file the listing describes."""
    return (
        path.is_file()
        and path.stat().st_size == file.size
        and git_blob_sha1(path.read_bytes()) == file.sha
    )


def check_content(file: CorpusFile, content: bytes) -> None:
    """Raise DownloadError unless `content` is the whole file, unchanged, and UTF-8."""
    if len(content) != file.size:
        raise DownloadError(f"{file.name} arrived with {len(content)} bytes "
                            f"instead of {file.size}")
    if git_blob_sha1(content) != file.sha:
        raise DownloadError(f"{file.name} arrived corrupted (its hash differs from the listing)")
    try:
        content.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DownloadError(f"{file.name} is not valid UTF-8 "
                            f"({e.reason} at byte {e.start})") from None


def download_file(file: CorpusFile, path: Path) -> None:
    """Download `file` to `path`, writing a temporary file first and renaming it.

    The rename is atomic, so an interrupted run leaves at worst a stray `.part`
    file, never a truncated text under the real name.
    """
    content = fetch(file.url)
    check_content(file, content)
    partial = path.with_name(path.name + ".part")
    partial.write_bytes(content)
    os.replace(partial, path)


# ---------------------------------------------------------------------------
# The whole corpus, with a progress line per file


def download_corpus(out_dir: Path, listing_url: str = LISTING_URL) -> None:
    """Download every corpus file missing or incomplete in `out_dir`, printing progress."""
    files = fetch_listing(listing_url)
    out_dir.mkdir(parents=True, exist_ok=True)
    total = sum(file.size for file in files)
    name_width = max(len(file.name) for file in files)
    count_width = len(str(len(files)))
    # Bytes now on disk, and bytes fetched by this run.
    done = 0
    downloaded = 0
    start = time.perf_counter()
    for i, file in enumerate(files, 1):
        path = out_dir / file.name
        if is_complete(path, file):
            status = "already present"
        else:
            download_file(file, path)
            downloaded += file.size
            status = f"{downloaded / MB / (time.perf_counter() - start):.1f} MB/s"
        done += file.size
        print(
            f"[{i:>{count_width}}/{len(files)}]  {file.name:<{name_width}}"
            f"  {file.size / MB:5.1f} MB   {done / MB:5.1f}/{total / MB:.1f} MB  {status}",
            flush=True,
        )
    seconds = time.perf_counter() - start
    print(f"{len(files)} files, {total / MB:.1f} MB in {out_dir} "
          f"({downloaded / MB:.1f} MB downloaded in {seconds:.1f} s)")


# ---------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, download, and return the exit code (1 on failure)."""
    parser = argparse.ArgumentParser(
        description="Download the Russian Novels corpus (107 novels, ~75 MB, UTF-8) "
        "from github.com/JoannaBy/RussianNovels. Files already present and complete "
        "are skipped, so an interrupted download can simply be run again.",
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, metavar="DIR",
        help="folder to download into (default: data/corpus next to this script)",
    )
    # Where the list of files comes from. Users never need it; the tests point it at
    # a local server so that they run offline.
    parser.add_argument(
        "--listing-url", default=LISTING_URL, metavar="URL",
        help="GitHub contents-API URL listing the corpus files (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    try:
        download_corpus(args.out, args.listing_url)
    # OSError: the output folder cannot be written.
    except (DownloadError, OSError) as e:
        print(f"error: could not download the corpus ({e}); to use a local copy, "
              f"pass --data DIR to the commands (or set CORPUS_DIR=DIR)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
