"""`student`: the one-step mobile generator distilled from the diffusion teacher.

Li, Tian, Zhu, Wu's lightweight network (Sec. III-E), built from the `li2021` pieces:

    F1 = first(ppg)                         first conv + layer norm + ReLU, C channels, length V = L - K + 1
    F_T = FTM^R(FEM^R(F1))                  one FEM and one FTM, each applied R times with shared weights (eq. 10)
    F*, alpha = gate(F1, F_T)               correlation attention gate (eqs. 2-4)
    w = attention(F*)                       channel weights in [0, 1] from channel statistics
    ECG = generator(w * F*)                 transposed conv back to (12, L), eq. 5

Where it departs from `li2021`: PPG is the only input (a watch has no ECG leads to condition on), and
there is no diagnosis branch; the channel attention that fed that branch gates the generation layer
instead, so its weight `w[i]` still measures how much kernel `i` matters, which is what the pruning
score of eq. 11 reads (`p2es_dist.distill.prune`).

Loss: `teacher_weight` x MSE to the teacher's output (all 12 leads, windows with PPG) when the batch
carries `teacher_ecg`, plus `recorded_weight` x MSE to the recorded leads (masked), plus the group
sparsity of eq. 6 on F1 and F*, which concentrates energy in few kernels so that pruning removes little.

Default size: 28,084 parameters (110 KB fp32); pruning half the trunk channels leaves about 10.5 k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from p2es_dist.constants import N_LEADS
from p2es_dist.models.base import Batch, TranslationModel
from p2es_dist.models.common import masked_mse, ppg_input, regression_target_mask
from p2es_dist.models.li2021 import (
    ChannelAttention,
    ConvNormAct,
    CorrelationGate,
    MultiScaleModule,
    Recursion,
    group_sparsity,
)
from p2es_dist.models.registry import register
from p2es_dist.storage import uri as uri_lib


@dataclass
class StudentConfig:
    channels: int = 32  # C: width of F1, of the recursive FEM/FTM and of F* (pruning shrinks it)
    c1_channels: int = 20  # C1 width inside FEM/FTM; C2 outputs channels - c1_channels
    outer_kernel: int = 30  # first conv and generation layer, as Table VII
    module_kernel: int = 9  # C1 kernel of the recursive FEM/FTM (see li2021: Table VIII is missing)
    c2_kernel: int = 3
    depth: int = 2  # recursion depth R, matching the paper's two cascaded modules
    attention_hidden: int = 8  # channel attention FC: 4C -> hidden -> C
    teacher_weight: float = 1.0  # MSE to the teacher's output
    recorded_weight: float = 1.0  # MSE to the recorded leads
    sparsity_weight: float = 5e-9  # li2021's lambda_S for a per-sample mean MSE
    # Weights (a model.safetensors URI) to start from instead of a random init: the distiller points it
    # at the pruned student for the fine-tune and removes it from the final checkpoint's model.json.
    init_weights: str | None = None

    def __post_init__(self) -> None:
        if not 0 < self.c1_channels < self.channels:
            raise ValueError(f"c1_channels must be in (0, channels={self.channels}), got {self.c1_channels}")
        if self.c2_kernel % 2 == 0:
            raise ValueError(f"c2_kernel must be odd, got {self.c2_kernel}")
        if self.depth < 1 or self.attention_hidden < 1:
            raise ValueError("depth and attention_hidden must be >= 1")
        if self.teacher_weight < 0 or self.recorded_weight < 0 or self.teacher_weight + self.recorded_weight == 0:
            raise ValueError("teacher_weight and recorded_weight must be >= 0 and not both 0")


@dataclass
class StudentFeatures:
    ecg: Tensor  # (B, 12, L)
    first: Tensor  # F1 (B, C, V)
    fused: Tensor  # F* (B, C, V)
    fusion_weights: Tensor  # alpha (B, C, C)
    channel_weights: Tensor  # w (B, C)


@register("student", StudentConfig)
class Student(TranslationModel):
    """PPG -> 12 leads in one forward pass (recursive FEM/FTM, correlation gate, channel attention)."""

    def __init__(self, *, config: StudentConfig) -> None:
        super().__init__()
        self.config = config
        channels = config.channels

        def module(transposed: bool) -> Recursion:
            return Recursion(module=MultiScaleModule(channels=channels, c1_channels=config.c1_channels,
                                                     kernel_size=config.module_kernel, c2_kernel=config.c2_kernel,
                                                     transposed=transposed), depth=config.depth)

        self.first = ConvNormAct(nn.Conv1d(1, channels, config.outer_kernel), channels)
        self.encoder = module(False)
        self.decoder = module(True)
        self.gate = CorrelationGate(channels=channels)
        self.attention = ChannelAttention(channels=channels, hidden=config.attention_hidden)
        self.generator = nn.ConvTranspose1d(channels, N_LEADS, config.outer_kernel)
        nn.init.zeros_(self.generator.weight)  # start from the zero prediction, as li2021
        nn.init.zeros_(self.generator.bias)
        if config.init_weights:
            self._load_initial(config.init_weights)

    def _load_initial(self, weights_uri: str) -> None:
        from safetensors.torch import load as load_safetensors

        with uri_lib.storage_errors(weights_uri):
            state = load_safetensors(uri_lib.read_bytes(weights_uri))
        self.load_state_dict(state, strict=True)

    def features(self, ppg: Tensor) -> StudentFeatures:
        """ppg (B, L), already zeroed where absent -> ECG and the features the pruning score reads."""
        first = self.first(ppg[:, None, :])
        fused, alpha = self.gate(first, self.decoder(self.encoder(first)))
        weights = self.attention(fused)
        ecg = self.generator(fused * weights[:, :, None])
        return StudentFeatures(ecg=ecg, first=first, fused=fused, fusion_weights=alpha, channel_weights=weights)

    def forward_ppg(self, ppg: Tensor) -> Tensor:
        """(B, L) model-space PPG -> (B, 12, L) model-space ECG: the graph that ONNX export traces."""
        return self.features(ppg).ecg

    def forward(self, batch: Batch) -> Tensor:
        return self.forward_ppg(ppg_input(batch)[:, 0])

    def loss(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        out = self.features(ppg_input(batch)[:, 0])
        recorded_mask = regression_target_mask(batch, with_leads=False)
        recorded = masked_mse(out.ecg, batch["ecg"], recorded_mask)
        sparsity = group_sparsity(out.fused) + group_sparsity(out.first)
        total = self.config.recorded_weight * recorded + self.config.sparsity_weight * sparsity
        parts = {"mse": recorded.detach(), "sparsity": sparsity.detach()}
        if "teacher_ecg" in batch:
            # The teacher speaks for every lead of every window that has PPG.
            teacher_mask = batch["ppg_mask"].bool()[:, None].expand(-1, N_LEADS)
            teacher = masked_mse(out.ecg, batch["teacher_ecg"], teacher_mask)
            total = total + self.config.teacher_weight * teacher
            parts["mse_teacher"] = teacher.detach()
        return total, parts

    @torch.no_grad()
    def generate(self, batch: Batch, *, seed: int = 0) -> Tensor:
        return self(batch)  # one deterministic forward pass: `seed` is accepted for the common interface
