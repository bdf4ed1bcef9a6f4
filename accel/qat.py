"""Activation calibration (post-training static quantization) and quantization-aware training.

Calibration: observers watch the inputs of the layers to quantize while a loader runs through the
model, then give each layer a static activation scale ``clip / qmax``:

* ``minmax``: ``clip`` = the largest ``|x|`` seen;
* ``percentile``: ``clip`` = the ``p``-th percentile of ``|x|`` (outliers saturate);
* ``mse``: ``clip`` in ``absmax * [0.3, 1]`` minimising the mean squared quantization error.

Percentile and MSE work on a bounded random sample of ``|x|`` (``SAMPLE`` values per layer).

QAT: :func:`prepare_qat` swaps Linear / Conv2d for fake-quantized twins that quantize weights per
output channel and activations per token / per image with accel's rule (``accel.quant``), passing
gradients straight through the rounding; :func:`convert` turns them into ``QuantLinear`` /
``QuantConv2d`` that keep the activation range QAT simulated (``act_qmax``, saved with the model), so
inference computes what was trained on any CPU or GPU.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from .api import carry_over, replace_module
from .inputs import eval_mode, loader_batch_call, unnested
from .modules.quant_linear import QuantConv2d, QuantLinear
from .modules.sparse_conv import SparseConv2d
from .prune import base_kind, is_accel_layer, is_conv1d, own_forward_reason, weight_source
from .quant import QMAX, ieee_div

SAMPLE = 1 << 20
METHODS = ("minmax", "percentile", "mse")


class Observer:
    """Collects ``|x|`` statistics; :meth:`clip` returns the clipping threshold of the method."""

    def __init__(self, method: str = "minmax", percentile: float = 99.99, seed: int = 0) -> None:
        if method not in METHODS:
            raise ValueError(f"calibration method must be one of {METHODS}, got {method!r}")
        self.method, self.percentile = method, percentile
        self.absmax = 0.0
        self.seen = 0  # values observed
        self._sample: list[torch.Tensor] = []
        self._kept = 0
        self._gen = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        a = x.detach().float().abs().flatten().cpu()
        if not torch.isfinite(a).all():
            raise ValueError("calibration data holds NaN or inf")
        if a.numel() == 0:
            return
        self.seen += a.numel()
        self.absmax = max(self.absmax, float(a.max()))
        if self.method != "minmax":
            take = min(a.numel(), max(1, SAMPLE // 16))
            idx = torch.randint(0, a.numel(), (take,), generator=self._gen)
            self._sample.append(a[idx])
            self._kept += take
            if self._kept > SAMPLE:  # thin the pool: keep a random half
                pool = torch.cat(self._sample)
                self._sample = [pool[torch.randperm(pool.numel(), generator=self._gen)[: SAMPLE // 2]]]
                self._kept = self._sample[0].numel()

    def clip(self, qmax: int = QMAX) -> float:
        if self.absmax == 0.0:
            return 0.0
        if self.method == "minmax":
            return self.absmax
        sample = torch.cat(self._sample)
        if self.method == "percentile":
            return max(float(torch.quantile(sample, self.percentile / 100.0)), 1e-12)
        best, best_err = self.absmax, float("inf")
        for frac in torch.linspace(0.3, 1.0, 50).tolist():
            c = self.absmax * frac
            s = c / qmax
            q = torch.round((sample / s).clamp(max=qmax)) * s
            err = float((q - sample).pow(2).mean())
            if err < best_err:
                best, best_err = c, err
        return best

    def scale(self, qmax: int = QMAX) -> float:
        return self.clip(qmax) / qmax


def calibration_qmax(device: str) -> int:
    """The activation range :func:`calibrate` uses by default: the one the layers run with on ``device`` (127 on
    CUDA; ``accel.engines.native_act_qmax()`` on the CPU). ``quantize_`` gives static layers this range."""
    from .engines import native_act_qmax

    return QMAX if str(device).startswith("cuda") else native_act_qmax()


@torch.no_grad()
def calibrate(model: nn.Module, loader, method: str = "minmax", qmax: int | None = None, num_batches: int | None = None,
              filter_fn=None, device: str = "cpu", percentile: float = 99.99) -> dict[str, float]:
    """Run ``loader`` through ``model`` and return ``{layer name: static activation scale}`` for its
    Linear (Hugging Face ``Conv1D`` included) / Conv2d / QuantLinear / QuantConv2d layers, and block-sparse
    ``SparseConv2d`` ones (``quantize_`` may make them static int8 convs), ``filter_fn(module, name)`` narrowing them.

    A layer that saw no input (it never ran: an unused head) or only zeros (a dead ReLU before it) has no
    range to calibrate: it is left out of the result, with a warning naming it, and ``quantize_`` runs it
    dynamic int8 (its scale is measured per call).

    ``qmax`` defaults to the activation range the layers will run with on ``device`` (127 on CUDA;
    ``accel.engines.native_act_qmax()`` on the CPU). Batches may be tensors, ``(inputs, labels)``
    tuples, dicts of keyword inputs or ``(args, kwargs)`` (``accel.inputs.loader_batch_call``).
    """
    if qmax is None:
        qmax = calibration_qmax(device)
    kinds = (nn.Linear, nn.Conv2d, QuantLinear, QuantConv2d, SparseConv2d)
    observers, hooks = {}, []
    for name, m in model.named_modules():
        if (isinstance(m, kinds) or is_conv1d(m)) and (filter_fn is None or filter_fn(m, name)):
            observers[name] = Observer(method, percentile)
            hooks.append(m.register_forward_pre_hook(
                lambda mod, args, name=name: observers[name].observe(unnested(args[0]))))
    if not observers:
        raise ValueError("calibrate: no Linear/Conv1D/Conv2d/SparseConv2d layer selected")
    try:
        with eval_mode(model):
            for i, batch in enumerate(loader):
                if num_batches is not None and i >= num_batches:
                    break
                args, kwargs = loader_batch_call(batch)
                move = (lambda t: t.to(device) if isinstance(t, torch.Tensor) else t)  # noqa: E731
                model(*(move(a) for a in args), **{k: move(v) for k, v in kwargs.items()})
    finally:
        for h in hooks:
            h.remove()
    empty = {name: "no input" if obs.seen == 0 else "only zeros" for name, obs in observers.items() if obs.absmax == 0.0}
    if empty:
        warnings.warn(f"calibrate: left out {len(empty)} layer(s) that saw no input (never ran) or only zeros, so have "
                      f"no range to calibrate (quantize_ runs them dynamic): "
                      + ", ".join(f"{n} ({why})" for n, why in empty.items()), stacklevel=3)
    return {name: obs.scale(qmax) for name, obs in observers.items() if name not in empty}


# ------------------------------------------------------------------------------------------------ QAT
class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


def fake_quant(x: torch.Tensor, qmax: int, dims: tuple[int, ...]) -> torch.Tensor:
    """``round(clamp(x * inv)) / inv`` with the scale from the absmax over ``dims`` (one scale per index
    of the other dims), gradients straight through the rounding; all-zero groups stay zero."""
    absmax = x.detach().abs().amax(dim=dims, keepdim=True).float()
    inv = torch.where(absmax > 0, ieee_div(qmax, absmax), torch.zeros_like(absmax))
    scale = absmax / qmax
    q = _RoundSTE.apply((x.float() * inv).clamp(-qmax, qmax))
    return (q * scale).to(x.dtype)


class FakeQuantLinear(nn.Linear):
    """nn.Linear whose forward sees int8-rounded weights (per channel) and activations (per token)."""

    act_qmax: int = QMAX

    def forward(self, x):
        w = fake_quant(self.weight, QMAX, (1,))
        return F.linear(fake_quant(x, self.act_qmax, (x.dim() - 1,)), w, self.bias)


class FakeQuantConv1D(nn.Module):
    """Hugging Face ``Conv1D`` (weight ``[in, out]``, ``y = x @ W + b``) whose forward sees int8-rounded weights
    (per output channel) and activations (per token): the twin of the ``QuantLinear`` it converts to."""

    act_qmax: int = QMAX
    _accel_conv1d = True

    def forward(self, x):
        w = fake_quant(self.weight, QMAX, (0,))
        return F.linear(fake_quant(x, self.act_qmax, (x.dim() - 1,)), w.t(), self.bias)

    def to_linear(self) -> nn.Linear:
        """The equivalent ``nn.Linear`` (weight ``[out, in]``)."""
        lin = torch.nn.utils.skip_init(nn.Linear, self.weight.shape[0], self.weight.shape[1], bias=self.bias is not None,
                                       device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.weight.t())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin


def _twin(m: nn.Module, cls: type) -> nn.Module:
    """A ``cls`` sharing ``m``'s state (parameters, buffers, attributes), remembering ``m``'s class for strip."""
    new = cls.__new__(cls)
    new.__dict__.update(m.__dict__)
    for d in ("_parameters", "_buffers", "_modules"):
        new.__dict__[d] = type(m.__dict__[d])(m.__dict__[d])
    new.__dict__["_plain_cls"] = type(m)
    return new


class FakeQuantConv2d(nn.Conv2d):
    """nn.Conv2d whose forward sees int8-rounded weights (per output channel) and activations (per image)."""

    act_qmax: int = QMAX

    def forward(self, x):
        w = fake_quant(self.weight, QMAX, (1, 2, 3))
        return self._conv_forward(fake_quant(x, self.act_qmax, (1, 2, 3)), w, self.bias)


def prepare_qat(model: nn.Module, filter_fn=None, act_qmax: int | None = None) -> list[str]:
    """Swap the Linear (Hugging Face ``Conv1D`` included) / Conv2d layers (that ``filter_fn`` accepts and that
    QuantConv2d can serve) for fake-quantized twins, in place, sharing their parameters. ``act_qmax`` is the
    activation range of the deployment target (default: this machine's CPU rule). Returns the swapped names.
    Layers whose weight is computed (parametrized, weight-norm hooks) are refused with a ValueError naming
    them, before anything changes: remove the parametrization or leave them out with ``filter_fn``."""
    if act_qmax is None:
        from .engines import native_act_qmax

        act_qmax = native_act_qmax()
    if act_qmax not in (63, 127):
        raise ValueError(f"prepare_qat: act_qmax must be 63 or 127, got {act_qmax!r}")
    selected = [(name, m) for name, m in model.named_modules()
                if (base_kind(m) is nn.Linear or base_kind(m) is nn.Conv2d and QuantConv2d.unsupported_reason(m) is None)
                and (filter_fn is None or filter_fn(m, name))]
    own = [f"{n!r}: {r}" for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
           and (r := own_forward_reason(m)) and (filter_fn is None or filter_fn(m, n))]
    if own:
        warnings.warn(f"prepare_qat leaves out {len(own)} layer(s) it cannot convert: {'; '.join(own[:6])}"
                      + (f" (+{len(own) - 6})" if len(own) > 6 else ""), stacklevel=2)
    computed = [f"{n!r} ({src})" for n, m in selected if (src := weight_source(m)) is not None]
    if computed:
        raise ValueError(f"prepare_qat: {len(computed)} layer(s) compute their weight, which a fake-quantized twin "
                         f"cannot share: {', '.join(computed)}. Remove the parametrization first (torch.nn.utils."
                         f"parametrize.remove_parametrizations / torch.nn.utils.remove_weight_norm) or leave these "
                         f"layers out with filter_fn")
    swapped = []
    for name, m in selected:
        if is_conv1d(m):
            new = _twin(m, FakeQuantConv1D)
            new.act_qmax = act_qmax
            replace_module(model, name, new)
            swapped.append(name)
            continue
        if type(m) is nn.Linear:
            new = FakeQuantLinear(m.in_features, m.out_features, m.bias is not None, device=m.weight.device,
                                  dtype=m.weight.dtype)
        elif type(m) is nn.Conv2d:
            new = FakeQuantConv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                                  bias=m.bias is not None, device=m.weight.device, dtype=m.weight.dtype)
        else:
            continue
        new.weight, new.bias = m.weight, m.bias
        new.act_qmax = act_qmax
        new.train(m.training)
        # the layer's hooks (a FeatureDistiller capturing its output, ...) go with it: the same dicts, so
        # their handles still remove them
        new.__dict__.update({k: v for k, v in m.__dict__.items() if k.startswith("_") and "hook" in k})
        replace_module(model, name, new)
        swapped.append(name)
    if not swapped and (done := [n for n, m in model.named_modules() if is_accel_layer(m)]):
        warnings.warn(f"prepare_qat swapped no layer: {len(done)} layer(s) are already converted by accel (e.g. "
                      f"{done[0]!r}); QAT runs on the float model, before conversion", stacklevel=2)
    return swapped


def strip(model: nn.Module) -> list[str]:
    """Turn the fake-quantized layers back into plain nn.Linear / nn.Conv2d (same parameters), in
    place: ``accel.quantize_`` can then convert them, measuring each layer first."""
    stripped = []
    for name, m in list(model.named_modules()):
        if isinstance(m, FakeQuantConv1D):
            cls = m.__dict__["_plain_cls"]
            plain = cls.__new__(cls)
            plain.__dict__.update({k: v for k, v in m.__dict__.items() if k not in ("_plain_cls", "act_qmax")})
            replace_module(model, name, plain)
            stripped.append(name)
        elif isinstance(m, (FakeQuantLinear, FakeQuantConv2d)):
            plain = nn.Linear.__new__(nn.Linear) if isinstance(m, FakeQuantLinear) else nn.Conv2d.__new__(nn.Conv2d)
            plain.__dict__.update(m.__dict__)
            replace_module(model, name, plain)
            stripped.append(name)
    return stripped


def convert(model: nn.Module, linear_mode: str = "dynamic", conv_mode: str = "dynamic") -> list[str]:
    """Replace the fake-quantized layers by ``QuantLinear`` / ``QuantConv2d``, in place, with the
    activation range each simulated (``act_qmax``)."""
    converted = []
    for name, m in list(model.named_modules()):
        if isinstance(m, FakeQuantLinear):
            new = QuantLinear.from_float(m, linear_mode, act_qmax=m.act_qmax)
        elif isinstance(m, FakeQuantConv1D):
            new = QuantLinear.from_float(m.to_linear(), linear_mode, act_qmax=m.act_qmax)
        elif isinstance(m, FakeQuantConv2d):
            new = QuantConv2d.from_float(m, conv_mode, act_qmax=m.act_qmax)
        else:
            continue
        replace_module(model, name, carry_over(m, new))
        converted.append(name)
    return converted
