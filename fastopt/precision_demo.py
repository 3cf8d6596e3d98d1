"""``fastopt demo --precision``: a small language model trained in each storage format,
with fastopt.torch.AdamW (needs torch; matplotlib draws the curves).

    fastopt demo --precision [--steps 300] [--out fastopt-demo]

The model is torch's own ``nn.TransformerEncoder`` (causal mask, two layers, width 64)
over the characters of a text nobody here wrote (the source of Python's ``json``
package, from the standard library), the same batches for every run. Each run starts
from the same float32 weights:

- ``float32``: the model and the optimizer in float32;
- ``bf16 + fp32 master``: the model in bfloat16, float32 master weights;
- ``bf16 + master, bf16 state``: the same, with bfloat16 Adam state;
- ``bf16 + remainder``: float32 master weights kept as their low 16 bits beside the
  bfloat16 weights, which should train as ``bf16 + fp32 master`` does;
- ``bf16, no master, stochastic``: bfloat16 weights updated directly, rounded
  stochastically;
- ``bf16, no master, nearest``: the same rounded to nearest, the control that shows why
  the other two exist: small updates round away;
- ``float32, int8 state`` and ``bf16 + remainder, int8 state``: the moving averages in
  8 bits, block-wise (fastopt's smallest formats: 10 and 8 bytes a parameter kept);
- ``bitsandbytes AdamW8bit``: its 8-bit AdamW on the float32 model, where bitsandbytes
  is installed;
- ``torch AdamW, bf16``: torch.optim.AdamW on the bfloat16 model (state in bfloat16,
  no master weights), what the model gets without fastopt.

It prints each run's final training loss (the mean over the last 20 steps) and its
held-out loss (the model in float32 on 16 batches it never trained on) against
float32's, and with matplotlib draws the curves into ``precision-training.png``.
"""

import importlib.util
import inspect
import json
from pathlib import Path

import numpy as np
import torch

from . import torch as ft

RUNS = {
    "float32": (torch.float32, {}),
    "bf16 + fp32 master": (torch.bfloat16, {}),
    "bf16 + master, bf16 state": (torch.bfloat16, dict(state_dtype="bfloat16")),
    "bf16 + remainder": (torch.bfloat16, dict(master_weights="remainder")),
    "bf16, no master, stochastic": (torch.bfloat16, dict(master_weights=None,
                                                         stochastic_rounding=True)),
    "bf16, no master, nearest": (torch.bfloat16, dict(master_weights=None)),
    "float32, int8 state": (torch.float32, dict(state_dtype="int8")),
    "bf16 + remainder, int8 state": (torch.bfloat16, dict(master_weights="remainder",
                                                          state_dtype="int8")),
    "torch AdamW, bf16": (torch.bfloat16, None),
    "bitsandbytes AdamW8bit": (torch.float32, "bitsandbytes"),
}
CONTEXT, BATCH, WIDTH = 64, 16, 64


class LanguageModel(torch.nn.Module):
    def __init__(self, vocabulary):
        super().__init__()
        self.embed = torch.nn.Embedding(vocabulary, WIDTH)
        self.position = torch.nn.Parameter(torch.randn(CONTEXT, WIDTH) * 0.02)
        layer = torch.nn.TransformerEncoderLayer(WIDTH, nhead=4, dim_feedforward=4 * WIDTH,
                                                 dropout=0.0, batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, num_layers=2,
                                                   enable_nested_tensor=False)
        self.head = torch.nn.Linear(WIDTH, vocabulary)

    def forward(self, tokens):
        mask = torch.nn.Transformer.generate_square_subsequent_mask(tokens.shape[1])
        x = self.embed(tokens) + self.position[:tokens.shape[1]]
        return self.head(self.encoder(x, mask=mask.to(x.dtype), is_causal=True))


def corpus():
    text = inspect.getsource(json.decoder) + inspect.getsource(json.encoder)
    alphabet = sorted(set(text))
    return np.array([alphabet.index(c) for c in text], np.int64), len(alphabet)


def held_out(model, tokens, vocabulary):
    """The mean loss of ``model``, in float32, on 16 batches of the last tenth of the
    text (which training does not see)."""
    model = model.float().eval()
    with torch.no_grad():
        losses = [torch.nn.functional.cross_entropy(
                      model(x).reshape(-1, vocabulary), y.reshape(-1)).item()
                  for x, y in batches(tokens[-tokens.size // 10:], 16, seed=1)]
    return float(np.mean(losses))


def batches(tokens, steps, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        starts = rng.integers(0, tokens.size - CONTEXT - 1, BATCH)
        window = np.stack([tokens[s:s + CONTEXT + 1] for s in starts])
        yield torch.from_numpy(window[:, :-1]), torch.from_numpy(window[:, 1:])


def train(label, steps, tokens, vocabulary, initial):
    dtype, options = RUNS[label]
    model = LanguageModel(vocabulary)
    model.load_state_dict(initial)
    model.to(dtype)
    if options is None:
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    elif options == "bitsandbytes":
        import bitsandbytes

        opt = bitsandbytes.optim.AdamW8bit(model.parameters(), lr=3e-3, weight_decay=0.01)
    else:
        opt = ft.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01, **options)
    losses = []
    tokens, held = tokens[:-tokens.size // 10], tokens
    for x, y in batches(tokens, steps):
        opt.zero_grad()
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, vocabulary),
                                                 y.reshape(-1))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, held_out(model, held, vocabulary)


def train_all(steps):
    """``(curves, held-out losses)`` by run label: every run of ``RUNS`` (bitsandbytes'
    where it is installed) for ``steps`` steps from the same weights and batches."""
    torch.manual_seed(0)
    tokens, vocabulary = corpus()
    initial = LanguageModel(vocabulary).state_dict()
    curves, evaluations = {}, {}
    for label in RUNS:
        if RUNS[label][1] == "bitsandbytes" and importlib.util.find_spec("bitsandbytes") is None:
            continue
        curves[label], evaluations[label] = train(label, steps, tokens, vocabulary, initial)
    return curves, evaluations


def run(out="fastopt-demo", steps=300):
    """Train every run, print the table, and draw the curves into ``out``."""
    curves, evaluations = train_all(steps)
    print(f"{'run':30s} {'train loss':>10s} {'vs fp32':>8s} {'held out':>9s} {'vs fp32':>8s}")
    reference = np.mean(curves["float32"][-20:])
    for label, losses in curves.items():
        final, held = np.mean(losses[-20:]), evaluations[label]
        print(f"{label:30s} {final:10.4f} {100 * (final / reference - 1):+7.2f}% {held:9.4f} "
              f"{100 * (held / evaluations['float32'] - 1):+7.2f}%")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot: matplotlib missing")
        return 0
    figure, axes = plt.subplots(figsize=(8, 5))
    for label, losses in curves.items():
        smooth = np.convolve(losses, np.ones(10) / 10, mode="valid")
        axes.plot(smooth, label=label)
    axes.set(xlabel="step", ylabel="cross-entropy (10-step mean)",
             title="TransformerEncoder LM: AdamW in each storage format")
    axes.legend()
    path = Path(out) / "precision-training.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    print(f"wrote {path}")
    return 0
