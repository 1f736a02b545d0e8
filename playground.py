"""
The playground: a local web page that shows what a model does inside, for trained runs or a
released checkpoint, several side by side.

    python playground.py --out-dir checkpoints/llama                   # prints a local URL
    python playground.py --out-dir checkpoints/gpt2 checkpoints/llama  # side by side
    python playground.py --init-from DIR                               # a released checkpoint

The model files are not changed for it. It taps the functions they call by name, for the one
forward pass it inspects: `attention(q, k, v, ...)` is linear in v, so the identity for v
returns its weights (windows, sinks and latent attention included, as each file computes
them); `dispatch(x, chosen, weights, experts)` is handed each token's experts; and
`sample_next(logits, ...)` the logits each token was drawn from. The server is the standard
library's http.server: one user on one machine needs no more, and it adds no dependency.
"""

import argparse
import base64
import codecs
import importlib
import itertools
import json
import math
import sys
import threading
import time
from contextlib import closing, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch
import torch.nn.functional as F

import bpe

ROOT = Path(__file__).resolve().parent
# The model files: a run's ckpt.pt names one, a released folder's model_type finds one.
MODELS = ["gpt1", "gpt2", "llama", "mistral", "mixtral", "gemma", "qwen3", "gemma3", "deepseek",
          "gpt_oss"]
# The attention maps show the last SPAN tokens' weights among themselves, or more to show
# where a window cuts, up to MAX_SPAN.
SPAN = 48
MAX_SPAN = 128
TOP = 10
# A request's body: far above a prompt of a released model's whole context.
MAX_BODY = 4_000_000


class PlaygroundError(ValueError):
    """A user's mistake, shown on the page as one line."""


def check(ok, message):
    """Raise PlaygroundError(message) unless ok."""
    if not ok:
        raise PlaygroundError(message)


# -----------------------------------------------------------------------------
# The runs


class Run:
    """One model the page shows: its model file, model and tokenizer, or why it has none; and
    `info`, what the page is told of it."""

    def __init__(self, name, module=None, model=None, tok=None, error=None):
        self.name = name
        self.module = module
        self.model = model
        self.tok = tok
        self.error = error
        self.device = None if model is None else next(model.parameters()).device
        self.info = {"name": name, "error": error}
        if model is not None:
            self.info = {
                "name": name,
                "model": module.MODEL,
                "parameters": sum(p.numel() for p in model.parameters()),
                "n_layer": model.config.n_layer,
                "block_size": model.config.block_size,
                "cache": cache_buffers(module, model.config),
            }


def model_file_of(folder):
    """The model file whose SUPPORTED model_type a released folder's config.json has."""
    path = Path(folder) / "config.json"
    check(path.is_file(), f"{folder} has no config.json: it is not a Hugging Face model folder")
    model_type = bpe.read_json(path).get("model_type")
    for name in MODELS:
        supported = getattr(importlib.import_module(name), "SUPPORTED", {})
        if model_type in supported.get("model_type", ()):
            return name
    raise PlaygroundError(f"no model file here reads model_type {model_type!r}")


def load_run(out_dir=None, init_from=None, model_name=None, device="cpu"):
    """A Run for a training run's folder or a released folder; its error if it has none."""
    name = str(init_from or out_dir)
    try:
        if init_from:
            module, model, tok = load_released(init_from, model_name, device)
        else:
            module, model, tok = load_trained_run(out_dir, device)
        check(tok, f"{name} has no tokenizer")
    except (ValueError, OSError, ImportError) as e:
        print(f"{name}: {e}", file=sys.stderr)
        return Run(name, error=str(e))
    run = Run(name, module, model, tok)
    print(f"{name}: {module.MODEL}.py, {run.info['parameters']:,} parameters, ready",
          file=sys.stderr)
    return run


def load_released(folder, model_name, device):
    """(model file, model, tokenizer) of a Hugging Face folder, by its model file's loader."""
    model_name = model_name or model_file_of(folder)
    weights = [*Path(folder).glob("*.safetensors"), *Path(folder).glob("*.bin")]
    size = sum(f.stat().st_size for f in weights)
    print(f"reading {folder} for {model_name}.py ({size / 2**30:.1f} GiB) ...", file=sys.stderr)
    module = importlib.import_module(model_name)
    model, tok = module.load_trained(None, module.pick_device(device), folder)
    return module, model, tok


def load_trained_run(out_dir, device):
    """(model file, model, tokenizer) of a run: its ckpt.pt names the model file."""
    path = Path(out_dir) / "ckpt.pt"
    check(path.is_file(), f"no checkpoint at {path}")
    print(f"reading {path} ...", file=sys.stderr)
    try:
        # mmap: the name of the model file without reading the weights, which it reads.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # truncated, foreign, ...
        raise PlaygroundError(f"{path} is corrupt or not a checkpoint") from None
    kind = checkpoint.get("model") if isinstance(checkpoint, dict) else None
    check(kind in MODELS, f"{path} is no checkpoint of a model file here")
    module = importlib.import_module(kind)
    model, tok = module.load_trained(out_dir, module.pick_device(device))
    return module, model, tok


def cache_buffers(module, config):
    """The KV-cache as [slots, bytes when full] per buffer (float32, batch 1): the page draws
    sum(bytes * min(tokens, slots) / slots) as the text grows. None for no cache (gpt1.py)."""
    if not hasattr(module, "KVCache"):
        return None
    # On the meta device: the shapes without the memory, which a long context would take.
    cache = module.KVCache(config, 1, torch.device("meta"), torch.float32)
    lists = [value for value in vars(cache).values() if isinstance(value, list)]
    buffers = [t for value in lists for t in value if isinstance(t, torch.Tensor)]
    return [[t.size(-2), t.nbytes] for t in buffers]


# -----------------------------------------------------------------------------
# What the model computes


@contextmanager
def tapped(module, **functions):
    """module's functions replaced by these while the block runs: the model files call them
    by their global names, so the model sees the replacements."""
    saved = {name: getattr(module, name) for name in functions}
    vars(module).update(functions)
    try:
        yield
    finally:
        vars(module).update(saved)


def tokens(run, text):
    """The prompt as the tokenizer cut it: each token's id, bytes and text; and its bits per
    character as the model file's `eval` computes them."""
    check(isinstance(text, str), "the prompt must be text")
    check(text, "type a prompt first")
    ids = run.tok.encode_prompt(text)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pieces = [token_info(run.tok, id, decoder) for id in ids]
    block_size = run.model.config.block_size
    result = {"tokens": pieces, "cropped": max(0, len(ids) - block_size), "bpc": None}
    if len(ids) > 1:
        module = run.module
        batches = module.sequential_batches(torch.tensor(ids), 1, block_size)
        char_counts = torch.tensor(run.tok.char_counts(), device=run.device)
        bpc = module.evaluate(run.model, batches, char_counts, run.device)[1]
        # NaN for a text of special tokens only, which JSON cannot carry.
        result["bpc"] = bpc if math.isfinite(bpc) else None
        # evaluate leaves the model in training mode, for train's loop.
        run.model.eval()
    return result


def token_info(tok, id, decoder):
    """A token as the page shows it: id, bytes in hex, and the text it completes."""
    data = tok.decode_bytes([id])
    return {"id": id, "bytes": data.hex(" "), "text": decoder.decode(data)}


def window(run, ids):
    """ids (a list) as a (1, T) tensor of the last block_size, on the model's device."""
    check(isinstance(ids, list) and ids, "no tokens to run")
    vocab_size = run.model.config.vocab_size
    valid = [type(id) is int and 0 <= id < vocab_size for id in ids]
    check(all(valid), f"token ids must be 0 to {vocab_size - 1}")
    return torch.tensor([ids[-run.model.config.block_size :]], device=run.device)


def next_logits(run, ids):
    """The logits (vocab_size,) that the model file's `stream` draws the token after ids
    from: those of the whole text where the model takes it (mistral.py's and mixtral.py's
    windows slide), else of its last block_size tokens."""
    idx = window(run, ids)
    if len(ids) > idx.size(1):
        try:
            return run.model(torch.tensor([ids], device=idx.device))[0][0, -1]
        except ValueError:  # longer than the context
            pass
    return run.model(idx)[0][0, -1]


def cut(logits, temperature, top_k, top_p):
    """The distribution sample_next draws from, for logits (vocab_size,): softmax at this
    temperature among the top_k likeliest, then the fewest of those holding top_p; 0 for the
    tokens cut."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return F.one_hot(logits.argmax(), logits.numel()).float()
    # As sample_next: the likeliest at 0, so that a tiny temperature gives -inf, never NaN.
    logits = logits.float() - logits.max()
    logits = logits / max(temperature, torch.finfo(logits.dtype).tiny)
    sorted_logits, order = logits.sort(descending=True)
    probs = F.softmax(sorted_logits, dim=-1)  # (vocab_size,), likeliest first
    if top_k is not None and top_k < probs.numel():
        # Ties with the k-th likeliest stay, as in sample_next.
        probs[sorted_logits < sorted_logits[top_k - 1]] = 0
        probs /= probs.sum()
    if top_p is not None and top_p < 1:
        # A token goes once those before it hold top_p; the first always stays.
        held_before = probs.cumsum(0) - probs
        probs[held_before >= top_p] = 0
        probs /= probs.sum()
    return torch.zeros_like(probs).scatter(0, order, probs)


def check_sampling(temperature, top_k, top_p):
    """PlaygroundError for sampling settings out of range."""
    check(isinstance(temperature, (int, float)) and 0 <= temperature <= 10,
          "temperature must be 0 to 10")
    # type(), not isinstance: True is an int to isinstance, but no top_k.
    check(top_k is None or (type(top_k) is int and top_k >= 1), "top_k must be at least 1")
    check(top_p is None or (isinstance(top_p, (int, float)) and 0 < top_p <= 1),
          "top_p must be in (0, 1]")


def distribution(run, ids, temperature=1.0, top_k=None, top_p=1.0):
    """The next token after ids: the TOP likeliest with their probability p (temperature 1)
    and q (drawn at these settings, after the cut), and how many tokens the cut keeps."""
    with torch.inference_mode():
        logits = next_logits(run, ids)  # (vocab_size,)
    p = F.softmax(logits.float(), dim=-1)
    q = cut(logits, temperature, top_k, top_p)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="backslashreplace")
    top = p.topk(min(TOP, p.numel()))
    rows = []
    for prob, id in zip(top.values.tolist(), top.indices.tolist()):
        decoder.reset()
        row = token_info(run.tok, id, decoder)
        rows.append({**row, "p": prob, "q": q[id].item()})
    return {"top": rows, "kept": int((q > 0).sum()), "kept_p": p[q > 0].sum().item()}


def inspect(run, ids):
    """One forward pass over ids, the last of which is the chosen token: every head's
    attention, and the experts of each token where the model has a mixture."""
    module = run.module
    idx = window(run, ids)
    T = idx.size(1)
    # The maps: the last tokens among themselves, wide enough to show where a window cuts.
    window_size = getattr(run.model.config, "sliding_window", None) or 0
    span = min(T, max(SPAN, min(MAX_SPAN, window_size + SPAN // 3)))
    rows = []
    corners = []
    routes = []
    attention = module.attention
    dispatch = getattr(module, "dispatch", None)

    def attention_tap(q, k, v, *args, **kwargs):
        B, n_head, _, _ = q.size()
        T_k = k.size(-2)
        # Attention is linear in v: with the identity for v its output is its weights.
        eye = torch.eye(T_k, dtype=q.dtype, device=q.device).expand(B, n_head, T_k, T_k)
        weights = attention(q, k, eye, *args, **kwargs)[0].float()  # (n_head, T, T_k)
        # Only what the page shows: a long text's whole maps would not fit in memory.
        rows.append(weights[:, -1].cpu())  # (n_head, T_k)
        corners.append(weights[:, -span:, -span:].cpu())  # (n_head, span, span)
        return attention(q, k, v, *args, **kwargs)

    def dispatch_tap(x, chosen, weights, experts):
        # chosen, weights (T, k): the layer is that of the attention just before.
        routes.append({"layer": len(rows) - 1, "n_expert": len(experts),
                       "chosen": chosen.tolist(), "weights": weights.float().tolist()})
        return dispatch(x, chosen, weights, experts)

    taps = {"attention": attention_tap, "FUSED": False}
    if dispatch:
        taps["dispatch"] = dispatch_tap
    with torch.inference_mode(), tapped(module, **taps):
        run.model(idx)
    rows = torch.stack(rows)  # (n_layer, n_head, T)
    corners = (torch.stack(corners) * 255).round().to(torch.uint8)  # (n_layer, n_head, span, span)
    return {
        "offset": len(ids) - T,
        # The chosen token's weights on every key it sees, and what went to no token.
        "rows": rows.tolist(),
        "none": (1 - rows.sum(-1)).clamp(min=0).tolist(),
        "span": span,
        "maps": base64.b64encode(corners.numpy().tobytes()).decode(),
        "experts": routes,
    }


def generate(run, ids, max_new_tokens, temperature, top_k, top_p, seed):
    """Yield each new token as the model file's own `stream` samples it, with p, the
    probability the model gave it (temperature 1), until max_new_tokens or end of text."""
    check(isinstance(max_new_tokens, int) and 1 <= max_new_tokens <= 2000,
          "max new tokens must be 1 to 2000")
    check_sampling(temperature, top_k, top_p)
    module = run.module
    sample_next = module.sample_next
    drawn_from = []

    def sample_tap(logits, *args, **kwargs):
        drawn_from.append(logits[0])
        return sample_next(logits, *args, **kwargs)

    check(type(seed) is int and 0 <= seed < 2**63, "the seed must be 0 to 2**63 - 1")
    torch.manual_seed(seed)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    idx = window(run, ids)
    with tapped(module, sample_next=sample_tap):
        stream = run.model.stream(idx, max_new_tokens, temperature, top_k, top_p)
        for token in stream:
            id = token.item()
            if id == run.tok.eos_id:
                return
            p = F.softmax(drawn_from.pop().float(), dim=-1)[id].item()
            yield {**token_info(run.tok, id, decoder), "p": p}


# -----------------------------------------------------------------------------
# The server


class Handler(BaseHTTPRequestHandler):
    """GET / is the page; POST /api/NAME runs NAME on a JSON body. No request names a file."""

    runs = []
    page = b""
    # One model computation at a time: the taps are module-wide.
    lock = threading.Lock()

    def do_GET(self):
        """The page, or the runs as the page is told of them."""
        if not self.from_here():
            return
        if self.path == "/":
            self.reply(200, self.page, "text/html; charset=utf-8")
        elif self.path == "/api/runs":
            self.reply_json([run.info for run in self.runs])
        else:
            self.reply_json({"error": f"no page {self.path}"}, 404)

    def do_POST(self):
        """A request of the page; its error as {"error": message}, the server going on."""
        if not self.from_here():
            return
        try:
            request = self.read_request()
            run = request.get("run", 0)
            check(type(run) is int and 0 <= run < len(self.runs), f"no run {run}")
            run = self.runs[run]
            check(not run.error, f"{run.name}: {run.error}")
            if self.path == "/api/generate":
                return self.stream_events(run, request)
            with self.lock:
                self.reply_json(self.answer(run, request))
        except KeyError as e:
            self.reply_json({"error": f"the request lacks {e}"}, 400)
        except (ValueError, TypeError) as e:
            self.reply_json({"error": str(e) or type(e).__name__}, 400)
        except torch.OutOfMemoryError:
            self.reply_json({"error": "out of memory: try a shorter text"}, 500)
        except Exception as e:  # a bug, said on the page rather than only in the terminal
            self.reply_json({"error": f"{type(e).__name__}: {e}"}, 500)

    def from_here(self):
        """Whether the request names this server as its host, not a name that a web page
        elsewhere points at 127.0.0.1 (DNS rebinding)."""
        host, port = self.server.server_address[:2]
        names = {f"{name}:{port}" for name in (host, "127.0.0.1", "localhost")}
        if self.headers.get("Host") in names:
            return True
        self.reply_json({"error": "this server answers only its own address"}, 403)
        return False

    def read_request(self):
        """The JSON object of a POST (which no form of another site can send)."""
        check(self.headers.get("Content-Type") == "application/json",
              "requests are application/json")
        length = int(self.headers.get("Content-Length", 0))
        check(0 < length <= MAX_BODY, "the request is empty or too large")
        request = json.loads(self.rfile.read(length))
        check(isinstance(request, dict), "the request is not a JSON object")
        return request

    def answer(self, run, request):
        """The reply to a request other than generate."""
        if self.path == "/api/tokens":
            return tokens(run, request["text"])
        if self.path == "/api/distribution":
            return distribution(run, request["ids"], request.get("temperature", 1.0),
                                request.get("top_k"), request.get("top_p", 1.0))
        if self.path == "/api/inspect":
            return inspect(run, request["ids"])
        raise PlaygroundError(f"no request {self.path}")

    def stream_events(self, run, request):
        """The new tokens as server-sent events, one JSON object each, then {"done": ...};
        an error after the first as {"error": ...}."""
        with self.lock:
            new = generate(run, request["ids"], request.get("max_new_tokens", 100),
                           request.get("temperature", 1.0), request.get("top_k"),
                           request.get("top_p", 1.0), request.get("seed", 0))
            # Closed here in any case, so that its taps are undone under the lock.
            with closing(new):
                # The first token, so that a bad setting gets an error reply, not a stream.
                start = time.time()
                first = next(new, None)
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.end_headers()
                self.send_stream(itertools.chain([first] if first else [], new), start)

    def send_stream(self, events, start):
        n_tokens = 0
        try:
            for event in events:
                self.send_event(event)
                n_tokens += 1
            speed = n_tokens / max(time.time() - start, 1e-9)
            self.send_event({"done": True, "tokens_per_s": speed})
        except (BrokenPipeError, ConnectionResetError):
            # The page went away, or asked again: this stream's work is done.
            pass
        except Exception as e:
            self.send_event({"error": f"{type(e).__name__}: {e}"})

    def send_event(self, event):
        self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
        self.wfile.flush()

    def reply_json(self, data, status=200):
        self.reply(status, json.dumps(data).encode(), "application/json")

    def reply(self, status, body, content_type):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        # Quiet: not every request in the terminal.
        pass


def serve(runs, host="127.0.0.1", port=8000):
    """An HTTP server for these runs (not yet serving): call serve_forever() on it."""
    handler = type("RunsHandler", (Handler,), {"runs": runs})
    handler.page = (ROOT / "playground.html").read_bytes()
    return ThreadingHTTPServer((host, port), handler)


def main(argv=None):
    """The command line: load the runs, then serve the page until Ctrl-C."""
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    parser.add_argument("--out-dir", nargs="+", default=[], help="training runs to show")
    parser.add_argument("--init-from", nargs="+", default=[], help="released model folders")
    parser.add_argument("--model", choices=MODELS, help="the model file of --init-from "
                        "(found from its config.json's model_type when not given)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, mps, ...")
    parser.add_argument("--host", default="127.0.0.1", help="the address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="0 for any free port")
    args = parser.parse_args(argv)
    if not args.out_dir and not args.init_from:
        parser.error("give --out-dir RUN ... or --init-from DIR ...")
    # Before the models load, which takes a while.
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be 0 to 65535, got {args.port}")
    runs = [load_run(out_dir=folder, device=args.device) for folder in args.out_dir]
    for folder in args.init_from:
        runs.append(load_run(init_from=folder, model_name=args.model, device=args.device))
    try:
        server = serve(runs, args.host, args.port)
    except OSError as e:
        print(f"error: cannot listen on {args.host}:{args.port} ({e.strerror})", file=sys.stderr)
        return 1
    host, port = server.server_address[:2]
    print(f"the playground is at http://{host}:{port}/ (Ctrl-C stops it)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
