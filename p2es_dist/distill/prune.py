"""Kernel pruning of a trained student by significance (Li et al., Sec. III-E, eq. 11).

The paper scores the i-th kernel of the ECG generation layer as S[i] = E{ ||F*[i, :]||^2 + lambda_w w[i] }
(feature norm plus the attention weight its channel receives) and the first layer's kernels likewise
(F1's norm plus the fusion weight alpha that channel receives), and keeps the best half of each.

In the recursive student one FEM and one FTM map C channels to C channels and feed themselves, so
F1's channel i, every module's channel i and F*'s channel i are one index space: a kernel of the first
layer cannot go without the matching trunk channel and generation kernel. So each trunk channel gets
one score, the sum of the paper's two layer scores:

    score[i] = n(E||F1[i]||^2) + lambda_w n(E sum_k alpha[k, i]) + n(E||F*[i]||^2) + lambda_w n(E w[i])

where ||.||^2 is the mean square over time and n(x) = x / mean(x) puts the four criteria on one
scale (each averages 1 over channels), which is what lambda_w > 0 "balances" in the paper. The best
(1 - fraction) of channels are kept, at least one from each half of the [C1, C2] concatenation, and
every tensor is sliced to them; the pruned model is then fine-tuned (the caller's job).

A student built with `use_template` is scored on the inputs it was trained on: each window's template
as `Student.calibration_template` gives it (the patient's, else the population's at its upstrokes), so
the scoring batches must carry the distillation's template columns and per-window `template_hidden`
choice (`teacher_outputs.cached_batches`). Pruning slices only output channels of the first layer, so
the pruned student keeps every template input channel, its `use_template` and its population; its
fine-tune reads the same cached shards, hidden templates included.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from p2es_dist.models.base import Batch
from p2es_dist.models.common import ppg_input
from p2es_dist.models.student import Student, StudentConfig


@dataclass
class Significance:
    first_energy: Tensor  # (C,) E mean_t F1[i, t]^2
    fusion_weight: Tensor  # (C,) E sum_k alpha[k, i]: how much F1's channel i feeds the fused map
    fused_energy: Tensor  # (C,) E mean_t F*[i, t]^2
    channel_weight: Tensor  # (C,) E w[i]
    windows: int

    def score(self, lambda_w: float = 1.0) -> Tensor:
        return combine_scores(self.first_energy, self.fusion_weight, self.fused_energy, self.channel_weight,
                              lambda_w=lambda_w)


def _normalised(values: Tensor) -> Tensor:
    return values / values.mean().clamp_min(1e-12)


def combine_scores(first_energy: Tensor, fusion_weight: Tensor, fused_energy: Tensor, channel_weight: Tensor,
                   *, lambda_w: float = 1.0) -> Tensor:
    """Per-channel significance: the first-layer and generation-layer scores of eq. 11, summed."""
    if lambda_w <= 0:
        raise ValueError(f"lambda_w must be > 0, got {lambda_w}")
    first = _normalised(first_energy) + lambda_w * _normalised(fusion_weight)
    generation = _normalised(fused_energy) + lambda_w * _normalised(channel_weight)
    return first + generation


def windows_with_ppg(batch: Batch, present: Tensor) -> Batch:
    """The batch's rows where `present` (every per-window tensor; others, if any, as they are)."""
    return {key: value[present] if value.ndim and value.shape[0] == len(present) else value
            for key, value in batch.items()}


@torch.no_grad()
def significance(model: Student, batches: Iterable[Batch]) -> Significance:
    """Expectations of eq. 11's terms over the windows with PPG in `batches` (with their templates, for a
    student built with `use_template`)."""
    model.eval()
    totals = [torch.zeros(model.config.channels, dtype=torch.float64) for _ in range(4)]
    windows = 0
    for batch in batches:
        present = batch["ppg_mask"].bool()
        if not present.any():
            continue
        rows = windows_with_ppg(batch, present)
        out = model.features(ppg_input(rows)[:, 0], model.calibration_template(rows))
        terms = (out.first.square().mean(dim=-1), out.fusion_weights.sum(dim=1),
                 out.fused.square().mean(dim=-1), out.channel_weights)
        for total, term in zip(totals, terms, strict=True):
            total += term.double().sum(dim=0)
        windows += int(present.sum())
    if windows == 0:
        raise ValueError("no window with PPG to score the kernels on")
    first, fusion, fused, weight = (total.float() / windows for total in totals)
    return Significance(first_energy=first, fusion_weight=fusion, fused_energy=fused, channel_weight=weight,
                        windows=windows)


def select_channels(score: Tensor, *, c1_channels: int, fraction: float) -> list[int]:
    """Sorted indices of the channels to keep: the best (1 - fraction), at least one of C1 and of C2."""
    if not 0 <= fraction < 1:
        raise ValueError(f"prune fraction must be in [0, 1), got {fraction}")
    channels = len(score)
    n_keep = max(2, round(channels * (1 - fraction)))
    order = torch.argsort(score, descending=True, stable=True).tolist()
    kept = order[:n_keep]
    for group in (range(0, c1_channels), range(c1_channels, channels)):
        if not any(i in group for i in kept):
            # Both halves of [C1, C2] must survive for the module to exist: swap the weakest kept
            # channel of the other half for this half's best.
            best = next(i for i in order if i in group)
            weakest = next(i for i in reversed(kept) if i not in group)
            kept[kept.index(weakest)] = best
    return sorted(kept)


def _slice(tensor: Tensor, dim: int, index: list[int]) -> Tensor:
    return tensor.index_select(dim, torch.tensor(index, dtype=torch.long)).clone()


def prune_student(model: Student, kept: list[int]) -> tuple[Student, StudentConfig]:
    """A new student with only trunk channels `kept` (sorted); every weight is the full one sliced."""
    config = model.config
    c1 = config.c1_channels
    kept_c1 = [i for i in kept if i < c1]  # C1 outputs that stay; they are also C2's inputs
    kept_c2 = [i - c1 for i in kept if i >= c1]
    pruned_config = replace(config, channels=len(kept), c1_channels=len(kept_c1), init_weights=None)
    # Attention FC input is [mean, var, max, min] of every channel: block b, channel i sits at b*C + i.
    stats_index = [b * config.channels + i for b in range(4) for i in kept]
    # name -> (dim, index) for each sliced dimension. Conv1d weights are (out, in, k); ConvTranspose1d (in, out, k).
    plan: dict[str, list[tuple[int, list[int]]]] = {
        "first.0.weight": [(0, kept)], "first.0.bias": [(0, kept)],
        "first.1.weight": [(0, kept)], "first.1.bias": [(0, kept)],
        "gate.theta": [(0, kept), (1, kept)],
        "attention.mlp.0.weight": [(1, stats_index)],
        "attention.mlp.2.weight": [(0, kept)], "attention.mlp.2.bias": [(0, kept)],
        "generator.weight": [(0, kept)],
    }
    for path, transposed in (("encoder.module", False), ("decoder.module", True)):
        out_dim, in_dim = (1, 0) if transposed else (0, 1)
        plan[f"{path}.c1.0.weight"] = [(out_dim, kept_c1), (in_dim, kept)]
        plan[f"{path}.c2.0.weight"] = [(out_dim, kept_c2), (in_dim, kept_c1)]
        for layer, index in (("c1", kept_c1), ("c2", kept_c2)):
            for name in (f"{path}.{layer}.0.bias", f"{path}.{layer}.1.weight", f"{path}.{layer}.1.bias"):
                plan[name] = [(0, index)]
    state = {}
    for name, tensor in model.state_dict().items():
        for dim, index in plan.get(name, []):
            tensor = _slice(tensor, dim, index)
        state[name] = tensor.detach().clone()
    pruned = Student(config=pruned_config)
    pruned.load_state_dict(state, strict=True)
    return pruned.eval(), pruned_config
