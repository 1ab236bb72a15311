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

PPG receptive field (issue 13): outer_kernel - 1 + depth * ((module_kernel - 1) * module_dilation
+ c2_kernel - 1) samples each side: +-49 undilated, less than the ~70 samples from a QRS to its
pulse upstroke, so the shipped configs set `module_dilation: 7` (+-145, 1.2 s); dilation changes no
weight shape, and the default stays 1 so students distilled before keep their meaning.

Calibration template (`use_template`): the template's 12 leads and 12 constant "has this lead" channels
are more input channels of the first layer; a lead counts as present when its template is not all
zero (`template_input` zeroes the leads `template_mask` leaves out), so `forward_ppg(ppg, template)`
needs no mask. Training hides it in a `template_dropout` fraction of windows. Windows without the
patient's template get the training population's (`calibration_template`). The exported graphs take the
template, its lead mask and the PPG upstrokes as inputs and embed the population (`export/template_graph.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from p2es_dist.constants import N_LEADS
from p2es_dist.models.base import (
    Batch,
    GenerationOptions,
    PopulationTemplate,
    TranslationModel,
    hide_templates,
    template_input,
    with_calibration,
)
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


@dataclass
class StudentConfig:
    channels: int = 32  # C: width of F1, of the recursive FEM/FTM and of F* (pruning shrinks it)
    c1_channels: int = 20  # C1 width inside FEM/FTM; C2 outputs channels - c1_channels
    outer_kernel: int = 30  # first conv and generation layer, as Table VII
    module_kernel: int = 9  # C1 kernel of the recursive FEM/FTM (see li2021: Table VIII is missing)
    c2_kernel: int = 3
    depth: int = 2  # recursion depth R, matching the paper's two cascaded modules
    # Of the recursive modules' C1 convolution. PPG receptive field with these defaults: +-49 samples,
    # less than the ~70-sample pulse arrival (issue 13); student.yaml and distill.yaml set 7: +-145.
    module_dilation: int = 1
    attention_hidden: int = 8  # channel attention FC: 4C -> hidden -> C
    teacher_weight: float = 1.0  # MSE to the teacher's output
    recorded_weight: float = 1.0  # MSE to the recorded leads
    sparsity_weight: float = 5e-9  # li2021's lambda_S for a per-sample mean MSE
    # Weights (a model.safetensors URI) to start from instead of a random init: the distiller points it
    # at the pruned student for the fine-tune and removes it from the final checkpoint's model.json.
    init_weights: str | None = None
    # The patient's calibration template (batch keys `template`, `template_mask`) as 24 more input
    # channels; off keeps configs and checkpoints from before it unchanged (its keys are never read).
    use_template: bool = False
    template_dropout: float = 0.5  # training: fraction of windows whose template is hidden (zero-shot)
    template_residual: bool = True  # with use_template: the generator adds a correction to the template
    # The training population's calibration profile (data/calibration.py JSON), filled in by the trainer:
    # windows without the patient's template get the population's beat at their PPG upstrokes instead.
    population: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.module_dilation < 1:
            raise ValueError(f"module_dilation must be >= 1, got {self.module_dilation}")
        if not 0.0 <= self.template_dropout <= 1.0:
            raise ValueError(f"template_dropout must be in [0, 1], got {self.template_dropout}")
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
        self.population = PopulationTemplate(config.population if config.use_template else None)
        channels = config.channels

        def module(transposed: bool) -> Recursion:
            return Recursion(module=MultiScaleModule(channels=channels, c1_channels=config.c1_channels,
                                                     kernel_size=config.module_kernel, c2_kernel=config.c2_kernel,
                                                     transposed=transposed, dilation=config.module_dilation),
                             depth=config.depth)

        in_channels = 1 + (2 * N_LEADS if config.use_template else 0)
        self.first = ConvNormAct(nn.Conv1d(in_channels, channels, config.outer_kernel), channels)
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
        from p2es_dist.models.checkpoint import read_weights

        self.load_state_dict(read_weights(weights_uri), strict=True)

    def signals(self, ppg: Tensor, template: Tensor | None = None) -> Tensor:
        """The first layer's input: PPG (B, L), then (with `use_template`) the template (B, 12, L), zeros
        where absent or when None, and per lead a constant channel, 1 where the template is not all zero."""
        x = ppg[:, None, :]
        if not self.config.use_template:
            return x
        if template is None:
            template = torch.zeros(ppg.shape[0], N_LEADS, ppg.shape[-1], dtype=ppg.dtype, device=ppg.device)
        present = (template != 0).any(dim=-1, keepdim=True).to(ppg.dtype)
        return torch.cat([x, template.to(ppg.dtype), present.expand(-1, -1, ppg.shape[-1])], dim=1)

    def features(self, ppg: Tensor, template: Tensor | None = None) -> StudentFeatures:
        """ppg (B, L), already zeroed where absent (and the template, see `signals`) -> ECG and the
        features the pruning score reads."""
        first = self.first(self.signals(ppg, template))
        fused, alpha = self.gate(first, self.decoder(self.encoder(first)))
        weights = self.attention(fused)
        ecg = self.generator(fused * weights[:, :, None])
        if self.config.use_template and self.config.template_residual and template is not None:
            ecg = ecg + template.to(ecg.dtype)  # the generator starts at zero: untrained = the template
        return StudentFeatures(ecg=ecg, first=first, fused=fused, fusion_weights=alpha, channel_weights=weights)

    def forward_ppg(self, ppg: Tensor, template: Tensor | None = None) -> Tensor:
        """(B, L) model-space PPG (and, with `use_template`, an optional (B, 12, L) template, already
        masked and filled as `calibration_template` gives it) -> (B, 12, L) model-space ECG: the graph
        that ONNX export traces (a template student through `export.template_graph.CalibratedGraph`)."""
        return self.features(ppg, template).ecg

    def calibration_template(self, batch: Batch) -> Tensor | None:
        """The first layer's template for `batch`: the patient's (`template`, `template_mask`), else the
        population's at the window's upstrokes; zeros without either. None for a student without `use_template`.

        What training, pruning's significance and the exported graphs all feed the student."""
        if not self.config.use_template:
            return None
        filled = self.population.fill(batch)
        if "template" not in filled:  # no calibration columns and no population: zero-shot from PPG alone
            ppg = batch["ppg"]
            return torch.zeros(ppg.shape[0], N_LEADS, ppg.shape[-1], dtype=ppg.dtype, device=ppg.device)
        return template_input(filled)

    def forward(self, batch: Batch) -> Tensor:
        return self.forward_ppg(ppg_input(batch)[:, 0], self.calibration_template(batch))

    def loss(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        if self.config.use_template and self.training:
            batch = hide_templates(batch, self.config.template_dropout)
        out = self.features(ppg_input(batch)[:, 0], self.calibration_template(batch))
        recorded_mask = regression_target_mask(batch, with_leads=False, with_template=self.config.use_template)
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
    def generate(self, batch: Batch, options: GenerationOptions | None = None) -> Tensor:
        return self(with_calibration(batch, options))  # one deterministic pass: only `options.calibration` acts
