"""The batch-size sweep's learning tasks: real data split into train and test, and the model each
trains. ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes) and
an MLP; ``chars``: next-character prediction on an English-like corpus generated here from a small
grammar (fixed seed, nothing downloaded) and a small causal transformer.
"""

import random
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

TASKS = ("digits", "chars")
SPLIT_SEED = 0  # the train/test split and the corpus stay fixed; --seed changes init and data order

# model widths per size preset (cases.SIZES): the CPU default is `small`, CUDA's `full`
WIDTHS = {"digits": {"tiny": 64, "small": 128, "medium": 256, "full": 512},
          "chars": {"tiny": 32, "small": 64, "medium": 128, "full": 256}}


@dataclass
class Task:
    name: str
    description: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    config: dict  # the model's constructor arguments

    @property
    def n_train(self):
        return len(self.x_train)

    def build_model(self, device, seed):
        torch.manual_seed(seed)
        model = (CharTransformer(**self.config) if self.name == "chars" else mlp(**self.config))
        return model.to(device)

    def to(self, device):
        for key in ("x_train", "y_train", "x_test", "y_test"):
            setattr(self, key, getattr(self, key).to(device))
        return self


def mlp(in_dim, width, classes):
    return nn.Sequential(nn.Linear(in_dim, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, classes))


class CharTransformer(nn.Module):
    """Character embedding, learned positions, pre-norm causal transformer blocks, a linear head."""

    def __init__(self, vocab, d, heads, layers, seq):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(seq, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq), persistent=False)

    def forward(self, tokens):
        n = tokens.shape[1]
        h = self.embed(tokens) + self.pos[:n]
        return self.head(self.norm(self.blocks(h, mask=self.mask[:n, :n], is_causal=True)))


def loss_fn(out, y):
    """Mean cross-entropy over samples (and over positions, for the character model)."""
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def accuracy(out, y):
    return (out.argmax(-1) == y).float().mean().item()


# ---------------------------------------------------------------- digits

def load_digits_task(preset, max_train=None):
    """scikit-learn's digits: pixels scaled to [0, 1], 80/20 split drawn once (SPLIT_SEED)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise RuntimeError("the digits task needs scikit-learn: pip install -e '.[bench]'") from exc
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_test = len(x) // 5
    test, train = order[:n_test], order[n_test:]
    if max_train is not None:
        train = train[:max_train]
    return Task("digits", f"scikit-learn digits (8x8 images, 10 classes): {len(train):,} train, {n_test:,} test "
                "images", x[train], y[train], x[test], y[test],
                dict(in_dim=x.shape[1], width=WIDTHS["digits"][preset], classes=10))


# ---------------------------------------------------------------- generated text

WORDS = {
    "det": ["the", "a", "every", "one", "no"],
    "adj": ["small", "old", "green", "quick", "quiet", "heavy", "bright", "lazy", "round", "sharp"],
    "noun": ["dog", "cat", "river", "house", "engine", "garden", "teacher", "window", "bird", "stone", "letter",
             "market"],
    "verb": ["sees", "finds", "carries", "follows", "paints", "moves", "watches", "builds", "opens", "helps"],
    "prep": ["near", "under", "behind", "beside", "over"],
}


def sentence(rng):
    """One sentence of a small grammar: det [adj] noun verb det [adj] noun [prep det noun]."""
    def phrase():
        words = [rng.choice(WORDS["det"])]
        if rng.random() < 0.6:
            words.append(rng.choice(WORDS["adj"]))
        return words + [rng.choice(WORDS["noun"])]

    words = phrase() + [rng.choice(WORDS["verb"])] + phrase()
    if rng.random() < 0.4:
        words += [rng.choice(WORDS["prep"])] + phrase()
    return " ".join(words) + ". "


def generate_corpus(n_chars, seed=SPLIT_SEED):
    rng = random.Random(seed)
    parts, size = [], 0
    while size < n_chars:
        parts.append(sentence(rng))
        size += len(parts[-1])
    return "".join(parts)[:n_chars]


def load_chars_task(preset, n_train=512, n_test=128, seq=32, max_train=None):
    """Next-character prediction on generated text: `n_train` + `n_test` windows of `seq + 1`
    characters, cut one after another from one corpus (test windows last, never seen in training)."""
    text = generate_corpus((n_train + n_test) * (seq + 1))
    alphabet = sorted(set("".join(w for group in WORDS.values() for w in group)) | {" ", "."})
    index = {c: i for i, c in enumerate(alphabet)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.long).view(n_train + n_test, seq + 1)
    train, test = ids[:n_train], ids[n_train:]
    if max_train is not None:
        train = train[:max_train]
    d = WIDTHS["chars"][preset]
    return Task("chars", f"next character of generated English-like text ({len(alphabet)} symbols): "
                f"{len(train):,} train, {n_test:,} test windows of {seq} characters",
                train[:, :-1], train[:, 1:], test[:, :-1], test[:, 1:],
                dict(vocab=len(alphabet), d=d, heads=4 if d >= 64 else 2, layers=2, seq=seq))


def load(name, preset, max_train=None):
    if name == "digits":
        return load_digits_task(preset, max_train)
    if name == "chars":
        return load_chars_task(preset, max_train=max_train)
    raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
