"""FC-Siam-diff (Daudt, Le Saux, Boulch, ICIP 2018): the second network of SPEC section 4b.

A shared encoder of four stages (widths ``w1..w4``, 2, 2, 3, 3 conv3x3-BN-ReLU-dropout blocks,
2x2 max pooling between stages), and a decoder that at each level upsamples with a stride-2
transposed convolution, concatenates ``|E_k(x1) - E_k(x2)|`` of the matching encoder stage, and
runs as many conv3x3-BN-ReLU-dropout blocks as that stage has (the last one halving the width);
a 3x3 convolution gives the logits. About 1.35 M parameters for 3 bands and the published widths.
Forward and backward are composed from ``functional``'s stateless layer pairs, like
``TinySiamCD``'s, and the distillation taps carry the same names and resolutions:

* ``E1 .. E4``: the last block of each encoder stage, ``(t1 features, t2 features)`` at
  ``H / 2^(k-1)``;
* ``d1``: the last decoder block before the head (``w1`` channels at full resolution).

Choices (docs/MATH.md section 7.8 has the layers' derivations):

* The encoder runs once on the stacked pair ``[x1; x2]``, as in ``TinySiamCD`` (BatchNorm batch
  statistics over both phases).
* The deepest decoder input (``bottleneck``) is by default ``|P(E4(x1)) - P(E4(x2))|``, the absolute
  difference of the pooled last stage, which keeps the network symmetric in its two images, as every
  other input of the decoder is. The published code feeds the second image's pooled features there
  (a variable reused across the two passes of its encoder): ``bottleneck="t2"``. With ``"diff"`` the
  decoder sees only differences of features, nothing of what the scene holds; ``"t2"`` and
  ``"mean"`` (``(P(E4(x1)) + P(E4(x2))) / 2``, symmetric) give it the scene's content at the coarsest
  level. Same parameters in all three; the backward pass of the last two routes the gradient to the
  t2 half, or half of it to each (docs/MATH.md 7.8).
* The published decoder's stride-1 "transposed convolutions" are 3x3 convolutions with padding 1
  (the same function with the kernel flipped and transposed), written as such; the upsampling
  layers are true transposed convolutions (3x3, stride 2, padding 1, output padding 1), with bias.
* Convolutions followed by BatchNorm carry no bias (SPEC 4b). One logit per pixel and the binary
  cross-entropy replace the published two-class log-softmax (the same model family).
* Dropout is channel dropout (PyTorch's ``Dropout2d``, rate ``dropout``, 0.2 as published) after
  every block, in training only. Its masks are drawn on the host from the ``rng`` given to
  ``forward`` (the training loop passes one per step, so runs repeat and resume bit for bit), else
  from the model's own generator; under data parallelism every rank draws the global batch's masks
  and keeps its shard's, so the masks do not depend on the number of ranks. Within this project's
  budgets dropout 0 or 0.1 trained better than 0.2 on the synthetic and SZTAKI validation sets
  (docs/studies/sztaki-fc-siam-diff_notes.md); 0.2 stays the default because it is the published form.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from . import backend
from .backend import array_namespace
from .functional import (
    absdiff_backward,
    absdiff_forward,
    cbr_backward,
    cbr_folded_forward,
    cbr_forward,
    concat_backward,
    concat_forward,
    conv2d_backward,
    conv2d_forward,
    conv_transpose2d_backward,
    conv_transpose2d_forward,
    dropout2d_backward,
    dropout2d_forward,
    dropout2d_mask,
    maxpool2x2_backward,
    maxpool2x2_forward,
)
from .model import (
    BN_EPS,
    DEFAULT_WIDTHS,
    InputNormalisation,
    ModelState,
    checked_config,
    checked_tap_grads,
)

__all__ = ["FCSiamDiff", "STAGE_DEPTHS", "fc_layer_table", "DEFAULT_DROPOUT", "BOTTLENECKS"]

#: Blocks per encoder stage (and per decoder level), as published.
STAGE_DEPTHS = (2, 2, 3, 3)
DEFAULT_DROPOUT = 0.2
#: What the decoder starts from (the module's docstring): the default first.
BOTTLENECKS = ("diff", "t2", "mean")


def fc_layer_table(widths, in_channels=3):
    """``(blocks, ups)``: ``{name: (in, out)}`` of every conv-BN-ReLU block and of every transposed convolution.

    Encoder blocks ``enc{k}.{i}``; decoder level ``k`` (4 to 1): ``up{k}`` (``w_k -> w_k``), then blocks
    ``dec{k}.{i}`` on ``[up; |E_k(x1) - E_k(x2)|]`` (``2 w_k`` channels), the last one going to ``w_{k-1}``
    (``w1`` at level 1).
    """
    blocks, ups = {}, {}
    cin = in_channels
    for k, depth in enumerate(STAGE_DEPTHS, 1):
        for i in range(depth):
            blocks[f"enc{k}.{i}"] = (cin, widths[k - 1])
            cin = widths[k - 1]
    for k in (4, 3, 2, 1):
        w = widths[k - 1]
        ups[f"up{k}"] = (w, w)
        depth = STAGE_DEPTHS[k - 1] if k > 1 else 1
        for i in range(depth):
            last = i == depth - 1
            blocks[f"dec{k}.{i}"] = (2 * w if i == 0 else w, widths[max(k - 2, 0)] if last else w)
    return blocks, ups


def _decoder_depth(k):
    return STAGE_DEPTHS[k - 1] if k > 1 else 1


class FCForwardCache(NamedTuple):
    n: int  # pairs in the batch
    encoder: list  # per stage: (max-pool cache or None, [(CBR cache, dropout cache), ...])
    fusion: list  # per stage: absdiff cache
    bottleneck: tuple  # (max-pool cache, absdiff cache or None) of the pooled last stage
    decoder: list  # per level 4..1: (transposed-conv cache, concat cache, [(CBR cache, dropout cache), ...])
    head: object


class FCSiamDiff(ModelState):
    """FC-Siam-diff with hand-derived backward (SPEC section 4b).

    Parameters
    ----------
    widths : tuple of 4 ints
        Encoder stage widths (16, 32, 64, 128 as published).
    in_channels : int
    xp, dtype, seed, input_mean, input_std, per_image_norm, conv_layout
        As for ``TinySiamCD``.
    dropout : float
        Channel-dropout rate after every block in training (0 switches it off).
    bottleneck : {"diff", "t2", "mean"}
        The deepest decoder input from the pooled last stages of the two images: their absolute
        difference (default), the second image's (as the published code), or their mean.

    Attributes
    ----------
    params : dict name -> array
        ``"<block>.conv.weight"``, ``"<block>.bn.weight"``, ``"<block>.bn.bias"`` for the blocks of
        ``fc_layer_table``; ``"up{k}.weight"`` (``(w_k, w_k, 3, 3)``, input channels first) and
        ``"up{k}.bias"``; ``"head.weight"`` ``(1, w1, 3, 3)`` and ``"head.bias"``.
    buffers : dict name -> array
        ``"<block>.bn.running_mean"``, ``"<block>.bn.running_var"``.
    size_multiple : int
        Input sides must be multiples of 16 (four poolings).
    """

    size_multiple = 16

    def __init__(self, widths=DEFAULT_WIDTHS, in_channels=3, *, xp=None, dtype="float32", seed=0,
                 input_mean=None, input_std=None, per_image_norm=False, conv_layout="auto", dropout=DEFAULT_DROPOUT,
                 bottleneck="diff"):
        self.widths, self.in_channels, self.dtype = checked_config(widths, in_channels, dtype, conv_layout)
        if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
            raise ValueError(f"dropout must be a rate in [0, 1), got {dropout!r}")
        if bottleneck not in BOTTLENECKS:
            raise ValueError(f"bottleneck must be one of {BOTTLENECKS}, got {bottleneck!r}")
        self.bottleneck = bottleneck
        self.dropout, self.seed, self.conv_layout = float(dropout), seed, conv_layout
        self.xp = xp if xp is not None else backend.namespace("numpy")
        self.blocks, self.ups = fc_layer_table(self.widths, self.in_channels)
        rng = backend.host_rng(seed)
        self.params, self.buffers = _initial_parameters(self.blocks, self.ups, self.widths[0], rng, self.xp, dtype)
        self._dropout_rng = backend.host_rng([seed, 1])  # masks when forward is given no rng
        self.input_norm = InputNormalisation(input_mean, input_std, self.in_channels, self.xp, dtype, per_image_norm)
        self.input_mean, self.input_std = self.input_norm.mean, self.input_norm.std

    def config(self) -> dict:
        return {"arch": "FCSiamDiff", "widths": list(self.widths), "in_channels": self.in_channels,
                "dropout": self.dropout, "bottleneck": self.bottleneck, **self.input_norm.config()}

    # ----------------------------------------------------------------------- one block

    def _block(self, x, name, mode):
        """conv3x3-BN-ReLU-dropout; ``mode`` is ``(training, sync, masks)`` with cache, or None (folded, no cache)."""
        p, b = self.params, self.buffers
        arrays = (p[f"{name}.conv.weight"], None, p[f"{name}.bn.weight"], p[f"{name}.bn.bias"],
                  b[f"{name}.bn.running_mean"], b[f"{name}.bn.running_var"])
        if mode is None:
            return cbr_folded_forward(x, *arrays, eps=BN_EPS, layout=self.conv_layout), None
        training, sync, masks = mode
        y, cache, mean, var = cbr_forward(x, *arrays, training=training, momentum=self.bn_momentum, eps=BN_EPS,
                                          layout=self.conv_layout, sync=sync)
        if training:  # the model's one piece of state besides the parameters
            b[f"{name}.bn.running_mean"], b[f"{name}.bn.running_var"] = mean, var
        y, drop = dropout2d_forward(y, masks(y.shape[0], y.shape[1]) if masks is not None else None)
        return y, (cache, drop)

    def _mask_source(self, n, rng, sync):
        """``masks(rows, channels)`` for this batch: the global batch's masks drawn, this rank's rows kept.

        Encoder blocks see the stacked pair (``rows = 2 n``: t1 rows, then t2 rows), decoder blocks
        ``n`` rows; each draw covers the global batch in that layout.
        """
        rng = rng if rng is not None else self._dropout_rng
        ranks, rank = (1, 0) if sync is None else (sync.size, sync.rank)

        def masks(rows, channels):
            phases = rows // n
            full = dropout2d_mask(rng, (phases * n * ranks, channels), self.dropout, self.xp, dtype=self.dtype)
            parts = [full[ph * n * ranks + rank * n: ph * n * ranks + (rank + 1) * n, ...] for ph in range(phases)]
            return parts[0] if phases == 1 else self.xp.concat(parts, axis=0)

        return masks

    # ----------------------------------------------------------------------- forward and backward

    def forward(self, x1, x2, *, training=True, keep_cache=True, sync=None, rng=None):
        """Logits and distillation taps for a batch of pairs.

        Parameters
        ----------
        x1, x2 : arrays (N, in_channels, H, W), H and W multiples of 16
        training, keep_cache, sync
            As for ``TinySiamCD.forward``.
        rng : numpy.random.Generator, optional
            Source of the dropout masks in training (default: the model's own generator).

        Returns
        -------
        logits : array (N, 1, H, W)
        taps : dict
            ``"E1".."E4"``: ``(t1 features, t2 features)``, each (N, w_k, H/2^(k-1), W/2^(k-1));
            ``"d1"``: change features (N, w1, H, W).
        cache : FCForwardCache (pass to ``backward``), or None with ``keep_cache=False``
        """
        xp, n = self._checked_pair(x1, x2, training, keep_cache)
        mode = None
        if keep_cache:
            masks = self._mask_source(n, rng, sync) if training and self.dropout > 0 else None
            mode = (training, sync, masks)
        h = self.input_norm(xp.concat([x1, x2], axis=0))
        stages, encoder, deltas, fusion = [], [], [], []
        for k, depth in enumerate(STAGE_DEPTHS, 1):
            pool = None
            if k > 1:
                h, pool = maxpool2x2_forward(h)
            caches = []
            for i in range(depth):
                h, c = self._block(h, f"enc{k}.{i}", mode)
                caches.append(c)
            encoder.append((pool, caches))
            stages.append(h)
            delta, fc = absdiff_forward(h[:n, ...], h[n:, ...])
            deltas.append(delta)
            fusion.append(fc)
        pooled, pool = maxpool2x2_forward(h)
        d, bottom = self._bottleneck_forward(pooled, n)
        decoder = []
        for k in (4, 3, 2, 1):
            d, up = conv_transpose2d_forward(d, self.params[f"up{k}.weight"], self.params[f"up{k}.bias"],
                                             layout=self.conv_layout)
            d, cat = concat_forward([d, deltas[k - 1]])
            caches = []
            for i in range(_decoder_depth(k)):
                d, c = self._block(d, f"dec{k}.{i}", mode)
                caches.append(c)
            decoder.append((up, cat, caches))
        logits, head = conv2d_forward(d, self.params["head.weight"], self.params["head.bias"], padding=1,
                                      layout=self.conv_layout)
        taps = {f"E{k + 1}": (s[:n, ...], s[n:, ...]) for k, s in enumerate(stages)}
        taps["d1"] = d
        if not keep_cache:
            return logits, taps, None
        return logits, taps, FCForwardCache(n, encoder, fusion, (pool, bottom), decoder, head)

    def backward(self, dlogits, cache: FCForwardCache, tap_grads=None):
        """Parameter gradients from ``dlogits`` plus optional gradients for taps (as ``TinySiamCD.backward``)."""
        xp = array_namespace(dlogits)
        tap_grads = checked_tap_grads(tap_grads)
        grads = {}
        dd, grads["head.weight"], grads["head.bias"] = conv2d_backward(dlogits, cache.head)
        if tap_grads.get("d1") is not None:
            dd = dd + tap_grads["d1"]
        ddeltas = [None] * 4
        for k, (up, cat, caches) in zip((1, 2, 3, 4), reversed(cache.decoder)):  # level 1 first
            for i in reversed(range(len(caches))):
                dd = self._block_backward(dd, caches[i], f"dec{k}.{i}", grads)
            dup, ddeltas[k - 1] = concat_backward(dd, cat)
            dd, grads[f"up{k}.weight"], grads[f"up{k}.bias"] = conv_transpose2d_backward(dup, up)
        pool, bottom = cache.bottleneck
        dh = maxpool2x2_backward(self._bottleneck_backward(dd, bottom), pool)  # a fresh array: added into in place
        n = cache.n
        for k in (4, 3, 2, 1):
            da, db = absdiff_backward(ddeltas[k - 1], cache.fusion[k - 1])
            g1, g2 = tap_grads.get(f"E{k}") or (None, None)
            dh[:n, ...] += da if g1 is None else da + g1
            dh[n:, ...] += db if g2 is None else db + g2
            pool, caches = cache.encoder[k - 1]
            for i in reversed(range(len(caches))):
                # the images need no gradient: the first convolution skips its input gradient
                dh = self._block_backward(dh, caches[i], f"enc{k}.{i}", grads, input_grad=(k, i) != (1, 0))
            if pool is not None:
                dh = maxpool2x2_backward(dh, pool)
        return grads

    def _bottleneck_forward(self, pooled, n):
        """The deepest decoder input from the pooled stacked pair, and the absdiff cache (None otherwise)."""
        if self.bottleneck == "diff":
            return absdiff_forward(pooled[:n, ...], pooled[n:, ...])
        if self.bottleneck == "t2":
            return pooled[n:, ...], None
        return 0.5 * (pooled[:n, ...] + pooled[n:, ...]), None

    def _bottleneck_backward(self, dd, bottom):
        """The gradient of the pooled stacked pair ``[t1; t2]`` from that of the deepest decoder input."""
        xp = array_namespace(dd)
        if self.bottleneck == "diff":
            da, db = absdiff_backward(dd, bottom)
        elif self.bottleneck == "t2":
            da, db = xp.zeros_like(dd), dd
        else:
            da = db = 0.5 * dd
        return xp.concat([da, db], axis=0)

    @staticmethod
    def _block_backward(dy, cache, name, grads, input_grad=True):
        cbr, drop = cache
        dx, dweight, _, dgamma, dbeta = cbr_backward(dropout2d_backward(dy, drop), cbr, input_grad=input_grad)
        grads[f"{name}.conv.weight"], grads[f"{name}.bn.weight"], grads[f"{name}.bn.bias"] = dweight, dgamma, dbeta
        return dx

    def predict_logits(self, x1, x2):
        """Evaluation-mode logits (running BatchNorm statistics, folded; no dropout; no state change)."""
        return self.forward(x1, x2, training=False, keep_cache=False)[0]


def _initial_parameters(blocks, ups, w1, rng, xp, dtype):
    """Kaiming-normal (fan-in) weights without bias before BatchNorm, BatchNorm 1 / 0, running stats 0 / 1.

    A transposed convolution's output pixel sums ``C k^2 / stride^2`` products on average, its fan-in;
    it and the head get gain 1 (no ReLU follows them directly) and zero biases.
    """
    params, buffers = {}, {}
    zeros = lambda c: xp.zeros((c,), dtype=getattr(xp, dtype))  # noqa: E731
    ones = lambda c: xp.ones((c,), dtype=getattr(xp, dtype))  # noqa: E731
    for name, (cin, cout) in blocks.items():
        params[f"{name}.conv.weight"] = backend.normal(rng, (cout, cin, 3, 3), math.sqrt(2.0 / (cin * 9)), xp,
                                                       dtype=dtype)
        params[f"{name}.bn.weight"], params[f"{name}.bn.bias"] = ones(cout), zeros(cout)
        buffers[f"{name}.bn.running_mean"], buffers[f"{name}.bn.running_var"] = zeros(cout), ones(cout)
    for name, (cin, cout) in ups.items():
        params[f"{name}.weight"] = backend.normal(rng, (cin, cout, 3, 3), math.sqrt(4.0 / (cin * 9)), xp, dtype=dtype)
        params[f"{name}.bias"] = zeros(cout)
    params["head.weight"] = backend.normal(rng, (1, w1, 3, 3), math.sqrt(1.0 / (w1 * 9)), xp, dtype=dtype)
    params["head.bias"] = zeros(1)
    return params, buffers
