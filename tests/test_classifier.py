"""The fixed 12-lead diagnostic classifier: config, shapes, lead-mask handling, overfitting real windows."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import REPO_ROOT

from p2es_dist.config import load_yaml
from p2es_dist.constants import LABELS, N_LEADS, WINDOW
from p2es_dist.models import TranslationModel, build_model
from p2es_dist.models.classifier import ClassifierConfig, ECGClassifier

CONFIG = REPO_ROOT / "p2es_dist" / "configs" / "models" / "classifier.yaml"


def build() -> ECGClassifier:
    torch.manual_seed(0)
    return build_model(load_yaml(CONFIG)["model"])


def ecg_batch(batch_size: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ecg = torch.randn(batch_size, N_LEADS, WINDOW, generator=g) * 0.2
    mask = torch.rand(batch_size, N_LEADS, generator=g) > 0.4
    mask[0] = True  # a full 12-lead window
    mask[1] = False
    mask[1, 1] = True  # lead II only
    return ecg, mask


def test_config_covers_every_field_and_it_is_not_a_translation_model():
    section = load_yaml(CONFIG)["model"]
    assert set(section) - {"name"} == {f.name for f in dataclasses.fields(ClassifierConfig)}
    model = build()
    assert isinstance(model, ECGClassifier) and not isinstance(model, TranslationModel)
    assert not hasattr(model, "generate")


def test_predict_proba_shape_range_and_loss():
    model = build()
    ecg, mask = ecg_batch()
    labels = torch.zeros(5, len(LABELS))
    labels[0, 0] = labels[2, 3] = labels[2, 8] = 1.0  # windows 1, 3, 4 unlabelled
    loss, parts = model.loss({"ecg": ecg, "ecg_mask": mask, "labels": labels})
    assert loss.ndim == 0 and torch.isfinite(loss) and parts["n_labelled"].item() == 2
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    probabilities = model.eval().predict_proba(ecg, mask)
    assert probabilities.shape == (5, len(LABELS))
    assert ((probabilities > 0) & (probabilities < 1)).all()


def test_unrecorded_leads_do_not_matter_but_the_mask_does():
    model = build().eval()
    ecg, mask = ecg_batch()
    changed = ecg.clone()
    changed[~mask] = float("nan")
    assert torch.equal(model.predict_proba(ecg, mask), model.predict_proba(changed, mask))
    fewer = mask.clone()
    fewer[0, 7] = False
    assert not torch.allclose(model.predict_proba(ecg, mask)[0], model.predict_proba(ecg, fewer)[0])


@pytest.mark.real_data
def test_overfits_labels_on_real_bidmc_windows(bidmc_batch):
    """BIDMC has no diagnoses, so the labels are random multi-hot rows made here (fixed seed): what
    is tested is that the network can fit 13 labels on 32 real ECG windows, not that they are true."""
    g = torch.Generator().manual_seed(0)
    labels = (torch.rand(len(bidmc_batch["ecg"]), len(LABELS), generator=g) < 0.3).float()
    labels[labels.sum(1) == 0, 0] = 1.0  # every window labelled, so every window is in the loss
    batch = {**bidmc_batch, "labels": labels}
    model = build()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        optimizer.zero_grad()
        loss, _ = model.loss(batch)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > 0.5  # about log 2 or more at the start: nothing is fitted yet
    assert min(losses[-5:]) < 0.1 * losses[0], losses[::5]
