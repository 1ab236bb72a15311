"""The foundation encoder: channel subsets, key padding, masked loss, overfitting, reconstruction, P2Es plug-in."""

from __future__ import annotations

import shutil

import pytest
import torch

from p2es_dist.config import load_yaml, packaged_config_path
from p2es_dist.constants import LEAD_INDEX, N_LEADS, WINDOW
from p2es_dist.errors import ConfigError, UserError
from p2es_dist.models import checkpoint
from p2es_dist.models.base import GenerationOptions, count_parameters
from p2es_dist.models.encoder import (
    N_CHANNELS,
    PPG_CHANNEL,
    Encoder,
    EncoderConfig,
    batch_channels,
    pretraining_visible,
)
from p2es_dist.models.registry import build_model

TINY = {"name": "encoder", "size": "tiny"}
THREE_LEADS = [LEAD_INDEX["I"], LEAD_INDEX["II"], LEAD_INDEX["V1"]]


def encoder(seed: int = 0, **overrides: object) -> Encoder:
    torch.manual_seed(seed)
    return build_model({**TINY, **overrides})


def make_batch(kind: str, batch_size: int = 4, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """`ppg` (PPG only), `3lead` (I, II, V1, no PPG) or `12lead` windows; absent signals hold NaN."""
    g = torch.Generator().manual_seed(seed)
    ecg_mask = torch.zeros(batch_size, N_LEADS, dtype=torch.bool)
    if kind == "3lead":
        ecg_mask[:, THREE_LEADS] = True
    elif kind == "12lead":
        ecg_mask[:] = True
    ppg_mask = torch.full((batch_size,), kind == "ppg")
    ecg = 0.3 * torch.randn(batch_size, N_LEADS, WINDOW, generator=g)
    ppg = torch.rand(batch_size, WINDOW, generator=g) * 2 - 1
    return {
        "ecg": torch.where(ecg_mask[:, :, None], ecg, torch.full_like(ecg, float("nan"))),
        "ecg_mask": ecg_mask,
        "ppg": torch.where(ppg_mask[:, None], ppg, torch.full_like(ppg, float("nan"))),
        "ppg_mask": ppg_mask,
        "age": torch.full((batch_size,), 50.0),
        "sex": torch.zeros(batch_size, dtype=torch.int64),
        "labels": torch.zeros(batch_size, 13),
        "subject": torch.arange(batch_size),
    }


def concat(*batches: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: torch.cat([b[key] for b in batches]) for key in batches[0]}


def save_checkpoint(model: torch.nn.Module, model_section: dict, folder) -> str:
    checkpoint.save_checkpoint(model, model_section, folder)
    return str(folder)


# --- configs and shapes --------------------------------------------------------------------------------
def test_size_presets_and_overrides() -> None:
    sizes = {size: count_parameters(build_model({"name": "encoder", "size": size})) for size in ("tiny", "small")}
    assert sizes["tiny"] < 300_000 < sizes["small"]
    config = EncoderConfig(size="small", depth=1)
    assert (config.width, config.depth, config.heads) == (192, 1, 6)
    for size in ("tiny", "small", "base"):
        section = load_yaml(packaged_config_path(f"models/encoder_{size}"))["model"]
        assert EncoderConfig(**{k: v for k, v in section.items() if k != "name"}).architecture() == \
            EncoderConfig(size=size).architecture()
    with pytest.raises(ConfigError, match="patch_len"):
        build_model({**TINY, "patch_len": 30})


@pytest.mark.parametrize("kind,channels", [("ppg", [PPG_CHANNEL]), ("3lead", THREE_LEADS), ("12lead", range(12))])
def test_shapes_for_channel_subsets(kind: str, channels) -> None:
    model = encoder()
    batch = make_batch(kind)
    patches = WINDOW // model.config.patch_len
    tokens, padding = model.encode(batch)
    assert tokens.shape == (4, N_CHANNELS, patches, model.width) and padding.shape == (4, N_CHANNELS, patches)
    expected_present = torch.zeros(N_CHANNELS, dtype=torch.bool)
    expected_present[list(channels)] = True
    assert torch.equal(~padding[0, :, 0], expected_present)
    assert torch.all(tokens[padding] == 0) and torch.isfinite(tokens).all()
    assert model.embed(batch).shape == (4, model.width)
    loss, parts = model.loss(batch)
    assert loss.ndim == 0 and torch.isfinite(loss) and set(parts) == {"recon", "recon_time", "recon_channel"}
    given = torch.zeros(4, N_CHANNELS, dtype=torch.bool)
    given[:, channels[0] if kind != "ppg" else PPG_CHANNEL] = True
    reconstructed = model.reconstruct(batch, given)
    assert reconstructed.shape == (4, N_LEADS, WINDOW) and torch.isfinite(reconstructed).all()


def test_absent_channels_do_not_change_the_embedding() -> None:
    model = encoder()
    ppg_only = make_batch("ppg", seed=1)
    reference = model.embed(ppg_only)
    altered = dict(ppg_only, ecg=torch.randn_like(ppg_only["ecg"]) * 5)  # absent leads: junk instead of NaN
    assert torch.equal(model.embed(altered), reference)
    # In a batch with 12-lead windows (more tokens, so more key padding for the PPG windows) too.
    mixed = model.embed(concat(ppg_only, make_batch("12lead", seed=2)))
    torch.testing.assert_close(mixed[:4], reference, atol=1e-5, rtol=1e-5)
    # An ECG-only batch may leave PPG out entirely.
    twelve = make_batch("12lead", seed=2)
    without_ppg = {k: v for k, v in twelve.items() if not k.startswith("ppg")}
    assert torch.equal(model.embed(without_ppg), model.embed(twelve))
    # A present channel does change it.
    changed = dict(ppg_only, ppg=ppg_only["ppg"].flip(-1))
    assert not torch.allclose(model.embed(changed), reference, atol=1e-3)


def test_embed_is_eval_and_restores_training_mode() -> None:
    model = encoder(dropout=0.5).train()
    batch = make_batch("3lead")
    assert torch.equal(model.embed(batch), model.embed(batch))
    assert model.training


def test_channel_embed_keeps_each_channel_apart_and_averages_to_embed() -> None:
    model = encoder()
    batch = make_batch("3lead", seed=3)
    per_channel = model.channel_embed(batch).reshape(4, N_CHANNELS, model.width)
    recorded = torch.zeros(N_CHANNELS, dtype=torch.bool)
    recorded[THREE_LEADS] = True
    assert torch.all(per_channel[:, ~recorded] == 0) and torch.all(per_channel[:, recorded].abs().sum(-1) > 0)
    # Every recorded channel has the same number of tokens: embed is the mean of the recorded channels' rows.
    torch.testing.assert_close(per_channel[:, recorded].mean(dim=1), model.embed(batch), atol=1e-6, rtol=1e-5)
    # Changing one lead moves that lead's row (and, through attention, the others), never an absent row.
    changed = dict(batch, ecg=batch["ecg"].clone())
    changed["ecg"][:, THREE_LEADS[0]] *= -1
    moved = model.channel_embed(changed).reshape(4, N_CHANNELS, model.width)
    assert not torch.allclose(moved[:, THREE_LEADS[0]], per_channel[:, THREE_LEADS[0]], atol=1e-3)
    assert torch.all(moved[:, ~recorded] == 0)


# --- pretraining masks and loss ----------------------------------------------------------------------
def test_pretraining_masks_follow_the_recorded_channels() -> None:
    present = torch.rand(4000, N_CHANNELS, generator=torch.Generator().manual_seed(0)) < 0.5
    present[:, 1] = True
    multi = present.sum(dim=1) > 1
    # Time masking and single-channel windows, no channel dropout.
    config = EncoderConfig(size="tiny", mask_ratio=0.5, channel_drop_p=0.0, single_channel_p=0.25)
    torch.manual_seed(0)
    visible = pretraining_visible(present, 32, config)
    assert not (visible & ~present[:, :, None]).any()  # never a token of an unrecorded channel
    channels_visible = visible.any(dim=-1)
    assert channels_visible.any(dim=1).all()  # every window keeps something
    single = multi & (channels_visible.sum(dim=1) == 1)
    assert abs(float(single.float().sum() / multi.sum()) - 0.25) < 0.03
    assert visible[single].any(dim=-1).eq(visible[single].all(dim=-1)).all()  # its one channel stays whole
    rest = ~single & multi
    hidden = 1 - visible[rest].sum() / (channels_visible[rest].sum() * 32)
    assert abs(float(hidden) - 0.5) < 0.02
    # Channel dropout alone: whole channels hidden, at least one kept.
    config = EncoderConfig(size="tiny", mask_ratio=0.0, channel_drop_p=0.25, single_channel_p=0.0)
    visible = pretraining_visible(present, 32, config)
    assert visible.any(dim=-1).eq(visible.all(dim=-1)).all() and visible.any(dim=(1, 2)).all()
    dropped = 1 - visible.all(dim=-1).sum() / present.sum()
    assert 0.2 < float(dropped) < 0.3


def test_loss_only_on_hidden_patches_of_recorded_channels() -> None:
    model = encoder()
    batch = concat(make_batch("3lead", seed=3), make_batch("ppg", seed=4))  # NaN in every unrecorded channel
    captured = {}

    def keep(module, args, output):
        output.retain_grad()
        captured.update(visible=args[1], queries=args[2], output=output)

    model.decoder.register_forward_hook(keep)
    torch.manual_seed(0)
    loss, _ = model.loss(batch)
    loss.backward()
    _, present = batch_channels(batch)
    visible, queries = captured["visible"], captured["queries"]
    assert torch.equal(queries, present[:, :, None] & ~visible) and queries.any()
    touched = captured["output"].grad.abs().sum(dim=-1) > 0
    assert not (touched & ~queries).any()  # no gradient from visible patches or absent channels
    assert touched.sum() > 0.9 * queries.sum()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # Junk instead of NaN in the unrecorded channels gives the same loss under the same masks.
    junk = dict(batch, ecg=torch.nan_to_num(batch["ecg"], nan=7.0), ppg=torch.nan_to_num(batch["ppg"], nan=-3.0))
    torch.manual_seed(0)
    assert torch.equal(model.loss(junk)[0], loss)


def test_loss_drops_when_overfitting_a_real_bidmc_batch(bidmc_batch) -> None:
    torch.set_num_threads(1)
    model = encoder(seed=0)
    batch = {key: value[:16] for key, value in bidmc_batch.items()}

    def fixed_mask_loss() -> float:
        torch.manual_seed(123)
        with torch.no_grad():
            return float(model.loss(batch)[0])

    before = fixed_mask_loss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(80):
        loss, _ = model.loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = fixed_mask_loss()
    assert after < 0.7 * before, (before, after)  # the untrained model predicts ~0: before ~ signal power


def test_reconstruct_passes_given_leads_through() -> None:
    model = encoder()
    batch = make_batch("12lead")
    given = torch.zeros(4, N_CHANNELS, dtype=torch.bool)
    given[:, LEAD_INDEX["II"]] = True
    given[:, PPG_CHANNEL] = True  # not recorded in these windows: ignored
    out = model.reconstruct(batch, given)
    assert torch.equal(out[:, LEAD_INDEX["II"]], batch["ecg"][:, LEAD_INDEX["II"]])
    assert not torch.allclose(out[:, LEAD_INDEX["I"]], batch["ecg"][:, LEAD_INDEX["I"]])


# --- P2Es with the foundation PPG encoder --------------------------------------------------------------
P2ES_TINY = dict(name="p2es", timesteps=20, hidden_channels=16, embed_dim=32, dilation_depth=2, cascades=1,
                 lead_features=2, cond_channels=8, affinity=False, sample_steps=5, ppg_encoder="foundation",
                 ppg_encoder_model=dict(TINY))


def p2es_batch() -> dict[str, torch.Tensor]:
    batch = concat(make_batch("ppg", 2, seed=5), make_batch("12lead", 2, seed=6))
    batch["ecg_mask"][:2, [LEAD_INDEX["II"], LEAD_INDEX["aVR"]]] = True  # BIDMC-like: PPG + two leads
    batch["ecg"] = torch.nan_to_num(batch["ecg"], nan=0.1)
    return batch


@pytest.mark.parametrize("frozen", [True, False])
def test_p2es_trains_a_step_with_the_foundation_encoder(frozen: bool) -> None:
    torch.manual_seed(0)
    model = build_model({**P2ES_TINY, "ppg_encoder_frozen": frozen}).train()
    backbone = model.conditioner.ppg_encoder.backbone
    assert backbone.training is not frozen
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    others = {k: v.clone() for k, v in model.network.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss, _ = model.loss(p2es_batch())
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    moved = [k for k, v in backbone.state_dict().items() if not torch.equal(v, before[k])]
    assert (moved == []) is frozen
    assert all(not p.requires_grad for p in backbone.parameters()) is frozen
    assert any(not torch.equal(v, others[k]) for k, v in model.network.state_dict().items())


def test_p2es_foundation_loads_pretrained_weights_and_reloads_without_the_uri(tmp_path) -> None:
    from p2es_dist.models.checkpoint import load_model

    pretrained = encoder(seed=42)
    encoder_dir = save_checkpoint(pretrained, TINY, tmp_path / "encoder")
    section = {**P2ES_TINY, "ppg_encoder_checkpoint": encoder_dir}
    torch.manual_seed(0)
    p2es = build_model(section)
    backbone = p2es.conditioner.ppg_encoder.backbone
    for key, value in pretrained.backbone.state_dict().items():
        assert torch.equal(backbone.state_dict()[key], value)
    p2es_dir = save_checkpoint(p2es, section, tmp_path / "p2es")
    shutil.rmtree(encoder_dir)  # the encoder URI is gone: the P2Es checkpoint alone must be enough
    reloaded = load_model(p2es_dir).model
    for key, value in p2es.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value)
    batch = p2es_batch()
    options = GenerationOptions(seed=0)
    assert torch.equal(reloaded.generate(batch, options), p2es.eval().generate(batch, options))


def test_p2es_foundation_config_errors(tmp_path) -> None:
    with pytest.raises(ConfigError, match="ppg_encoder_model: required"):
        build_model({**P2ES_TINY, "ppg_encoder_model": {}})
    small_dir = save_checkpoint(encoder(size="small", depth=1), {"name": "encoder", "size": "small", "depth": 1},
                                tmp_path / "small")
    with pytest.raises(ConfigError, match="architecture"):
        build_model({**P2ES_TINY, "ppg_encoder_checkpoint": small_dir})


def test_packaged_foundation_config_builds() -> None:
    from p2es_dist.config import load_config
    from p2es_dist.train.config import parse_job_config

    job = parse_job_config(load_config("p2es_foundation"))
    assert job.model["ppg_encoder"] == "foundation"
    tiny = load_yaml(packaged_config_path("models/encoder_tiny"))["model"]
    assert all(job.model["ppg_encoder_model"][k] == tiny[k] for k in job.model["ppg_encoder_model"])


def test_pretrain_refuses_other_models() -> None:
    from p2es_dist.jobs.pretrain import main

    with pytest.raises(UserError, match="model.name.*expected 'encoder'"):
        main(["--config", "smoke"])
    job_config = load_yaml(packaged_config_path("pretrain_tiny"))
    assert job_config["model"]["name"] == "encoder"
