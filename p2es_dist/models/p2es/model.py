"""`P2Es`: the demographic-aware dual-domain diffusion teacher (PPG and/or leads -> 12-lead ECG)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from p2es_dist.constants import LEAD_INDEX, N_LEADS, WINDOW
from p2es_dist.models.base import (
    Batch,
    GenerationOptions,
    PopulationTemplate,
    TranslationModel,
    condition_leads,
    hide_templates,
    template_input,
    template_leads,
    with_calibration,
)
from p2es_dist.models.leads import (
    INDEPENDENT_LEADS,
    N_INDEPENDENT,
    determined_leads,
    expand_leads,
    impose_given_leads,
    independent_from_recorded,
)
from p2es_dist.models.p2es.affinity import LeadAffinity
from p2es_dist.models.p2es.conditioning import Conditioner, Context
from p2es_dist.models.p2es.config import P2EsConfig
from p2es_dist.models.p2es.network import TemporalMultiScaleGenerator
from p2es_dist.models.p2es.schedule import DiffusionSchedule
from p2es_dist.models.registry import register


def masked_mse(prediction: Tensor, target: Tensor, recorded: Tensor) -> Tensor:
    """Mean squared error over the samples of recorded (window, lead) pairs; graph-connected 0 if none.

    `torch.where` rather than a product, so junk at unrecorded leads reaches neither value nor gradient.
    """
    per_pair = (prediction - target).square().mean(dim=-1)
    per_pair = torch.where(recorded, per_pair, torch.zeros_like(per_pair))
    return per_pair.sum() / recorded.sum().clamp_min(1)


@register("p2es", P2EsConfig)
class P2Es(TranslationModel):
    """The P2Es teacher.

    State. The diffusion runs on the generated leads: I, II, V1..V6 with `lead_physics` (the other four
    derived exactly, `leads.expand_leads`), all 12 without. The network always sees x_t in 12-lead
    layout, so lead mixing and the affinity matrices are 12x12 either way.

    Training (`loss`). t ~ U{1..T}; x_0 on the generated leads is the least-squares fit to the recorded
    leads (so II + aVR determine I; a lead nothing determines is 0 and, like every unrecorded lead, is
    masked out of the loss). The loss is the MSE of x0 (or v) on recorded leads only, after expanding
    the prediction to 12 leads, plus `contrastive_weight` x the affinity embedding's contrastive loss.
    Unless the batch names `cond_leads` (the loader's `condition_leads`, or one of `condition_subsets`
    per window), a `cond_lead_prob` fraction of windows gets a random subset of its recorded leads as
    input, so the same model answers `--condition II`. Leads a window gets as input are no target:
    they leave the loss mask (a window whose only recorded lead is given adds 0).
    With `use_template`, training hides the calibration template of a `template_dropout` fraction of
    windows, so the same model answers with and without calibration.

    Affinity initialisation. Call `init_affinity(batches)` once before training, on some training
    batches (any iterable of Batch dicts; up to `max_windows` windows are read): it warms the
    demographic embedding up contrastively, runs k-means for the prototypes and sets each prototype's
    12x12 matrix to the mean lead correlation of the 12-lead windows in its cluster. It is
    deterministic under `seed` and returns a JSON-friendly summary; with no 12-lead window it leaves the
    matrices at the identity and says so. Skipping it is allowed: prototypes stay random and matrices
    the identity until learned.

    Sampling (`generate(batch, GenerationOptions(...))`). `sampler="ddim"`: deterministic, `steps`
    (default `sample_steps`, any <= T); `sampler="ancestral"`: the posterior q(x_s | x_t, x0_hat) with
    fresh noise, all T steps by default. Noise comes from a `torch.Generator` seeded with `seed`, so a
    call is reproducible; `n_samples` draws are averaged (a point estimate) unless `return_samples=True`.
    Generated leads that the given ones fix (`known_state`) keep their recorded values in every step's x0
    estimate, so the other leads are drawn alongside the true ones; the output then passes through
    `leads.impose_given_leads` (`TranslationModel`).
    """

    stochastic = True

    def __init__(self, *, config: P2EsConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or P2EsConfig()
        self.out_leads = N_INDEPENDENT if config.lead_physics else N_LEADS
        self.schedule = DiffusionSchedule(config=config, length=WINDOW)
        self.conditioner = Conditioner(config=config, embed_dim=config.embed_dim)
        self.affinity = LeadAffinity(config=config) if config.affinity else None
        self.network = TemporalMultiScaleGenerator(
            config=config,
            cond_channels=config.cond_channels,
            out_leads=self.out_leads,
            length=WINDOW,
            timesteps=config.timesteps,
            inverse_blur_init=config.objective == "x0",
        )
        self.register_buffer("identity_affinity", torch.eye(N_LEADS), persistent=False)
        self.population = PopulationTemplate(config.population if config.use_template else None)

    # --- lead spaces ------------------------------------------------------------------------------
    def to_12_leads(self, generated: Tensor) -> Tensor:
        """(B, out_leads, L) -> (B, 12, L) in `constants.LEADS` order."""
        return expand_leads(generated) if self.config.lead_physics else generated

    def clean_state(self, ecg: Tensor, recorded: Tensor) -> Tensor:
        """x_0 on the generated leads from a recorded ECG (unrecorded leads -> 0)."""
        if self.config.lead_physics:
            return independent_from_recorded(ecg, recorded)
        return torch.where(recorded[:, :, None], ecg, torch.zeros_like(ecg))

    # --- one network evaluation -------------------------------------------------------------------
    def condition(self, batch: Batch, given_leads: Tensor) -> tuple[Context, Tensor, Tensor | None]:
        """Context, per-window lead affinity (B, 12, 12) and the affinity embedding (None when off)."""
        context = self.conditioner(batch, given_leads)
        if self.affinity is None:
            identity = self.identity_affinity.expand(len(given_leads), -1, -1)
            return context, identity, None
        affinity, embedding = self.affinity(batch)
        return context, affinity, embedding

    def template_prior(self, batch: Batch) -> Tensor | None:
        """x0 on the generated leads that the calibration template implies, or None (no residual).

        With `template_residual` the network predicts a correction to the patient's template rather than
        the ECG itself: its output head starts at zero, so an untrained model already answers with the
        template, and training can only move it where the data say the template is wrong. Windows
        without a template get a zero prior.
        """
        if not (self.config.use_template and self.config.template_residual):
            return None
        return self.clean_state(template_input(batch).float(), template_leads(batch))

    def predict(self, x_t: Tensor, t: Tensor, context: Context, affinity: Tensor,
                prior: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Raw network output (x0 or v, per `objective`) and the implied x0, both on the generated leads.

        `prior` (x0 objective only): added to the output, which is then a correction to it."""
        output = self.network(
            self.to_12_leads(x_t),
            t,
            self.schedule.damping(t),
            context.seq,
            context.vec,
            affinity,
            to_freq=self.schedule.to_freq,
            to_time=self.schedule.to_time,
        )
        if self.config.objective == "x0":
            x0 = output if prior is None else output + prior
            return x0, x0
        return output, self.schedule.x0_from_v(x_t, output, t)

    # --- training ---------------------------------------------------------------------------------
    def training_condition(self, batch: Batch) -> Tensor:
        """(B, 12) bool: the leads a window sees as input during training."""
        if "cond_leads" in batch or not self.config.condition_on_leads:
            return condition_leads(batch)
        recorded = batch["ecg_mask"].bool()
        device = recorded.device
        chosen = torch.rand(len(recorded), device=device) < self.config.cond_lead_prob
        subset = torch.rand(recorded.shape, device=device) < 0.5
        return recorded & subset & chosen[:, None]

    def loss(self, batch: Batch, *, t: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Masked diffusion loss (+ contrastive). `t` (B,) overrides the uniform draw of timesteps."""
        if self.config.use_template:
            if self.training:
                batch = hide_templates(batch, self.config.template_dropout)
            batch = self.population.fill(batch)
            if self.training and self.config.population_jitter:
                batch = {**batch, "ecg": self.population.jitter_targets(
                    batch, realign=self.config.population_realign)}
        ecg, recorded = batch["ecg"].float(), batch["ecg_mask"].bool()
        ecg = torch.where(recorded[:, :, None], ecg, torch.zeros_like(ecg))
        batch_size = len(ecg)
        if t is None:
            t = torch.randint(1, self.config.timesteps + 1, (batch_size,), device=ecg.device)
        x0 = self.clean_state(ecg, recorded)
        eps = torch.randn_like(x0)
        x_t = self.schedule.q_sample(x0, t, eps)
        given = self.training_condition(batch)
        context, affinity, embedding = self.condition(batch, given)
        output, x0_hat = self.predict(x_t, t, context, affinity, self.template_prior(batch))
        scored = recorded & ~given  # a lead given as input is no target: copying it is not translation
        x0_error = masked_mse(self.to_12_leads(x0_hat), ecg, scored)
        if self.config.objective == "x0":
            diffusion = x0_error
        else:
            target = self.schedule.v_target(ecg, self.to_12_leads(eps), t)
            diffusion = masked_mse(self.to_12_leads(output), target, scored)
        parts = {"diffusion": diffusion.detach(), "x0_mse": x0_error.detach()}
        total = diffusion
        if embedding is not None and self.config.contrastive_weight > 0:
            contrastive = self.affinity.contrastive_loss(embedding, batch)
            parts["contrastive"] = contrastive.detach()
            total = total + self.config.contrastive_weight * contrastive
        return total, parts

    def init_affinity(self, batches: Iterable[Batch], *, seed: int = 0, max_windows: int = 4096) -> dict[str, Any]:
        """Data-driven affinity initialisation (see the class docstring); call once before training."""
        if self.affinity is None:
            return {"initialised": False, "reason": "affinity is off (model.affinity: false)"}
        return self.affinity.initialise(batches, seed=seed, max_windows=max_windows)

    # --- sampling ---------------------------------------------------------------------------------
    def known_state(self, batch: Batch, given: Tensor) -> tuple[Tensor, Tensor] | None:
        """(B, out_leads) bool generated leads that the given leads fix (`leads.determined_leads`) and
        (B, out_leads, L) their values; None when the model reads no leads or none is given."""
        if not self.config.condition_on_leads or not bool(given.any()):
            return None
        ecg = torch.where(given[:, :, None], batch["ecg"].float(), torch.zeros_like(batch["ecg"], dtype=torch.float))
        fixed, values = determined_leads(given), impose_given_leads(torch.zeros_like(ecg), ecg, given)
        if self.config.lead_physics:
            rows = [LEAD_INDEX[lead] for lead in INDEPENDENT_LEADS]
            return fixed[:, rows], values[:, rows]
        return fixed, values

    def generation_options(self, options: GenerationOptions | None = None) -> GenerationOptions:
        """`options` with the config's defaults: `sampler`, then `sample_steps` (DDIM) or all T (ancestral),
        and `sample_draws`."""
        options = options or GenerationOptions()
        sampler = options.sampler or self.config.sampler
        if sampler not in ("ddim", "ancestral"):
            raise ValueError(f"sampler must be 'ddim' or 'ancestral', got {sampler!r}")
        n_samples = self.config.sample_draws if options.n_samples is None else options.n_samples
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        steps = options.steps
        if steps is None:
            steps = self.config.sample_steps if sampler == "ddim" else self.config.timesteps
        return replace(options, sampler=sampler, steps=steps, n_samples=n_samples)

    @torch.no_grad()
    def generate(
        self,
        batch: Batch,
        options: GenerationOptions | None = None,
        *,
        return_samples: bool = False,
    ) -> Tensor:
        """(B, 12, L) ECG in model space: the mean of `n_samples` draws, or all of them (n, B, 12, L)."""
        options = self.generation_options(options)
        sampler, steps, seed, n_samples = options.sampler, options.steps, options.seed, options.n_samples
        grid = self.schedule.sampling_timesteps(steps)
        if self.config.use_template:
            batch = self.population.fill(with_calibration(batch, options))
        given = condition_leads(batch)
        context, affinity, _ = self.condition(batch, given)
        known = self.known_state(batch, given)
        prior = self.template_prior(batch)
        batch_size, length = batch["ecg_mask"].shape[0], batch["ppg"].shape[-1]
        device = batch["ppg"].device
        generator = torch.Generator(device=device).manual_seed(seed)
        draws = []
        for _ in range(n_samples):
            x = torch.randn((batch_size, self.out_leads, length), generator=generator, device=device)
            for t_now, t_next in zip(grid[:-1], grid[1:], strict=True):
                t = torch.full((batch_size,), t_now, device=device, dtype=torch.long)
                s = torch.full((batch_size,), t_next, device=device, dtype=torch.long)
                _, x0_hat = self.predict(x, t, context, affinity, prior)
                if known is not None:  # x0 replacement: what the given leads fix is not guessed
                    x0_hat = torch.where(known[0][:, :, None], known[1].to(x0_hat.dtype), x0_hat)
                if t_next == 0:
                    x = x0_hat
                elif sampler == "ddim":
                    x = self.schedule.ddim_step(x, x0_hat, t, s)
                else:
                    noise = torch.randn(x.shape, generator=generator, device=device)
                    x = self.schedule.ancestral_step(x, x0_hat, t, s, noise)
            draws.append(self.to_12_leads(x))
        samples = torch.stack(draws)
        return samples if return_samples else samples.mean(dim=0)
