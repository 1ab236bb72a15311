"""`li2021`: the multi-task lightweight network of Li, Tian, Zhu, Wu, "A Lightweight Neural Network for
Inferring ECG and Diagnosing Cardiovascular Diseases from PPG" (2021).

    F1 = conv(x)                                first layer, highest resolution (C channels, length V)
    FEM: Y = [C1(X), C2(C1(X))]                 eq. 1; cascaded FEMs form the encoder
    FTM: the same with transposed convolutions  the decoder, back to length V; its output is F_T
    F*[i] = F_T[i] + sum_j a_ij F1[j]           eq. 2, attention gate: a = softmax_j((G Theta)[i, :]),
                                                G[i, j] = cos(F1[i], F_T[j]) (eqs. 3-4)
    ECG = convT(F*)                             ECG generation layer (eq. 5)
    logits = classifier(w * F*)                 diagnosis branch; w from channel statistics (SE-like)
    L = MSE + lambda_D BCE + lambda_S L_S       eq. 7; L_S = group sparsity (l1/l2) of F* and F1 (eq. 6)

Table VII (full network, `(in, out, kernel, stride)`): first conv (1, 60, 30, 1); FEM_1 C1 (60, 40, 15, 1),
C2 (40, 20, 3, 1); FEM_2 C1 (60, 40, 5, 1), C2 (40, 20, 3, 1); FTM_1 and FTM_2 mirror them with kernels 5
and 15; ECG generation (60, 1, 30, 1); attention gate FC 240-20-60; classifier convs (60, 30, 30, 2),
(30, 20, 10, 2), (20, 1, 4, 1) and FC 53-10-5. Layer normalisation after every convolution except
the ECG generation layer. Convolutions whose kernel changes the length are unpadded, so the encoder
shrinks the sequence (the paper's "contracting pathway" at stride 1) and the decoder grows it back.

Recursive lightweight variant (`recursive: true`, Sec. III-E, eq. 10): the cascade of FEMs (FTMs) is
replaced by one FEM (FTM) applied `recursive_depth` times with shared weights; `MultiScaleModule` is
the same class in both, and every other submodule keeps its name, so a pruned full network's weights
load into the lightweight one. `forward_features` returns F1, F*, the fusion and channel weights:
what the kernel significance score of eq. 11 needs for the pruning step of a later distillation.

Where this adapts the paper (which maps aligned single ~300-sample lead-II cycles from PPG):
- Input: 1024-sample, 125 Hz windows, not cycles; with `condition_on_leads` the first layer also
  reads the 12 condition leads (13 input channels) so `--condition II` works; PPG-only is `false`.
- Output: 12 leads, so the ECG generation layer is (60, 12, 30, 1).
- Diagnosis: multi-label BCE over `constants.LABELS` instead of a 5-way softmax, and only on windows
  that carry labels. The classifier's last conv output (length 234 here, 53 in the paper) is
  average-pooled to 53 so the FC stays 53-10-13 and the network accepts any window length.
- Layer norm is GroupNorm with one group: normalises over (channels, time) per window, with a
  per-channel affine, so it does not tie the model to one length. Activations (unstated) are ReLU,
  which matches the paper's G in [0, 1]: cosines of non-negative features.
- Loss weights: the paper's lambda_S = 5e-6 weighs a per-cycle sum of squared errors; our MSE is a
  per-sample mean over recorded leads, so lambda_S defaults to 5e-6 / 1024 ~ 5e-9. lambda_D stays 0.1:
  our BCE and MSE are both means and that keeps them balanced, the paper's stated criterion.
- Output layer zero-initialised (training starts from the zero prediction). Adam at 1e-3 diverges on
  this network; the paper's 5e-4 (or less) trains it.
- Table VIII (the recursive modules' sizes) is missing from our copy of the paper: a recursive FEM/FTM
  keeps the trunk width (C1 C->c1, C2 c1->C-c1) with a C1 kernel of 9, between FEM_1's 15 and FEM_2's 5.
  `li2021_recursive.yaml` also uses the widths left by the paper's pruning (C = 30, c1 = 20).
- Size: 222,108 parameters by default; with one input and one output channel and 5 classes the same
  code gives 180,609 against the paper's 180,829 (Table V), the gap being the unstated norm details.
- The semi-supervised cycle-consistency extension (Sec. III-D) is not implemented: partially paired
  data enter through the lead mask instead.
- Receptive field (issue 13): the paper's layers see +-51 samples of PPG (+-49 recursive), less than
  the ~70 samples from a QRS to its pulse upstroke in our windows, so the shipped configs dilate each
  FEM's C1 (and its mirroring FTM's): `fem_dilations`, or `recursive_dilation` for the recursive
  variant. Dilation changes no weight shape (the parameter count is the paper's), and the defaults
  stay the paper's (1), so checkpoints from before keep their meaning. PPG receptive field, samples
  each side: outer_kernel - 1 + sum over FEMs of ((kernel - 1) * dilation + c2_kernel - 1) [x depth
  for the recursive variant], e.g. 29 + (14 * 5 + 2) + (4 * 10 + 2) = 143 for `li2021.yaml`.
- Calibration template (`use_template`): the template's 12 leads and 12 constant "has this lead"
  channels are more input channels of the first layer; training hides it in a `template_dropout`
  fraction of windows. Leads given as input (`cond_leads`) are no target of the loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from p2es_dist.constants import LABELS, N_LEADS
from p2es_dist.models.base import (
    Batch,
    GenerationOptions,
    PopulationTemplate,
    TranslationModel,
    hide_templates,
    template_input,
    with_calibration,
)
from p2es_dist.models.common import (
    masked_bce,
    masked_mse,
    regression_target_mask,
    signal_channels,
    signal_input,
)
from p2es_dist.models.registry import register


@dataclass
class Li2021Config:
    # PPG receptive field with these (the paper's) defaults: +-51 samples (+-49 recursive), too short for
    # the ~70-sample pulse arrival (issue 13); the shipped configs dilate to +-143 (li2021.yaml) and +-145
    # (li2021_recursive.yaml). Formula: the module docstring's "Receptive field".
    channels: int = 60  # C: width of F1, of every FEM/FTM output and of F*
    c1_channels: int = 40  # C1 width; C2 outputs channels - c1_channels
    outer_kernel: int = 30  # first conv and ECG generation layer (equal, so lengths round-trip)
    fem_kernels: tuple[int, ...] = (15, 5)  # C1 kernels of the cascaded FEMs; the FTMs mirror them
    fem_dilations: tuple[int, ...] = (1, 1)  # of those C1 convolutions (and the FTMs'); one per FEM
    c2_kernel: int = 3  # odd: C2 is padded to keep the length so [C1, C2 o C1] concatenates
    recursive: bool = False  # lightweight variant: one FEM and one FTM reused recursive_depth times
    recursive_kernel: int = 9
    recursive_depth: int = 2
    recursive_dilation: int = 1  # of the recursive FEM's (and FTM's) C1 convolution
    condition_on_leads: bool = True
    attention_hidden: int = 20  # channel attention FC: 4C -> hidden -> C
    classifier_channels: tuple[int, ...] = (30, 20, 1)
    classifier_kernels: tuple[int, ...] = (30, 10, 4)
    classifier_strides: tuple[int, ...] = (2, 2, 1)
    classifier_pool: int = 53  # the paper's FC input width
    classifier_hidden: int = 10
    diagnosis: bool = True  # the diagnosis branch and its loss
    # Paper: lambda_D = 0.1 against a sum of squared errors of ECG cycles in [-1, 1], chosen "to balance
    # the loss terms". Our MSE and BCE are both means of comparable size, so 0.1 keeps them balanced.
    diagnosis_weight: float = 0.1
    # Paper: lambda_S = 5e-6 against that per-cycle sum; our MSE is a per-sample mean, so divide by L.
    sparsity_weight: float = 5e-9
    # The patient's calibration template (batch keys `template`, `template_mask`) as 24 more input
    # channels (leads, presence flags); off keeps configs and checkpoints from before it unchanged.
    use_template: bool = False
    template_dropout: float = 0.5  # training: fraction of windows whose template is hidden (zero-shot)
    template_residual: bool = True  # with use_template: the generator adds a correction to the template
    # The training population's calibration profile (data/calibration.py JSON), filled in by the trainer:
    # windows without the patient's template get the population's beat at their PPG upstrokes instead.
    population: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.fem_dilations) != len(self.fem_kernels):
            raise ValueError(f"fem_dilations needs one dilation per FEM kernel {list(self.fem_kernels)}, "
                             f"got {list(self.fem_dilations)}")
        if min(self.fem_dilations, default=1) < 1 or self.recursive_dilation < 1:
            raise ValueError("fem_dilations and recursive_dilation must be >= 1")
        if not 0.0 <= self.template_dropout <= 1.0:
            raise ValueError(f"template_dropout must be in [0, 1], got {self.template_dropout}")
        if not 0 < self.c1_channels < self.channels:
            raise ValueError(f"c1_channels must be in (0, channels={self.channels}), got {self.c1_channels}")
        if self.c2_kernel % 2 == 0:
            raise ValueError(f"c2_kernel must be odd, got {self.c2_kernel}")
        if not (len(self.classifier_channels) == len(self.classifier_kernels) == len(self.classifier_strides)):
            raise ValueError("classifier_channels, classifier_kernels and classifier_strides differ in length")
        if self.recursive_depth < 1:
            raise ValueError(f"recursive_depth must be >= 1, got {self.recursive_depth}")


class ConvNormAct(nn.Sequential):
    """Convolution (or transposed), layer norm over (channels, time), ReLU."""

    def __init__(self, conv: nn.Module, channels: int) -> None:
        super().__init__(conv, nn.GroupNorm(1, channels), nn.ReLU())


class MultiScaleModule(nn.Module):
    """FEM (convolutions) or FTM (transposed convolutions): Y = [C1(X), C2(C1(X))], eq. 1.

    C1 is unpadded (the length changes by kernel - 1: shorter in an FEM, longer in an FTM); C2 keeps it.
    Input and output both have `channels` channels, which is what lets one module recurse (eq. 10).
    """

    def __init__(self, *, channels: int, c1_channels: int, kernel_size: int, c2_kernel: int,
                 transposed: bool, dilation: int = 1) -> None:
        super().__init__()
        conv = nn.ConvTranspose1d if transposed else nn.Conv1d
        c2_channels = channels - c1_channels
        # Dilated, C1 spans (kernel_size - 1) * dilation + 1 samples and changes the length by one less.
        self.c1 = ConvNormAct(conv(channels, c1_channels, kernel_size, dilation=dilation), c1_channels)
        self.c2 = ConvNormAct(conv(c1_channels, c2_channels, c2_kernel, padding=c2_kernel // 2), c2_channels)

    def forward(self, x: Tensor) -> Tensor:
        short_scale = self.c1(x)
        return torch.cat([short_scale, self.c2(short_scale)], dim=1)


class Recursion(nn.Module):
    """One module applied `depth` times with the same weights: Y = M o ... o M (X), eq. 10.

    Holding the module once (not `depth` references in a ModuleList) keeps the state dict free of
    shared tensors, which safetensors refuses.
    """

    def __init__(self, *, module: nn.Module, depth: int) -> None:
        super().__init__()
        self.module = module
        self.depth = depth

    def forward(self, x: Tensor) -> Tensor:
        for _ in range(self.depth):
            x = self.module(x)
        return x


class CorrelationGate(nn.Module):
    """Fuses the first layer's features into the decoder's by channel correlation, eqs. 2-4."""

    def __init__(self, *, channels: int) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.eye(channels))

    def forward(self, first: Tensor, decoded: Tensor) -> tuple[Tensor, Tensor]:
        """(F1, F_T), both (B, C, V) -> (F*, alpha (B, C, C))."""
        eps = 1e-8  # keeps the cosine finite for an all-zero (dead ReLU) channel
        first_unit = first / first.norm(dim=-1, keepdim=True).clamp_min(eps)
        decoded_unit = decoded / decoded.norm(dim=-1, keepdim=True).clamp_min(eps)
        correlation = first_unit @ decoded_unit.transpose(1, 2)  # G[i, j] = cos(F1[i], F_T[j])
        alpha = torch.softmax(correlation @ self.theta, dim=-1)
        return decoded + alpha @ first, alpha


class ChannelAttention(nn.Module):
    """w in [0, 1]^C from each channel's mean, variance, max and min (SE-like; FC 4C - hidden - C)."""

    def __init__(self, *, channels: int, hidden: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(4 * channels, hidden), nn.ReLU(), nn.Linear(hidden, channels))

    def forward(self, features: Tensor) -> Tensor:
        statistics = torch.cat([
            features.mean(dim=-1), features.var(dim=-1, unbiased=False),
            features.amax(dim=-1), features.amin(dim=-1),
        ], dim=1)
        return torch.sigmoid(self.mlp(statistics))


class DiagnosisBranch(nn.Module):
    """Channel attention on F*, three strided convolutions, pooling to a fixed width, FC to label logits."""

    def __init__(self, *, config: Li2021Config) -> None:
        super().__init__()
        self.attention = ChannelAttention(channels=config.channels, hidden=config.attention_hidden)
        layers = []
        width = config.channels
        for out_width, kernel, stride in zip(config.classifier_channels, config.classifier_kernels,
                                             config.classifier_strides, strict=True):
            layers.append(ConvNormAct(nn.Conv1d(width, out_width, kernel, stride=stride), out_width))
            width = out_width
        self.convs = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool1d(config.classifier_pool)
        self.head = nn.Sequential(
            nn.Linear(width * config.classifier_pool, config.classifier_hidden), nn.ReLU(),
            nn.Linear(config.classifier_hidden, len(LABELS)),
        )

    def forward(self, fused: Tensor) -> tuple[Tensor, Tensor]:
        """F* (B, C, V) -> (label logits (B, 13), channel weights w (B, C))."""
        weights = self.attention(fused)
        features = self.pool(self.convs(fused * weights[:, :, None]))
        return self.head(features.flatten(1)), weights


def group_sparsity(features: Tensor) -> Tensor:
    """Eq. 6 for one feature map per window: sum of row (channel) l2 norms plus sum of column (time)
    l2 norms, averaged over the batch. The epsilon under the root keeps the gradient finite (zero) at
    an all-zero group, which ReLU features produce."""
    eps = 1e-12
    squared = features.square()
    rows = (squared.sum(dim=2) + eps).sqrt().sum(dim=1)
    columns = (squared.sum(dim=1) + eps).sqrt().sum(dim=1)
    return (rows + columns).mean()


@dataclass
class Li2021Output:
    ecg: Tensor  # (B, 12, L)
    logits: Tensor | None  # (B, 13) label logits, None without the diagnosis branch
    first: Tensor  # F1 (B, C, V)
    fused: Tensor  # F* (B, C, V)
    fusion_weights: Tensor  # alpha (B, C, C)
    channel_weights: Tensor | None  # w (B, C)


@register("li2021", Li2021Config)
class Li2021(TranslationModel):
    """Multi-scale encoder-decoder with correlation-gated skip, diagnosis branch, sparse features."""

    def __init__(self, *, config: Li2021Config) -> None:
        super().__init__()
        self.config = config
        self.population = PopulationTemplate(config.population if config.use_template else None)
        in_channels = signal_channels(with_leads=config.condition_on_leads, with_template=config.use_template,
                                      template_flags=True)
        self.first = ConvNormAct(nn.Conv1d(in_channels, config.channels, config.outer_kernel), config.channels)
        self.encoder, self.decoder = self._build_pathways(config)
        self.gate = CorrelationGate(channels=config.channels)
        self.generator = nn.ConvTranspose1d(config.channels, N_LEADS, config.outer_kernel)
        # Start from the zero prediction (the paper does not say): the default init gives an MSE 20x
        # the ECG's own power at step 0, which only costs the first steps.
        nn.init.zeros_(self.generator.weight)
        nn.init.zeros_(self.generator.bias)
        self.diagnosis = DiagnosisBranch(config=config) if config.diagnosis else None

    @staticmethod
    def _build_pathways(config: Li2021Config) -> tuple[nn.Module, nn.Module]:
        def module(kernel: int, dilation: int, transposed: bool) -> MultiScaleModule:
            return MultiScaleModule(channels=config.channels, c1_channels=config.c1_channels,
                                    kernel_size=kernel, c2_kernel=config.c2_kernel, transposed=transposed,
                                    dilation=dilation)

        if config.recursive:
            kernel, dilation, depth = config.recursive_kernel, config.recursive_dilation, config.recursive_depth
            return (Recursion(module=module(kernel, dilation, False), depth=depth),
                    Recursion(module=module(kernel, dilation, True), depth=depth))
        fems = list(zip(config.fem_kernels, config.fem_dilations, strict=True))
        encoder = nn.Sequential(*[module(k, d, False) for k, d in fems])
        decoder = nn.Sequential(*[module(k, d, True) for k, d in reversed(fems)])
        return encoder, decoder

    def forward_features(self, batch: Batch) -> Li2021Output:
        if self.config.use_template:
            batch = self.population.fill(batch)
        first = self.first(signal_input(batch, with_leads=self.config.condition_on_leads,
                                        with_template=self.config.use_template, template_flags=True))
        fused, alpha = self.gate(first, self.decoder(self.encoder(first)))
        ecg = self.generator(fused)
        if self.config.use_template and self.config.template_residual:
            ecg = ecg + template_input(batch).to(ecg.dtype)  # a correction to the patient's template
        logits = weights = None
        if self.diagnosis is not None:
            logits, weights = self.diagnosis(fused)
        return Li2021Output(ecg=ecg, logits=logits, first=first, fused=fused,
                            fusion_weights=alpha, channel_weights=weights)

    def forward(self, batch: Batch) -> Tensor:
        return self.forward_features(batch).ecg

    def loss(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        if self.config.use_template and self.training:
            batch = hide_templates(batch, self.config.template_dropout)
        out = self.forward_features(batch)
        mask = regression_target_mask(batch, with_leads=self.config.condition_on_leads,
                                      with_template=self.config.use_template)
        mse = masked_mse(out.ecg, batch["ecg"], mask)
        sparsity = group_sparsity(out.fused) + group_sparsity(out.first)
        total = mse + self.config.sparsity_weight * sparsity
        parts = {"mse": mse.detach(), "sparsity": sparsity.detach(), "n_pairs": mask.sum().detach()}
        if out.logits is not None and "labels" in batch:
            bce = masked_bce(out.logits, batch["labels"])
            total = total + self.config.diagnosis_weight * bce
            parts["bce"] = bce.detach()
        return total, parts

    @torch.no_grad()
    def generate(self, batch: Batch, options: GenerationOptions | None = None) -> Tensor:
        return self(with_calibration(batch, options))  # deterministic: only `options.calibration` acts

    @torch.no_grad()
    def diagnose(self, batch: Batch) -> Tensor:
        """(B, 13) label probabilities from the diagnosis branch."""
        logits = self.forward_features(batch).logits
        if logits is None:
            raise RuntimeError("li2021: built with diagnosis: false, so it has no diagnosis branch")
        return torch.sigmoid(logits)
