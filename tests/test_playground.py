"""playground.py: what the page is told equals the model called directly, for every model file;
bad requests get a message and the server keeps running; and the page works in a real
browser (headless Chromium, skipped where it is missing)."""

import base64
import json
import math
import shutil
import threading
import urllib.error
import urllib.request

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize, run_main
from test_models import MODELS, TABLE

import playground


@pytest.fixture(scope="module")
def runs(trained, tmp_path_factory):
    """A llama and a mixtral run (tiny, trained a few steps), and one that is missing."""
    missing = tmp_path_factory.mktemp("missing")
    names = [trained("llama"), trained("mixtral"), missing]
    return [playground.load_run(out_dir=folder) for folder in names]


@pytest.fixture(scope="module")
def url(runs):
    server = playground.serve(runs, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def post(url, path, body):
    """POST body as JSON: (status, reply); a stream's reply is its events' list."""
    request = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request) as reply:
            text = reply.read().decode()
            status = reply.status
    except urllib.error.HTTPError as e:
        text = e.read().decode()
        status = e.code
    if text.startswith("data: "):
        return status, [json.loads(event[6:]) for event in text.strip().split("\n\n")]
    return status, json.loads(text)


def random_run(name, **config):
    """A Run of a random model of this file, with sharp attention (no tokenizer)."""
    m = TABLE[name]
    model = randomize(m.build(**config))
    return playground.Run(name, m.module, model, None)


def test_the_page_lists_the_runs_and_a_missing_one_says_why(url, runs):
    with urllib.request.urlopen(url + "/api/runs") as reply:
        described = json.load(reply)
    assert [run.get("model") for run in described] == ["llama", "mixtral", None]
    assert "no checkpoint" in described[2]["error"]
    assert described[0]["cache"] == playground.cache_buffers(runs[0].module, runs[0].model.config)
    # Only the page and the API: no request reads a file.
    for path in ["/playground.py", "/../bpe.py", "/api/../ckpt.pt"]:
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url + path)
        assert e.value.code == 404


def test_tokens_are_the_tokenizers_and_bits_per_character_is_evals(url, runs, tmp_path, capsys):
    run = runs[0]
    text = "Он долго ходил по комнате.\n— Что же вы молчите?"
    status, reply = post(url, "/api/tokens", {"run": 0, "text": text})
    assert status == 200
    ids = [token["id"] for token in reply["tokens"]]
    assert ids == run.tok.encode_prompt(text)
    assert b"".join(bytes.fromhex(token["bytes"]) for token in reply["tokens"][1:]) == text.encode()
    (tmp_path / "prompt.txt").write_text(text, encoding="utf-8")
    llama = run.module
    code, out, _ = run_main(llama, capsys, "eval", "--out-dir", run.name, "--text",
                            tmp_path / "prompt.txt", "--device", "cpu")
    assert code == 0
    assert f"{reply['bpc']:.4f} bits per character" in out
    assert not run.model.training


@pytest.mark.parametrize("settings", [(1.0, None, 1.0), (0.7, 5, 1.0), (1.3, None, 0.5),
                                      (0.5, 3, 0.8), (0.0, None, 1.0)])
def test_the_distribution_and_its_cut_are_what_sample_next_draws_from(url, runs, settings,
                                                                      monkeypatch):
    run = runs[0]
    temperature, top_k, top_p = settings
    ids = run.tok.encode_prompt("Старик снял шапку")[:8]
    body = {"run": 0, "ids": ids, "temperature": temperature, "top_k": top_k, "top_p": top_p}
    status, reply = post(url, "/api/distribution", body)
    assert status == 200
    logits = run.model(torch.tensor([ids]))[0][0, -1]
    p = F.softmax(logits, dim=-1)
    assert [row["id"] for row in reply["top"]] == p.topk(10).indices.tolist()
    assert [row["p"] for row in reply["top"]] == pytest.approx(p.topk(10).values.tolist(), abs=1e-5)
    # What the model file's sample_next hands torch.multinomial.
    drawn = []
    monkeypatch.setattr(torch, "multinomial", lambda probs, num_samples: drawn.append(probs[0]))
    run.module.sample_next(logits[None], temperature, top_k, top_p)
    q = drawn[0] if drawn else F.one_hot(logits.argmax(), logits.numel()).float()
    # torch.multinomial takes weights: what top_p leaves need not sum to 1.
    q = q / q.sum()
    assert [row["q"] for row in reply["top"]] == pytest.approx(q[p.topk(10).indices].tolist(),
                                                               abs=1e-5)
    assert reply["kept"] == int((q > 0).sum())


def test_generation_streams_the_model_files_own_tokens_with_their_probabilities(url, runs):
    run = runs[1]
    ids = run.tok.encode_prompt("Весна в том году")[:4]
    body = {"run": 1, "ids": ids, "max_new_tokens": 12, "temperature": 0}
    status, events = post(url, "/api/generate", body)
    assert status == 200
    assert events[-1]["done"]
    new = [event["id"] for event in events[:-1]]
    expected = run.model.generate(torch.tensor([ids]), 12, temperature=0)[0, len(ids):]
    eos = expected.tolist().index(run.tok.eos_id) if run.tok.eos_id in expected else 12
    assert new == expected.tolist()[:eos]
    for i, event in enumerate(events[:-1]):
        window = (ids + new[:i])[-run.model.config.block_size :]
        logits = run.model(torch.tensor([window]))[0][0, -1]
        assert event["p"] == pytest.approx(F.softmax(logits, dim=-1)[event["id"]].item(), abs=1e-5)


@torch.no_grad()
def by_hand(model, idx):
    """The first layer's attention weights of a LLaMA-family model, computed from its modules."""
    x = model.model.embed_tokens(idx)
    attention = model.model.layers[0].self_attn
    h = model.model.layers[0].input_layernorm(x)
    B, T, _ = h.size()
    q = attention.q_proj(h).view(B, T, attention.n_head, -1).transpose(1, 2)
    k = attention.k_proj(h).view(B, T, attention.n_kv_head, -1).transpose(1, 2)
    rope = model.model.rotary_emb(0, T)
    q = TABLE["llama"].module.apply_rope(q, *rope)
    k = TABLE["llama"].module.apply_rope(k, *rope)
    k = k.repeat_interleave(attention.n_head // attention.n_kv_head, dim=1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    return F.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)[0]  # (n_head, T, T)


def test_attention_weights_are_the_models():
    run = random_run("llama", block_size=16)
    idx = torch.randint(0, 40, (1, 16), generator=torch.Generator().manual_seed(0))
    reply = playground.inspect(run, idx[0].tolist())
    expected = by_hand(run.model, idx)
    torch.testing.assert_close(torch.tensor(reply["rows"][0]), expected[:, -1])
    # The maps: the last tokens' weights among themselves, in 1/255ths.
    maps = torch.frombuffer(bytearray(base64.b64decode(reply["maps"])), dtype=torch.uint8)
    maps = maps.view(2, 4, 16, 16)  # (n_layer, n_head, span, span)
    assert (maps[0] / 255 - expected).abs().max() <= 0.5 / 255 + 1e-6


@pytest.mark.parametrize("name", MODELS)
def test_every_model_files_attention_is_seen_causal_windowed_and_sunk(name):
    m = TABLE[name]
    window = m.tiny.get("sliding_window")
    run = random_run(name, block_size=12)
    original = (run.module.attention, run.module.FUSED, getattr(run.module, "dispatch", None))
    ids = torch.randint(0, 40, (12,), generator=torch.Generator().manual_seed(1)).tolist()
    reply = playground.inspect(run, ids)
    rows = torch.tensor(reply["rows"])  # (n_layer, n_head, T)
    none = torch.tensor(reply["none"])
    assert rows.shape == (2, 4, 12)
    assert (rows >= 0).all()
    torch.testing.assert_close(rows.sum(-1) + none, torch.ones(2, 4))
    if name == "gpt_oss":
        # The sinks take a share from every query.
        assert (none > 1e-4).all()
    else:
        assert (none < 1e-5).all()
    if window:
        # mistral.py and mixtral.py window every layer; gemma3.py and gpt_oss.py the first.
        assert (rows[0, :, : 12 - window] == 0).all()
        assert (rows[0, :, 12 - window :] > 0).all()
    buffers = playground.cache_buffers(run.module, run.model.config)
    assert (buffers is None) == (name == "gpt1")
    n_moe = len(reply["experts"])
    assert n_moe == (2 if hasattr(run.module, "dispatch") else 0)
    for route in reply["experts"]:
        assert len(route["chosen"]) == 12
    assert original == (run.module.attention, run.module.FUSED,
                        getattr(run.module, "dispatch", None))


def first_router(run, ids):
    """The first layer's chosen experts and weights (T, k) of a Mixtral, from its router's
    logits as the model computes them."""
    logits = []
    gate = run.model.model.layers[0].block_sparse_moe.gate
    handle = gate.register_forward_hook(lambda module, args, out: logits.append(out))
    try:
        with torch.no_grad():
            run.model(torch.tensor([ids[-run.model.config.block_size :]]))
    finally:
        handle.remove()
    scores, chosen = logits[0].topk(run.model.config.n_expert_per_token, dim=-1)
    return chosen, F.softmax(scores, dim=-1)


def test_experts_are_the_routers_choices(runs):
    run = runs[1]
    ids = run.tok.encode_prompt("За окном шёл снег")[:10]
    reply = playground.inspect(run, ids)
    chosen, weights = first_router(run, ids)
    route = reply["experts"][0]
    assert route["layer"] == 0
    assert route["n_expert"] == run.model.config.n_expert
    assert route["chosen"] == chosen.tolist()
    torch.testing.assert_close(torch.tensor(route["weights"]), weights)


def test_bad_requests_get_a_message_and_the_server_keeps_running(url, runs):
    block_size = runs[0].model.config.block_size
    long_text = "Мой дядя самых честных правил. " * 20
    cases = [
        ("/api/tokens", {"run": 0, "text": ""}, "type a prompt"),
        ("/api/tokens", {"run": 2, "text": "x"}, "no checkpoint"),
        ("/api/tokens", {"run": 7, "text": "x"}, "no run 7"),
        ("/api/inspect", {"run": 0, "ids": [10**6]}, "token ids must be"),
        ("/api/inspect", {"run": 0, "ids": []}, "no tokens"),
        ("/api/distribution", {"run": 0, "ids": [1], "top_p": 0}, "top_p"),
        ("/api/generate", {"run": 0, "ids": [1], "temperature": -1}, "temperature"),
        ("/api/generate", {"run": 0, "ids": [1], "max_new_tokens": 0}, "max new tokens"),
        ("/api/somewhere", {"run": 0}, "no request"),
        ("/api/tokens", [1, 2], "not a JSON object"),
        ("/api/tokens", {"run": 0, "text": ["a"]}, "must be text"),
        ("/api/tokens", {"run": 0}, "lacks 'text'"),
        ("/api/inspect", {"run": 0, "ids": [True]}, "token ids must be"),
        ("/api/generate", {"run": 0, "ids": [1], "seed": 10**20}, "seed"),
        ("/api/distribution", {"run": True, "ids": [1]}, "no run"),
    ]
    for path, body, message in cases:
        status, reply = post(url, path, body)
        assert status == 400
        assert message in reply["error"]
    # Only this server's own name, and only JSON: no other site's page gets an answer.
    foreign = urllib.request.Request(url + "/api/runs", headers={"Host": "evil.example:80"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(foreign)
    assert e.value.code == 403
    form = urllib.request.Request(url + "/api/tokens", data=b'{"text": "x"}', method="POST",
                                  headers={"Content-Type": "text/plain"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(form)
    assert e.value.code == 400
    status, reply = post(url, "/api/tokens", {"run": 0, "text": long_text})
    assert reply["cropped"] == len(reply["tokens"]) - block_size > 0
    ids = [token["id"] for token in reply["tokens"]]
    status, reply = post(url, "/api/inspect", {"run": 0, "ids": ids})
    assert status == 200
    assert reply["offset"] == len(ids) - block_size
    assert len(reply["rows"][0][0]) == block_size


def test_released_folders_find_their_model_file_and_bad_ones_say_why(trained, tmp_path, capsys):
    llama = TABLE["llama"].module
    folder = tmp_path / "released"
    assert run_main(llama, capsys, "export", "--out-dir", trained("llama"), "--to", folder)[0] == 0
    run = playground.load_run(init_from=folder)
    assert run.error is None
    assert run.module is llama
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"model_type": "bert"}')
    assert "no model file here reads model_type 'bert'" in playground.load_run(
        init_from=tmp_path / "other").error
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "ckpt.pt").write_bytes(b"not a checkpoint")
    assert "corrupt" in playground.load_run(out_dir=tmp_path / "run").error


def test_the_command_line(capsys, runs):
    with pytest.raises(SystemExit):
        playground.main([])
    assert "--out-dir" in capsys.readouterr().err
    server = playground.serve(runs[:1], port=0)
    try:
        assert server.server_address[0] == "127.0.0.1"
        port = server.server_address[1]
        assert playground.main(["--out-dir", runs[0].name, "--port", str(port)]) == 1
        assert capsys.readouterr().err.splitlines()[-1].startswith("error: cannot listen on")
    finally:
        server.server_close()


# -----------------------------------------------------------------------------
# In a real browser


def chromium():
    """A headless Chromium driven by selenium, or a skip that says what is missing."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not binary or not driver:
        pytest.skip("no chromium and chromedriver: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ["--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1800"]:
        options.add_argument(flag)
    return webdriver.Chrome(service=webdriver.ChromeService(driver), options=options)


def test_the_page_in_chromium(url, runs, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = chromium()
    try:
        browser.get(url + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, ".prompt .tok"))
        assert "no checkpoint" in browser.find_elements(By.CSS_SELECTOR, ".run")[2].text
        browser.find_element(By.ID, "max_new_tokens").clear()
        browser.find_element(By.ID, "max_new_tokens").send_keys("8")
        prompt = browser.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys("Он сказал")
        browser.find_element(By.ID, "generate").click()
        wait.until(lambda b: "tokens/s" in b.find_elements(By.CSS_SELECTOR, ".speed")[1].text)
        columns = browser.find_elements(By.CSS_SELECTOR, ".run")
        for run, column in zip(runs[:2], columns):
            shown = column.find_elements(By.CSS_SELECTOR, ".prompt .tok")
            assert len(shown) == len(run.tok.encode_prompt("Он сказал"))
            generated = column.find_elements(By.CSS_SELECTOR, ".generated .tok")
            assert generated
            generated[-1].click()
            wait.until(lambda b: column.find_elements(By.CSS_SELECTOR, ".head[data-layer]"))
            wait.until(lambda b: column.find_elements(By.CSS_SELECTOR, "table.dist tr"))
            check_details(run, column, len(shown) + len(generated))
        browser.save_screenshot(str(tmp_path / "playground.png"))
    finally:
        browser.quit()


def check_details(run, column, n_tokens):
    """The clicked last token's distribution, attention grid and experts, against the model."""
    from selenium.webdriver.common.by import By

    ids = [int(span.get_attribute("title").split("id ")[1].split(" ")[0])
           for span in column.find_elements(By.CSS_SELECTOR, ".tok")]
    assert len(ids) == n_tokens
    # What stream drew from: mixtral.py's window slides over the whole text, llama.py crops.
    context = ids[:-1]
    if not TABLE[run.module.MODEL].window:
        context = context[-run.model.config.block_size :]
    logits = run.model(torch.tensor([context]))[0][0, -1]
    p = F.softmax(logits, dim=-1)
    rows = column.find_elements(By.CSS_SELECTOR, "table.dist tr")
    assert [int(row.get_attribute("data-id")) for row in rows] == p.topk(10).indices.tolist()
    shown = [float(row.text.split("p ")[1].split()[0]) for row in rows]
    assert shown == pytest.approx(p.topk(10).values.tolist(), abs=1e-4)
    heads = column.find_elements(By.CSS_SELECTOR, ".head[data-layer]")
    config = run.model.config
    assert len(heads) == config.n_layer * config.n_head
    weights = [float(head.get_attribute("data-weight")) for head in heads]
    if run.module.MODEL == "llama":
        expected = by_hand(run.model, torch.tensor([ids[-config.block_size :]]))[:, -1]
        assert weights[: config.n_head] == pytest.approx(expected.max(-1).values.tolist())
    routes = column.find_elements(By.CSS_SELECTOR, ".route")
    assert len(routes) == (config.n_layer if run.module.MODEL == "mixtral" else 0)
    if routes:
        chosen, expert_weights = first_router(run, ids)
        assert routes[0].text == (f"layer 0: token {n_tokens - 1} → experts "
                                  f"{chosen[-1, 0]}: {expert_weights[-1, 0]:.3f}, "
                                  f"{chosen[-1, 1]}: {expert_weights[-1, 1]:.3f}")
