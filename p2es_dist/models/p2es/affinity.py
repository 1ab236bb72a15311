"""Demographic-aware lead affinity: KNN over learned prototypes + a contrastive embedding.

1. `AffinityEmbedding`: age, sex and a few PPG features -> a unit vector z. Trained with a supervised
   contrastive loss (Khosla et al. 2020) in which windows of the same `subject`, or of the same sex
   with ages within `contrastive_age_tolerance` years, are positives.
2. K prototypes on the unit sphere, found by k-means over z of training windows (`initialise`), then
   learned with the rest of the model.
3. Each prototype owns a 12x12 inter-lead affinity matrix, initialised as the mean Pearson correlation
   between leads over the recorded 12-lead training windows of its cluster, then learned.
4. A window's `affinity_neighbours` nearest prototypes (cosine similarity) get softmax weights; the
   weighted sum of their matrices mixes lead features in the reverse network (`network.LeadMixing`).

Windows without PPG (12-lead corpora) are embedded from demographics alone, which is what lets their
lead correlations land in the cluster of PPG windows of similar patients.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from p2es_dist.constants import N_LEADS, SEX_FEMALE, SEX_MALE

AGE_SCALE = 100.0
EMBEDDING_KEYS = ("ppg", "ppg_mask", "age", "sex", "subject")  # what the embedding and its loss read


@dataclass(kw_only=True)
class AffinityConfig:
    affinity: bool = True  # off: leads are mixed by the identity (the ablation)
    affinity_prototypes: int = 8  # K, k-means clusters
    affinity_neighbours: int = 3  # prototypes that weight each window's matrix
    affinity_dim: int = 32
    affinity_temperature: float = 0.1  # softmax over the neighbours' cosine similarities
    contrastive_weight: float = 0.1  # of the contrastive loss in the training loss
    contrastive_temperature: float = 0.1
    contrastive_age_tolerance: float = 5.0  # years; same sex and closer than this -> positive pair
    affinity_warmup_steps: int = 50  # contrastive-only steps in `initialise`, before k-means
    affinity_warmup_lr: float = 1e-3

    def __post_init__(self) -> None:
        if self.affinity_prototypes < 1:
            raise ValueError(f"affinity_prototypes must be >= 1, got {self.affinity_prototypes}")
        if not 1 <= self.affinity_neighbours <= self.affinity_prototypes:
            raise ValueError(
                f"affinity_neighbours must be in [1, affinity_prototypes={self.affinity_prototypes}], "
                f"got {self.affinity_neighbours}"
            )


class AffinityEmbedding(nn.Module):
    """(PPG, PPG present, age, sex) -> z on the unit sphere, (B, dim)."""

    def __init__(self, *, dim: int, ppg_channels: int = 16) -> None:
        super().__init__()
        # Strided, so this stays a few thousand parameters and cheap next to the generator.
        self.ppg = nn.Sequential(
            nn.Conv1d(1, ppg_channels, 9, stride=4, padding=4),
            nn.SiLU(),
            nn.Conv1d(ppg_channels, ppg_channels, 9, stride=4, padding=4),
            nn.SiLU(),
            nn.Conv1d(ppg_channels, ppg_channels, 9, stride=4, padding=4),
        )
        demographics = 2 + 3  # age, age known, sex one-hot (female, male, unknown)
        self.mlp = nn.Sequential(
            nn.Linear(2 * ppg_channels + 1 + demographics, 64), nn.SiLU(), nn.Linear(64, dim)
        )

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        present = batch["ppg_mask"].bool()
        ppg = torch.where(present[:, None], batch["ppg"], torch.zeros_like(batch["ppg"]))
        h = self.ppg(ppg[:, None, :].float())
        ppg_features = torch.cat([h.mean(dim=-1), h.std(dim=-1)], dim=-1) * present[:, None]
        age = batch["age"].float()
        age_known = ~torch.isnan(age)
        age_scaled = torch.where(age_known, age / AGE_SCALE, torch.zeros_like(age))
        sex = batch["sex"].long()
        sex_index = torch.where((sex == SEX_FEMALE) | (sex == SEX_MALE), sex, torch.full_like(sex, 2))
        features = torch.cat(
            [
                ppg_features,
                present[:, None].float(),
                age_scaled[:, None],
                age_known[:, None].float(),
                nn.functional.one_hot(sex_index, 3).float(),
            ],
            dim=-1,
        )
        return nn.functional.normalize(self.mlp(features), dim=-1)


def positive_pairs(batch: dict[str, Tensor], *, age_tolerance: float) -> Tensor:
    """(B, B) bool: same subject, or same known sex with known ages within `age_tolerance`; no self-pairs."""
    subject, age, sex = batch["subject"], batch["age"].float(), batch["sex"].long()
    same_subject = subject[:, None] == subject[None, :]
    sex_known = (sex == SEX_FEMALE) | (sex == SEX_MALE)
    age_known = ~torch.isnan(age)
    close_age = (age[:, None] - age[None, :]).abs() <= age_tolerance  # NaN compares False
    similar = (sex[:, None] == sex[None, :]) & sex_known[:, None] & sex_known[None, :] & close_age
    similar = similar & age_known[:, None] & age_known[None, :]
    not_self = ~torch.eye(len(subject), dtype=torch.bool, device=subject.device)
    return (same_subject | similar) & not_self


def supervised_contrastive_loss(z: Tensor, positives: Tensor, *, temperature: float) -> Tensor:
    """SupCon: mean over anchors with a positive of -mean_p log softmax_{j != i}(z_i . z_j / temperature)_p."""
    logits = z @ z.T / temperature
    self_pair = torch.eye(len(z), dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_pair, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    log_prob = torch.where(positives, log_prob, torch.zeros_like(log_prob))  # also drops the -inf diagonal
    n_positive = positives.sum(dim=1)
    anchors = n_positive > 0
    if not anchors.any():
        return z.sum() * 0.0  # graph-connected zero: a batch of strangers still takes a step
    per_anchor = -log_prob.sum(dim=1) / n_positive.clamp_min(1)
    return per_anchor[anchors].mean()


def lead_correlations(ecg: Tensor, recorded: Tensor) -> tuple[Tensor, Tensor]:
    """Per-window 12x12 Pearson correlations (N, 12, 12) and which windows have all 12 leads, non-flat."""
    x = ecg.double()
    x = x - x.mean(dim=-1, keepdim=True)
    cov = x @ x.transpose(1, 2)
    std = cov.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt()
    usable = recorded.bool().all(dim=1) & (std > 1e-8).all(dim=1)
    corr = cov / (std[:, :, None] * std[:, None, :]).clamp_min(1e-12)
    return corr.float(), usable


class LeadAffinity(nn.Module):
    """Batch -> (per-window 12x12 affinity (B, 12, 12), embedding z (B, dim))."""

    def __init__(self, *, config: AffinityConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = AffinityEmbedding(dim=config.affinity_dim)
        prototypes = nn.functional.normalize(torch.randn(config.affinity_prototypes, config.affinity_dim), dim=-1)
        self.prototypes = nn.Parameter(prototypes)
        # Identity until `initialise` has seen data: then an untrained model mixes no leads.
        self.matrices = nn.Parameter(torch.eye(N_LEADS).repeat(config.affinity_prototypes, 1, 1))

    def prototype_weights(self, z: Tensor) -> Tensor:
        """(B, K): softmax over the cosine similarities of the k nearest prototypes, 0 elsewhere."""
        similarity = z @ nn.functional.normalize(self.prototypes, dim=-1).T
        top, index = similarity.topk(self.config.affinity_neighbours, dim=-1)
        weights = torch.softmax(top / self.config.affinity_temperature, dim=-1)
        return torch.zeros_like(similarity).scatter(-1, index, weights)

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        z = self.embedding(batch)
        weights = self.prototype_weights(z)
        return torch.einsum("bk,klm->blm", weights, self.matrices), z

    def contrastive_loss(self, z: Tensor, batch: dict[str, Tensor]) -> Tensor:
        positives = positive_pairs(batch, age_tolerance=self.config.contrastive_age_tolerance)
        return supervised_contrastive_loss(z, positives, temperature=self.config.contrastive_temperature)

    def initialise(self, batches: Iterable[dict[str, Tensor]], *, seed: int, max_windows: int) -> dict[str, Any]:
        """Contrastive warm-up of the embedding, k-means prototypes, per-cluster lead correlations."""
        from sklearn.cluster import KMeans

        windows = _collect(batches, max_windows=max_windows)
        n = len(windows["age"]) if windows else 0
        if n == 0:
            return {"initialised": False, "reason": "no windows in the batches given"}
        device = self.prototypes.device
        generator = torch.Generator().manual_seed(seed)
        optimiser = torch.optim.Adam(self.embedding.parameters(), lr=self.config.affinity_warmup_lr)
        warmup_losses = []
        for _ in range(self.config.affinity_warmup_steps):
            index = torch.randperm(n, generator=generator)[: min(n, 256)]
            minibatch = {key: windows[key][index].to(device) for key in EMBEDDING_KEYS}
            loss = self.contrastive_loss(self.embedding(minibatch), minibatch)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            warmup_losses.append(float(loss.detach()))

        with torch.no_grad():
            z = torch.cat([
                self.embedding({key: windows[key][i : i + 512].to(device) for key in EMBEDDING_KEYS}).cpu()
                for i in range(0, n, 512)
            ])
            z_np = z.double().numpy()
            n_distinct = len(np.unique(z_np.round(6), axis=0))
            n_clusters = min(self.config.affinity_prototypes, n_distinct)
            kmeans = KMeans(n_clusters=n_clusters, n_init=10, random_state=seed).fit(z_np)
            centres = torch.tensor(kmeans.cluster_centers_, dtype=torch.float32)
            # With fewer distinct windows than prototypes, the spare prototypes repeat centres; duplicates
            # split their weight in `prototype_weights` and are free to drift apart in training.
            spare = torch.arange(self.config.affinity_prototypes) % n_clusters
            self.prototypes.copy_(nn.functional.normalize(centres[spare], dim=-1).to(device))

            labels = torch.tensor(kmeans.labels_, dtype=torch.long)
            usable = windows["usable"]
            corr = windows["corr"]
            report: dict[str, Any] = {
                "initialised": True,
                "windows": n,
                "windows_12_lead": int(usable.sum()),
                "clusters": n_clusters,
                "cluster_sizes": torch.bincount(labels, minlength=n_clusters).tolist(),
                "warmup_steps": len(warmup_losses),
                "warmup_contrastive_loss": [warmup_losses[0], warmup_losses[-1]] if warmup_losses else [],
            }
            if not usable.any():
                self.matrices.copy_(torch.eye(N_LEADS, device=device).repeat(len(self.matrices), 1, 1))
                report["matrices"] = "identity"
                report["note"] = "no window with 12 recorded leads: affinity matrices left at the identity"
                return report
            overall = corr[usable].mean(dim=0)
            per_cluster_12_lead = []
            for k in range(n_clusters):
                members = usable & (labels == k)
                per_cluster_12_lead.append(int(members.sum()))
                matrix = corr[members].mean(dim=0) if members.any() else overall
                self.matrices[spare == k] = matrix.to(device)
            report["matrices"] = "lead_correlation"
            report["cluster_windows_12_lead"] = per_cluster_12_lead
            if min(per_cluster_12_lead) == 0:
                report["note"] = "clusters without 12-lead windows use the mean correlation of all 12-lead windows"
            return report


def _collect(batches: Iterable[dict[str, Tensor]], *, max_windows: int) -> dict[str, Tensor]:
    """Concatenate on CPU what the embedding reads, plus per-window lead correlations (not the ECG)."""
    parts: dict[str, list[Tensor]] = {}
    total = 0
    for batch in batches:
        take = min(len(batch["age"]), max_windows - total)
        if take <= 0:
            break
        corr, usable = lead_correlations(batch["ecg"][:take].detach().cpu(), batch["ecg_mask"][:take].cpu())
        row = {key: batch[key][:take].detach().cpu() for key in EMBEDDING_KEYS}
        row["ppg"] = row["ppg"].float()
        row.update(corr=corr, usable=usable)
        for key, value in row.items():
            parts.setdefault(key, []).append(value)
        total += take
    return {key: torch.cat(values) for key, values in parts.items()}
