"""Every PPG-conditioned model sees at least +-1 s of PPG around each output sample (issue 13).

The pulse that belongs to a QRS arrives ~560 ms (~70 samples at 125 Hz) after it and the delay differs
by ~50 ms between patients, so a model that sees less than about +-1 s of PPG cannot find it.

Measured here, for each model built from a shipped config: the gradient of one output sample (lead II,
sample 512) with respect to the PPG input. The models also carry paths that reach the whole window
through global statistics (GroupNorm over time, li2021's correlation gate and channel attention, P2Es'
pooled PPG vector, its affinity embedding and its DCT-domain deblurring head); those make every gradient
non-zero and say nothing about where the model can *look*. So the measurement holds them constant
(`local_paths`): normalisation statistics, the gate's and the channel attention's weights, P2Es' global
vector and affinity are detached, and the deblurring head (a per-frequency gain, the identity to ~1e-6
at the t = 1 used here) is bypassed.
What is left is the convolutional reach, whose gradient is exactly zero outside it.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import pytest
import torch
from conftest import REPO_ROOT
from torch import Tensor, nn

from p2es_dist.config import load_yaml
from p2es_dist.constants import FS, LABELS, LEAD_INDEX, N_LEADS, WINDOW
from p2es_dist.models import build_model
from p2es_dist.models.base import condition_leads

CONFIGS = REPO_ROOT / "p2es_dist" / "configs"
CENTRE = WINDOW // 2
LEAD = LEAD_INDEX["II"]
ONE_SECOND = FS  # samples: the floor on each side
# Every shipped config of a PPG-conditioned model; each states its receptive field in a comment.
SHIPPED = [
    "models/p2es.yaml", "models/p2es_small.yaml", "models/unet.yaml", "models/li2021.yaml",
    "models/li2021_recursive.yaml", "models/student.yaml",
    "p2es_bidmc.yaml", "p2es_lead2.yaml", "p2es_foundation.yaml", "unet_bidmc.yaml", "li2021_bidmc.yaml",
    "p2es_anysubset.yaml", "unet_anysubset.yaml", "distill.yaml", "smoke.yaml",
]
STATED = re.compile(r"PPG receptive field[^\n]*?\+-\s*(\d+)")


def stated_receptive_field(config_file: str) -> int:
    """The `+-N` of the config's `PPG receptive field` comment."""
    match = STATED.search((CONFIGS / config_file).read_text())
    assert match, f"{config_file}: no '# PPG receptive field: +-N samples' comment"
    return int(match.group(1))


def shipped_model(config_file: str) -> nn.Module:
    section = load_yaml(CONFIGS / config_file)["model"]
    if section.get("ppg_encoder") == "foundation":
        # A frozen encoder runs without autograd; unfrozen, the same forward pass shows its gradient.
        section = {**section, "ppg_encoder_frozen": False}
    torch.manual_seed(0)
    return build_model(section)


def randomise_zero_init(model: nn.Module, seed: int = 1) -> nn.Module:
    """Output layers start at zero (the model predicts 0 whatever its input): give every all-zero
    parameter small random values so the gradient reaches the input."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if torch.all(parameter == 0):
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=g, dtype=parameter.dtype))
    return model


def _frozen_group_norm(module: nn.GroupNorm, inputs: tuple[Tensor, ...], _output: Tensor) -> Tensor:
    x = inputs[0]
    grouped = x.reshape(x.shape[0], module.num_groups, -1)
    mean = grouped.mean(dim=-1, keepdim=True).detach()
    var = grouped.var(dim=-1, unbiased=False, keepdim=True).detach()
    y = ((grouped - mean) / torch.sqrt(var + module.eps)).reshape(x.shape)
    if module.affine:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        y = y * module.weight.reshape(shape) + module.bias.reshape(shape)
    return y


def _frozen_gate(_module: nn.Module, inputs: tuple[Tensor, Tensor], output: tuple[Tensor, Tensor]):
    first, decoded = inputs
    _, alpha = output
    return decoded + alpha.detach() @ first, alpha.detach()


@contextlib.contextmanager
def local_paths(model: nn.Module) -> Iterator[None]:
    """Hold every global (whole-window) dependency on the input constant; see the module docstring."""
    from p2es_dist.models.li2021 import ChannelAttention, CorrelationGate
    from p2es_dist.models.p2es.affinity import LeadAffinity
    from p2es_dist.models.p2es.conditioning import Conditioner, Context
    from p2es_dist.models.p2es.network import DeblurHead

    hooks = []
    for module in model.modules():
        if isinstance(module, nn.GroupNorm):
            hooks.append(module.register_forward_hook(_frozen_group_norm))
        elif isinstance(module, CorrelationGate):
            hooks.append(module.register_forward_hook(_frozen_gate))
        elif isinstance(module, ChannelAttention):  # channel weights from whole-window statistics
            hooks.append(module.register_forward_hook(lambda m, i, out: out.detach()))
        elif isinstance(module, Conditioner):
            hooks.append(module.register_forward_hook(lambda m, i, out: Context(seq=out.seq, vec=out.vec.detach())))
        elif isinstance(module, LeadAffinity):
            hooks.append(module.register_forward_hook(lambda m, i, out: tuple(o.detach() for o in out)))
        elif isinstance(module, DeblurHead):
            hooks.append(module.register_forward_hook(lambda m, inputs, out: inputs[0]))
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def one_window(dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, Tensor]:
    """A PPG window with lead II recorded and no other input."""
    g = torch.Generator().manual_seed(seed)
    ecg_mask = torch.zeros(1, N_LEADS, dtype=torch.bool)
    ecg_mask[0, LEAD] = True
    return {
        "ppg": (torch.rand(1, WINDOW, generator=g, dtype=dtype) * 2 - 1).requires_grad_(True),
        "ppg_mask": torch.ones(1, dtype=torch.bool),
        "ecg": torch.zeros(1, N_LEADS, WINDOW, dtype=dtype),
        "ecg_mask": ecg_mask,
        "age": torch.tensor([55.0], dtype=dtype),
        "sex": torch.tensor([1]),
        "labels": torch.zeros(1, len(LABELS), dtype=dtype),
        "subject": torch.zeros(1, dtype=torch.int64),
    }


def prediction(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """(1, 12, L) with gradients: P2Es' x0 prediction at a fixed small t, the regressors' forward."""
    from p2es_dist.models.p2es import P2Es

    if isinstance(model, P2Es):
        g = torch.Generator().manual_seed(2)
        x_t = torch.randn(1, model.out_leads, WINDOW, generator=g, dtype=batch["ppg"].dtype)
        t = torch.ones(1, dtype=torch.long)
        context, affinity, _ = model.condition(batch, condition_leads(batch))
        _, x0 = model.predict(x_t, t, context, affinity)
        return model.to_12_leads(x0)
    return model(batch)


def ppg_gradient(model: nn.Module, *, local: bool = True) -> Tensor:
    """(L,) d output[lead II, CENTRE] / d PPG."""
    model = randomise_zero_init(model).eval()
    batch = one_window()
    with local_paths(model) if local else contextlib.nullcontext():
        out = prediction(model, batch)
        (grad,) = torch.autograd.grad(out[0, LEAD, CENTRE], batch["ppg"])
    return grad[0]


def measured_reach(grad: Tensor) -> tuple[int, int]:
    """(samples before CENTRE, samples after) out to the farthest non-zero gradient."""
    nonzero = torch.nonzero(grad.abs() > 1e-14 * grad.abs().max()).flatten()
    return CENTRE - int(nonzero.min()), int(nonzero.max()) - CENTRE


def measured_receptive_field(model: nn.Module) -> int:
    """The smaller of the two one-sided reaches: what the model sees on both sides of every sample."""
    return min(measured_reach(ppg_gradient(model)))


@pytest.mark.parametrize("config_file", SHIPPED)
def test_ppg_receptive_field_covers_a_second_each_side(config_file: str) -> None:
    grad = ppg_gradient(shipped_model(config_file))
    # Through its local (convolutional) paths alone, the PPG a second away on either side moves the output.
    assert grad[CENTRE - ONE_SECOND] != 0 and grad[CENTRE + ONE_SECOND] != 0
    before, after = measured_reach(grad)
    assert min(before, after) >= ONE_SECOND
    # ...and the receptive field the config's comment states is the one measured (strided U-Net levels
    # make it a few samples lopsided; a field wider than the window shows as the window's edges).
    stated = stated_receptive_field(config_file)
    expected = min(stated, WINDOW - 1 - CENTRE)
    assert abs(min(before, after) - expected) <= max(4, 0.03 * expected), (config_file, before, after, stated)


def test_measurement_sees_exactly_a_convolution_stack() -> None:
    """The measurement itself: a plain stack of convolutions reaches exactly the sum of its half-kernels."""
    net = nn.Sequential(nn.Conv1d(1, 4, 7, padding=3), nn.GroupNorm(2, 4), nn.SiLU(),
                        nn.Conv1d(4, 12, 5, dilation=8, padding=16))

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, batch: dict[str, Tensor]) -> Tensor:
            return self.net(batch["ppg"][:, None, :])

    assert measured_reach(ppg_gradient(Wrapper())) == (3 + 16, 3 + 16)
    # Without holding GroupNorm's statistics, every sample of the window moves the output.
    assert measured_reach(ppg_gradient(Wrapper(), local=False)) == (CENTRE, WINDOW - 1 - CENTRE)


def test_global_paths_are_what_local_paths_hold() -> None:
    """The unfrozen P2Es gradient is non-zero everywhere (pooled vector, affinity, deblurring head)."""
    grad = ppg_gradient(shipped_model("p2es_bidmc.yaml"), local=False)
    assert (grad != 0).all()
