"""Tests for data/download.py, run offline against a fake GitHub on 127.0.0.1.

A local HTTP server plays both parts of GitHub: the contents-API listing of the
corpus folder (JSON) and the raw files its `download_url`s point to. It records
every path it serves, so a test can tell what was downloaded and what skipped.
"""

import hashlib
import importlib.util
import json
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import bpe

SCRIPT = Path(__file__).resolve().parent.parent / "data" / "download.py"

# data/ is not a package, so load the script as a module by its path.
_spec = importlib.util.spec_from_file_location("download", SCRIPT)
download = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(download)

TEXTS = {
    "Pushkin_KapitanskayaDochka.txt": "Береги честь смолоду.\nГлава I. Сержант гвардии\n".encode(),
    "Tolstoi_AnnaKarenina.txt": "Все счастливые семьи похожи друг на друга,\r\n"
    "каждая несчастливая семья несчастлива по-своему.\r\n".encode(),
    # The real corpus has a name with a space, which GitHub's download_url percent-encodes.
    "Vovchok_Zapiski prichyotnika.txt": "Я родилась в бедной семье.\n".encode(),
}


# ---------------------------------------------------------------------------
# The fake GitHub


class FakeGitHub(BaseHTTPRequestHandler):
    """Serves `self.server.routes` (path -> bytes) and records each path requested."""

    def do_GET(self):
        self.server.requests.append(self.path)
        body = self.server.routes.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # keep the test output quiet
        pass


def git_hash(content: bytes) -> str:
    """The git blob sha1, computed here independently of the module under test."""
    return hashlib.sha1(f"blob {len(content)}\0".encode() + content).hexdigest()


@pytest.fixture
def server(monkeypatch):
    """A running fake GitHub; `server.publish(texts)` makes it serve a corpus."""
    # Never let a proxy configured on the machine intercept requests to 127.0.0.1
    # (set in os.environ, so the script run by subprocess inherits it too).
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeGitHub)
    httpd.routes, httpd.requests = {}, []
    base = f"http://127.0.0.1:{httpd.server_port}"
    httpd.listing_url = base + "/repos/JoannaBy/RussianNovels/contents/corpus"

    def publish(texts, served=None):
        """List `texts` (name -> bytes) and serve them, or `served` instead if given."""
        listing = [{"name": "images", "type": "dir", "size": 0, "sha": "0" * 40, "download_url": None},
                   {"name": "README.md", "type": "file", "size": 2, "sha": git_hash(b"hi"),
                    "download_url": base + "/raw/README.md"}]
        for name, content in texts.items():
            path = "/raw/" + urllib.parse.quote(name)
            listing.append({"name": name, "type": "file", "size": len(content),
                            "sha": git_hash(content), "download_url": base + path})
            httpd.routes[path] = content
        for name, content in (served or {}).items():
            httpd.routes["/raw/" + urllib.parse.quote(name)] = content
        httpd.routes["/repos/JoannaBy/RussianNovels/contents/corpus"] = json.dumps(listing).encode()

    httpd.publish = publish
    # A short poll interval, so that shutdown() returns at once rather than in 0.5 s.
    thread = threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def downloads(server) -> list[str]:
    """Names of the corpus files the server has served so far (not the listing)."""
    return sorted(urllib.parse.unquote(path.removeprefix("/raw/"))
                  for path in server.requests if path.startswith("/raw/"))


def run_script(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args],
                          capture_output=True, text=True, timeout=30)


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------
# Downloading and resuming


def test_git_blob_sha1_matches_git():
    # `printf 'hello\n' | git hash-object --stdin`
    assert download.git_blob_sha1(b"hello\n") == "ce013625030ba8dba906f756967f9e9ca394464a"


def test_download_writes_exactly_the_listed_txt_files(server, tmp_path):
    server.publish(TEXTS)
    download.download_corpus(tmp_path, server.listing_url)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(TEXTS)  # no README, no .part
    for name, content in TEXTS.items():
        assert (tmp_path / name).read_bytes() == content  # byte for byte, CRLF kept
    assert downloads(server) == sorted(TEXTS)


def test_second_run_skips_complete_files(server, tmp_path):
    server.publish(TEXTS)
    download.download_corpus(tmp_path, server.listing_url)
    mtimes = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    server.requests.clear()
    download.download_corpus(tmp_path, server.listing_url)
    assert downloads(server) == []
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == mtimes


def test_truncated_or_corrupted_files_are_downloaded_again(server, tmp_path):
    server.publish(TEXTS)
    download.download_corpus(tmp_path, server.listing_url)
    truncated, corrupted, intact = sorted(TEXTS)
    (tmp_path / truncated).write_bytes(TEXTS[truncated][:10])
    (tmp_path / corrupted).write_bytes(TEXTS[corrupted][:-1] + b"!")  # same size, other content
    server.requests.clear()
    download.download_corpus(tmp_path, server.listing_url)
    assert downloads(server) == sorted([truncated, corrupted])
    for name, content in TEXTS.items():
        assert (tmp_path / name).read_bytes() == content


def test_non_utf8_file_is_an_error_naming_it(server, tmp_path):
    latin1 = "Bad_Latin1.txt"
    server.publish({**TEXTS, latin1: "Ça ne décode pas".encode("latin-1")})
    with pytest.raises(download.DownloadError, match=f"{latin1} is not valid UTF-8"):
        download.download_corpus(tmp_path, server.listing_url)
    assert not any(p.name.startswith(latin1) for p in tmp_path.iterdir())  # nor a .part


def test_file_that_differs_from_the_listing_is_an_error(server, tmp_path):
    name = sorted(TEXTS)[0]
    server.publish(TEXTS, served={name: TEXTS[name][:-5]})  # cut off in transit
    with pytest.raises(download.DownloadError, match=f"{name} arrived with"):
        download.download_corpus(tmp_path, server.listing_url)
    assert not (tmp_path / name).exists()


def test_listing_cannot_write_outside_the_folder(server, tmp_path):
    server.publish({"../escaped.txt": "побег".encode()})
    with pytest.raises(download.DownloadError, match="unsafe file name"):
        download.download_corpus(tmp_path / "corpus", server.listing_url)
    assert not (tmp_path / "escaped.txt").exists()


# ---------------------------------------------------------------------------
# The command line


def test_cli_downloads_with_a_progress_line_per_file(server, tmp_path):
    server.publish(TEXTS)
    result = run_script("--out", str(tmp_path), "--listing-url", server.listing_url)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(TEXTS)
    progress = [line for line in result.stdout.splitlines() if line.startswith("[")]
    assert [line[:5] for line in progress] == ["[1/3]", "[2/3]", "[3/3]"]
    assert all(name in line for name, line in zip(sorted(TEXTS), progress))


def test_cli_help():
    result = run_script("--help")
    assert result.returncode == 0
    assert "--out" in result.stdout


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The CLI failed cleanly: exit code 1, one line on stderr, no traceback."""
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: could not download the corpus (")
    assert "--data DIR" in lines[0] and "CORPUS_DIR" in lines[0]
    return lines[0]


def test_cli_unreachable_server_is_one_clear_line(tmp_path):
    url = f"http://127.0.0.1:{closed_port()}/contents/corpus"
    line = one_line_error(run_script("--out", str(tmp_path), "--listing-url", url))
    assert url in line


def test_cli_bad_listing_is_one_clear_line(server, tmp_path):
    server.routes["/not-json"] = b"<html>rate limited</html>"
    server.routes["/not-a-list"] = b'{"message": "Not Found"}'
    for path in ["/not-json", "/not-a-list", "/missing"]:
        line = one_line_error(run_script("--out", str(tmp_path), "--listing-url",
                                         f"http://127.0.0.1:{server.server_port}{path}"))
        assert path in line


def test_cli_non_utf8_file_is_one_line_naming_it(server, tmp_path):
    server.publish({"Bad.txt": b"\xff\xfe not utf-8"})
    line = one_line_error(run_script("--out", str(tmp_path), "--listing-url", server.listing_url))
    assert "Bad.txt is not valid UTF-8" in line


# ---------------------------------------------------------------------------
# bpe.py downloads the corpus when it is read from the default folder and missing


def no_network(url, timeout):
    raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")


def test_reading_the_default_corpus_downloads_it_first(server, tmp_path, monkeypatch, capsys):
    server.publish(TEXTS)
    real_urlopen = urllib.request.urlopen

    def to_the_fake_github(url, timeout):
        return real_urlopen(url.replace(download.LISTING_URL, server.listing_url), timeout=timeout)

    monkeypatch.setattr(urllib.request, "urlopen", to_the_fake_github)
    monkeypatch.setenv("CORPUS_DIR", str(tmp_path / "corpus"))
    docs = bpe.read_corpus(bpe.default_data_dir())
    assert [name for name, _ in docs] == sorted(TEXTS) and downloads(server) == sorted(TEXTS)
    assert "[3/3]" in capsys.readouterr().out  # data/download.py's progress, a line per file
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    assert bpe.read_corpus(bpe.default_data_dir()) == docs  # there now: no second download


def test_offline_the_default_corpus_is_one_line_saying_how_to_pass_data(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setenv("CORPUS_DIR", str(tmp_path / "corpus"))
    with pytest.raises(SystemExit) as exit:
        bpe.main(["train", "--out", str(tmp_path / "tok.json")])
    message = str(exit.value.code)
    assert message.startswith("error: could not download the corpus (") and "\n" not in message
    assert "Temporary failure in name resolution" in message
    assert "--data DIR" in message and "CORPUS_DIR" in message
    assert not (tmp_path / "corpus").exists() and not (tmp_path / "tok.json").exists()


def test_a_missing_data_folder_given_by_the_user_is_not_downloaded(tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", lambda *args, **kwargs: pytest.fail("downloaded"))
    monkeypatch.setenv("CORPUS_DIR", str(tmp_path / "corpus"))
    with pytest.raises(FileNotFoundError, match="no corpus at .*missing"):
        bpe.read_corpus(tmp_path / "missing")
