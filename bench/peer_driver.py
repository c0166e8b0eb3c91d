"""The authors' PyTorch SDIM (github.com/p3i0t/robust-generative-classifier), timed for
bench.peer in a python with torch: their model, their training step and their class scoring,
imported from --peer_dir, never copied. Imports only the standard library, torch and their
code: it runs outside sdim-tf's environment.

    PYTHON_WITH_TORCH -I bench/peer_driver.py --peer_dir=DIR [--n=1 --rep_dim=64 ...]

One JSON object per line. The driver first writes {"ready": {...}} or, when DIR lacks their
code or the python cannot import torch or their code, {"error": "..."} and exits 2. Then one
reply per request read from stdin, until {"op": "exit"} or the end of stdin:

    {"op": "train", "precision": P, "batch_size": B, "warmup": W, "steps": S}
        -> {"seconds": wall seconds of the S steps after W untimed ones, ...}
    {"op": "serve", "precision": P, "batch_size": B, "warmup": W, "calls": C}
        -> {"seconds": [wall seconds of each of the C calls after W untimed ones], ...}

each with "wall_seconds" and "cpu_seconds" (the process's, all threads) of the timed part.

P: float32, or bfloat16 (torch.autocast on the CPU; {"unavailable": why} where it fails).
A request that fails: {"error": "..."}. Their prints go to stderr; stdout carries replies only.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import pathlib
import sys
import time

# What their SDIM imports (sdim.py: resnet, mi_networks, losses.dim_losses -> gan_losses, misc)
THEIR_FILES = ("sdim.py", "resnet.py", "mi_networks.py", "losses/__init__.py",
               "losses/dim_losses.py", "losses/gan_losses.py", "losses/misc.py")
PRECISIONS = ("float32", "bfloat16")


class Refusal(Exception):
    """What the driver cannot run on: one line for bench.peer to show."""


def load(peer_dir: str):
    """(torch, their sdim module), or Refusal naming what is missing."""
    folder = pathlib.Path(peer_dir)
    missing = [f for f in THEIR_FILES if not (folder / f).is_file()]
    if missing:
        raise Refusal(f"--peer_dir={peer_dir} lacks the authors' code ({', '.join(missing)}); "
                      "give a checkout of github.com/p3i0t/robust-generative-classifier")
    if importlib.util.find_spec("torch") is None:
        raise Refusal(f"--peer_python={sys.executable} cannot import torch; give a python "
                      "with torch (pip install torch, or sdim-tf's [peer] extra)")
    try:
        import torch
    except Exception as e:  # a broken install: its own words
        raise Refusal(f"--peer_python={sys.executable} cannot import torch: "
                      f"{type(e).__name__}: {e}") from None
    sys.path.insert(0, str(folder.resolve()))
    try:
        import sdim
    except Exception as e:
        raise Refusal(f"--peer_dir={peer_dir}: importing the authors' sdim.py failed under "
                      f"{sys.executable}: {type(e).__name__}: {e}") from None
    return torch, sdim


@contextlib.contextmanager
def bool_masks(torch):
    """Their mi_networks.py (written for torch 1.1) initializes a shortcut with
    masked_fill_(uint8 mask), which later torch refuses: while their model is built, uint8
    masks are read as bool, as torch 1.1 did. Their code runs unchanged otherwise."""
    original = torch.Tensor.masked_fill_

    def masked_fill_(self, mask, value):
        return original(self, mask.bool() if mask.dtype == torch.uint8 else mask, value)

    torch.Tensor.masked_fill_ = masked_fill_
    try:
        yield
    finally:
        torch.Tensor.masked_fill_ = original


class TheirSDIM:
    """Their SDIM of the size asked for, one model per (use, precision), on random batches."""

    def __init__(self, torch, sdim, args):
        self.torch, self.sdim, self.args = torch, sdim, args
        self.trainers, self.servers = {}, {}

    def model(self):
        a = self.args
        self.torch.manual_seed(a.seed)
        with bool_masks(self.torch):
            return self.sdim.SDIM(rep_size=a.rep_dim, n_classes=10, mi_units=a.mi_units,
                                  encoder_name=f"resnet{8 * a.n + 2}", image_channel=1,
                                  margin=a.margin, alpha=a.alpha, beta=a.beta, gamma=a.gamma)

    def info(self) -> dict:
        torch = self.torch
        return {"torch": torch.__version__, "python": sys.version.split()[0],
                "threads": torch.get_num_threads(),
                "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "parameters": self.sdim.cal_parameters(self.model()),
                "model": {k: v for k, v in vars(self.args).items() if k != "peer_dir"}
                | {"encoder": f"resnet{8 * self.args.n + 2}"}}

    def autocast(self, precision: str):
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r}; known: {', '.join(PRECISIONS)}")
        return self.torch.autocast("cpu", dtype=self.torch.bfloat16,
                                   enabled=precision == "bfloat16")

    def train_step(self, precision: str, batch_size: int):
        """Their main.train's step: zero_grad, eval_losses, backward, Adam step, .item()s."""
        torch = self.torch
        key = (precision, batch_size)
        if key not in self.trainers:
            model = self.model()
            model.train()
            optimizer = torch.optim.Adam(model.parameters(), lr=self.args.learning_rate)
            generator = torch.Generator().manual_seed(self.args.seed)
            images = torch.rand(4 * batch_size, 1, 32, 32, generator=generator)
            labels = torch.randint(0, 10, (4 * batch_size,), generator=generator)
            batches = [(images[i::4], labels[i::4]) for i in range(4)]
            self.trainers[key] = (model, optimizer, batches, [0])
        model, optimizer, batches, count = self.trainers[key]

        def step():
            x, y = batches[count[0] % 4]
            count[0] += 1
            optimizer.zero_grad()
            with self.autocast(precision):
                losses = model.eval_losses(x, y)
            losses[0].backward()
            optimizer.step()
            return [value.item() for value in losses]

        return step

    def serve_call(self, precision: str, batch_size: int):
        """Their inference with rejection: log-likelihoods, the best class, rejected where its
        log-likelihood is below the class threshold (0 here), under torch.no_grad."""
        torch = self.torch
        key = (precision, batch_size)
        if key not in self.servers:
            model = self.model()
            model.eval()
            generator = torch.Generator().manual_seed(self.args.seed)
            images = torch.rand(batch_size, 1, 32, 32, generator=generator)
            self.servers[key] = (model, images, torch.zeros(10))
        model, images, thresholds = self.servers[key]

        def call():
            with torch.no_grad(), self.autocast(precision):
                log_lik = model(images)
                values, pred = log_lik.max(dim=1)
                return pred, values < thresholds[pred]

        return call

    def handle(self, request: dict) -> dict:
        op, precision = request["op"], request.get("precision", "float32")
        if op == "train":
            step = self.train_step(precision, request["batch_size"])
            calls, timed = request["steps"], False
        elif op == "serve":
            step = self.serve_call(precision, request["batch_size"])
            calls, timed = request["calls"], True
        else:
            raise ValueError(f"unknown op {op!r}; known: train, serve, exit")
        try:
            for _ in range(request.get("warmup", 0)):
                step()
        except Exception as e:
            if precision == "bfloat16":
                return {"unavailable": f"torch.autocast(cpu, bfloat16): {type(e).__name__}: {e}"}
            raise
        seconds = []
        cpu, wall = time.process_time(), time.perf_counter()
        started = wall
        for _ in range(calls):
            step()
            if timed:
                seconds.append(time.perf_counter() - started)
                started = time.perf_counter()
        wall = time.perf_counter() - wall
        return {"seconds": seconds if timed else wall, "wall_seconds": wall,
                "cpu_seconds": time.process_time() - cpu}


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peer_dir", required=True)
    parser.add_argument("--n", type=int, default=1, help="ResNet depth 8n+2")
    parser.add_argument("--rep_dim", type=int, default=64)
    parser.add_argument("--mi_units", type=int, default=256)
    parser.add_argument("--margin", type=float, default=10.0)
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--beta", type=float, default=1.0)
    parser.add_argument("--gamma", type=float, default=1.0)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # their prints (and torch's) to stderr

    def reply(obj):
        replies.write(json.dumps(obj) + "\n")
        replies.flush()

    try:
        peer = TheirSDIM(*load(args.peer_dir), args)
        ready = peer.info()
    except Refusal as e:
        reply({"error": str(e)})
        return 2
    except Exception as e:
        reply({"error": f"building the authors' SDIM from --peer_dir={args.peer_dir} failed: "
                        f"{type(e).__name__}: {e}"})
        return 2
    reply({"ready": ready})
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("op") == "exit":
            break
        try:
            reply(peer.handle(request))
        except Exception as e:
            reply({"error": f"{request.get('op')}: {type(e).__name__}: {e}"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
