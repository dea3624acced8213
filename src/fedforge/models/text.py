"""Models for token sequences (L,) with a vocabulary: PFLlib's text models and HtFLlib's heterogeneous text groups
(``HtFE-txt-*``).

Inputs are int64 token ids (N, L); id 0 is padding and sits at the end of each text (a text's length is the
position of its last non-zero id + 1). Every model is an embedding (padding row 0) followed by a feature extractor
and a linear head; ``feature_dim`` is PFLlib's ``-fd`` (512 by default), so every text model shares one 512-d
feature space (HtFL methods that exchange features need that).

* ``fasttext``: mean of the token embeddings over the text, Linear(d, d) → head (PFLlib's ``fastText``).
* ``text_lr``: mean of the token embeddings → head (HtFLlib's ``TextLogisticRegression``).
* ``textcnn``: convolutions of widths 3, 4, 5 (100 channels each) over the embeddings, ReLU, max over time, dropout
  (0.8 as PFLlib) → 300-d features → head (PFLlib's ``TextCNN``).
* ``lstm`` / ``gru``: a 2-layer LSTM/GRU (dropout 0.2 between layers), the last layer's output at each text's last
  token, ReLU (LSTM), dropout 0.2 → head (PFLlib's ``LSTMNet``, HtFLlib's ``GRUNet``).
* ``bilstm``: a 1-layer bidirectional LSTM, the forward state after the last token and the backward state after
  the first, Linear(2d, d) → head (PFLlib's ``BiLSTM_TextClassification`` without attention).
* ``transformer``: embedding · √d plus sinusoidal positions, dropout 0.1, a TransformerEncoder (8 heads, 2 layers,
  feed-forward 2048, dropout 0.1), the output at position 0 (the text's first token: PFLlib's converter puts a
  ``<cls>`` id there) → head (PFLlib's ``TransformerModel``; ``transformer-h{H}-l{L}`` for other head and layer
  counts, HtFLlib's ``HtFE-txt-5-*``).

Deliberate differences from the reference code, all about padding: the averages, the recurrent models' final
states and the transformer's attention ignore padding (the references average over it, read the LSTM's output at
the last padded position, take the backward LSTM's state at the last token, and attend to padding); PFLlib's
AG News files record every text's length as the padded length, so its models read padding as text.
No model ends in ``log_softmax`` (the cross-entropy applies it; HtFLlib's split, which keeps it inside the
feature extractor, is not reproduced).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn

from ..errors import ConfigError
from .groups import GROUPS
from .zoo import MODELS, FedModel

TOKENS = ("tokens",)
PAD = 0


def text_lengths(ids: torch.Tensor) -> torch.Tensor:
    """Length of each text: the position of its last non-padding id + 1 (at least 1)."""
    pos = torch.arange(1, ids.shape[1] + 1, device=ids.device)
    return ((ids != PAD).long() * pos).amax(dim=1).clamp(min=1)


def masked_mean(emb: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean of ``emb`` (N, L, d) over the non-padding positions of ``ids`` (N, L)."""
    keep = (ids != PAD).unsqueeze(-1).to(emb.dtype)
    return (emb * keep).sum(1) / keep.sum(1).clamp(min=1.0)


def _length(input_shape: tuple[int, ...], name: str) -> int:
    if len(input_shape) != 1:
        raise ConfigError(f"model '{name}' takes token ids (L,), got input shape {tuple(input_shape)}.")
    return int(input_shape[0])


class MeanEmbedding(nn.Module):
    """Token embedding averaged over the text, optionally followed by Linear(d, d) (fastText's hidden layer)."""

    def __init__(self, vocab_size: int, dim: int, hidden: bool, padding_idx: int | None = PAD):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, dim, padding_idx=padding_idx)
        self.fc = nn.Linear(dim, dim) if hidden else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = x.long()
        return self.fc(masked_mean(self.embedding(ids), ids))


class TextConv(nn.Module):
    """Kim's CNN: Conv1d over the embeddings for each kernel width, ReLU, max over time, concatenated, dropout."""

    def __init__(self, vocab_size: int, dim: int, channels: int, kernels: Sequence[int], dropout: float):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, dim, padding_idx=PAD)
        self.convs = nn.ModuleList(nn.Conv1d(dim, channels, k) for k in kernels)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.embedding(x.long()).transpose(1, 2)
        return self.dropout(torch.cat([torch.relu(conv(e)).amax(dim=2) for conv in self.convs], dim=1))


class Recurrent(nn.Module):
    """A unidirectional LSTM/GRU over the embeddings; the last layer's output at each text's last token."""

    def __init__(self, vocab_size: int, dim: int, cell: str, layers: int, dropout: float, relu: bool):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, dim, padding_idx=PAD)
        rnn = nn.LSTM if cell == "lstm" else nn.GRU
        self.rnn = rnn(dim, dim, num_layers=layers, dropout=dropout if layers > 1 else 0.0, batch_first=True)
        self.relu = relu
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = x.long()
        out, _ = self.rnn(self.embedding(ids))  # a unidirectional output at t has read tokens 0..t only
        last = out[torch.arange(ids.shape[0], device=ids.device), text_lengths(ids) - 1]
        return self.dropout(torch.relu(last) if self.relu else last)


class BiRecurrent(nn.Module):
    """A bidirectional LSTM over each text's own tokens (packed); both final states, Linear(2d, d)."""

    def __init__(self, vocab_size: int, dim: int, dropout: float = 0.0):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, dim, padding_idx=PAD)
        self.lstm = nn.LSTM(dim, dim, num_layers=1, bidirectional=True, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = x.long()
        packed = nn.utils.rnn.pack_padded_sequence(self.embedding(ids), text_lengths(ids).cpu(), batch_first=True,
                                                   enforce_sorted=False)
        _, (h, _) = self.lstm(packed)  # h: (2, N, d), forward then backward final states
        return self.fc(self.dropout(torch.cat([h[0], h[1]], dim=1)))


class PositionalEncoding(nn.Module):
    """Sinusoidal positions (Vaswani et al. 2017) added to (N, L, d) inputs, then dropout."""

    def __init__(self, dim: int, max_len: int, dropout: float):
        super().__init__()
        pos = torch.arange(max_len, dtype=torch.float32).unsqueeze(1)
        freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
        pe = torch.zeros(1, max_len, dim)
        pe[0, :, 0::2] = torch.sin(pos * freq)
        pe[0, :, 1::2] = torch.cos(pos * freq[: dim // 2])
        self.register_buffer("pe", pe, persistent=False)  # a fixed table: never sent or averaged
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(x + self.pe[:, : x.shape[1]])


class TextEncoder(nn.Module):
    """Embedding · √d + positions → TransformerEncoder (padding masked) → the output at position 0."""

    def __init__(self, vocab_size: int, dim: int, max_len: int, heads: int, layers: int, ff: int, dropout: float):
        super().__init__()
        self.dim = dim
        self.embedding = nn.Embedding(vocab_size, dim)
        self.positions = PositionalEncoding(dim, max_len, dropout)
        layer = nn.TransformerEncoderLayer(dim, heads, ff, dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)  # PFLlib's init_weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = x.long()
        pad = ids == PAD
        pad[:, 0] = False  # position 0 is always attended (an all-padding text would otherwise give NaN)
        z = self.positions(self.embedding(ids) * math.sqrt(self.dim))
        return self.encoder(z, src_key_padding_mask=pad)[:, 0]


# ---------------------------------------------------------------------------------------------- factories
def _head(feature_dim: int, num_classes: int, uniform: bool = False) -> nn.Linear:
    head = nn.Linear(feature_dim, num_classes)
    if uniform:  # PFLlib's TransformerModel.init_weights
        nn.init.uniform_(head.weight, -0.1, 0.1)
        nn.init.zeros_(head.bias)
    return head


@MODELS.register("fasttext", inputs=TOKENS, summary="fastText (PFLlib): mean token embedding → Linear(512, 512) → head")
def fasttext(input_shape: tuple[int, ...], num_classes: int, vocab_size: int, feature_dim: int = 512) -> FedModel:
    _length(input_shape, "fasttext")
    return FedModel(MeanEmbedding(vocab_size, feature_dim, hidden=True), _head(feature_dim, num_classes), feature_dim,
                    "fasttext")


@MODELS.register("text_lr", inputs=TOKENS, summary="text logistic regression (HtFLlib): mean token embedding → head")
def text_lr(input_shape: tuple[int, ...], num_classes: int, vocab_size: int, feature_dim: int = 512) -> FedModel:
    _length(input_shape, "text_lr")
    return FedModel(MeanEmbedding(vocab_size, feature_dim, hidden=False, padding_idx=None),
                    _head(feature_dim, num_classes), feature_dim, "text_lr")


@MODELS.register("textcnn", inputs=TOKENS,
                 summary="TextCNN (Kim 2014; PFLlib): conv 3/4/5 × 100 over 512-d embeddings, max over time, dropout "
                         "0.8 → 300-d → head")
def textcnn(input_shape: tuple[int, ...], num_classes: int, vocab_size: int, feature_dim: int = 512,
            channels: int = 100, kernels: Sequence[int] = (3, 4, 5), dropout: float = 0.8) -> FedModel:
    length = _length(input_shape, "textcnn")
    if length < max(kernels):
        raise ConfigError(f"model 'textcnn' needs texts of at least {max(kernels)} tokens (its widest convolution), "
                          f"got {length}.")
    width = channels * len(kernels)
    return FedModel(TextConv(vocab_size, feature_dim, channels, kernels, dropout), _head(width, num_classes), width,
                    "textcnn")


@MODELS.register("lstm", inputs=TOKENS, summary="LSTM (PFLlib's LSTMNet): 2 layers of 512, output at the last token, "
                                                "ReLU, dropout 0.2 → head")
def lstm(input_shape: tuple[int, ...], num_classes: int, vocab_size: int, feature_dim: int = 512,
         layers: int = 2, dropout: float = 0.2) -> FedModel:
    _length(input_shape, "lstm")
    return FedModel(Recurrent(vocab_size, feature_dim, "lstm", layers, dropout, relu=True),
                    _head(feature_dim, num_classes), feature_dim, "lstm")


@MODELS.register("gru", inputs=TOKENS, summary="GRU (HtFLlib's GRUNet): 2 layers of 512, output at the last token, "
                                               "dropout 0.2 → head")
def gru(input_shape: tuple[int, ...], num_classes: int, vocab_size: int, feature_dim: int = 512,
        layers: int = 2, dropout: float = 0.2) -> FedModel:
    _length(input_shape, "gru")
    return FedModel(Recurrent(vocab_size, feature_dim, "gru", layers, dropout, relu=False),
                    _head(feature_dim, num_classes), feature_dim, "gru")


@MODELS.register("bilstm", inputs=TOKENS, summary="bidirectional LSTM (PFLlib's BiLSTM_TextClassification, no "
                                                  "attention): 1 layer of 512 each way → Linear(1024, 512) → head")
def bilstm(input_shape: tuple[int, ...], num_classes: int, vocab_size: int, feature_dim: int = 512,
           dropout: float = 0.0) -> FedModel:
    _length(input_shape, "bilstm")
    return FedModel(BiRecurrent(vocab_size, feature_dim, dropout), _head(feature_dim, num_classes), feature_dim, "bilstm")


def _transformer(name: str, heads: int, layers: int):
    def build(input_shape: tuple[int, ...], num_classes: int, vocab_size: int, feature_dim: int = 512,
              ff: int = 2048, dropout: float = 0.1) -> FedModel:
        length = _length(input_shape, name)
        if feature_dim % heads or feature_dim % 2:
            raise ConfigError(f"model '{name}' needs an even feature_dim divisible by its {heads} heads, got {feature_dim}.")
        return FedModel(TextEncoder(vocab_size, feature_dim, length, heads, layers, ff, dropout),
                        _head(feature_dim, num_classes, uniform=True), feature_dim, name)

    return build


MODELS.add("transformer", _transformer("transformer", 8, 2), inputs=TOKENS,
           summary="small Transformer encoder (PFLlib's TransformerModel): d 512, 8 heads, 2 layers, output at "
                   "position 0 → head")
_TRANSFORMERS = sorted({(8, n) for n in (1, 2, 4, 8, 16)} | {(h, 4) for h in (1, 2, 4, 8, 16)}
                       | {(n, n) for n in (1, 2, 4, 8, 16)})
for _h, _l in _TRANSFORMERS:
    MODELS.add(f"transformer-h{_h}-l{_l}", _transformer(f"transformer-h{_h}-l{_l}", _h, _l), inputs=TOKENS,
               summary=f"Transformer encoder, d 512, {_h} head(s), {_l} layer(s) (HtFLlib's HtFE-txt-5 members)")

_GROUPS = {
    "htfe-txt-2": (["fasttext", "text_lr"], "HtFLlib HtFE-txt-2: fastText, text logistic regression"),
    "htfe-txt-4": (["fasttext", "text_lr", "lstm", "bilstm"], "HtFLlib HtFE-txt-4: fastText, text LR, LSTM, BiLSTM"),
    "htfe-txt-5-1": ([f"transformer-h8-l{n}" for n in (1, 2, 4, 8, 16)],
                     "HtFLlib HtFE-txt-5-1: Transformers with 8 heads and 1/2/4/8/16 layers"),
    "htfe-txt-5-2": ([f"transformer-h{h}-l4" for h in (1, 2, 4, 8, 16)],
                     "HtFLlib HtFE-txt-5-2: Transformers with 4 layers and 1/2/4/8/16 heads"),
    "htfe-txt-5-3": ([f"transformer-h{n}-l{n}" for n in (1, 2, 4, 8, 16)],
                     "HtFLlib HtFE-txt-5-3: Transformers with n heads and n layers, n = 1/2/4/8/16"),
    "htfe-txt-6": (["fasttext", "lstm", "bilstm", "transformer", "text_lr", "gru"],
                   "HtFLlib HtFE-txt-6: fastText, LSTM, BiLSTM, Transformer, text LR, GRU"),
}
for _g, (_members, _text) in _GROUPS.items():
    GROUPS.add(_g, list(_members), summary=_text)

__all__ = ["BiRecurrent", "MeanEmbedding", "PositionalEncoding", "Recurrent", "TextConv", "TextEncoder", "masked_mean",
           "text_lengths"]
