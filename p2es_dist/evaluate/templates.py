"""Template baselines and evaluation protocols: what a model must beat before its timing means anything.

A template baseline learns nothing from the test patient's ECG beyond what its protocol allows. Each
places a mean beat at every PPG upstroke minus a pulse arrival time (`data/timing.py`):

| name                         | beat                            | PAT                          | protocol   |
|------------------------------|---------------------------------|------------------------------|------------|
| `template_population`        | training records' median beat   | training records' median PAT | both       |
| `template_population_hedged` | the same, blurred by their PAT  | training records' median PAT | zero-shot  |
|                              | spread (`hedged_beat`)          |                              |            |
| `template_pat`               | training records' median beat   | the patient's calibrated PAT | calibrated |
| `template_personal`          | the patient's calibrated beat   | the patient's calibrated PAT | calibrated |

The population figures come from the `train` split of the evaluated shard folders (one calibration
profile per record, stored at ingest), never from the evaluated split. Protocols:
- `zero-shot`: the patient is unseen; models get no template input.
- `calibrated`: the first `calibration_s` seconds of each paired record calibrate (profile stored at
  ingest); only windows that start after that segment are scored, and models get the patient's template.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from p2es_dist.constants import LEADS, N_LEADS, WINDOW
from p2es_dist.data import timing
from p2es_dist.data.calibration import CalibrationProfile, hedged_beat
from p2es_dist.data.read import calibration_available
from p2es_dist.errors import UserError
from p2es_dist.models.base import GenerationOptions, TranslationModel
from p2es_dist.storage import uri as uri_lib

PROTOCOLS = ("zero-shot", "calibrated")
TEMPLATES = {"zero-shot": ("template_population", "template_population_hedged"),
             "calibrated": ("template_population", "template_pat", "template_personal")}


def check_protocol(uris: list[str], protocol: str, calibration_s: float) -> None:
    """UserError unless the shards can serve `protocol` (calibration stored at ingest, same seconds)."""
    if protocol not in PROTOCOLS:
        raise UserError(f"--protocol: expected one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    if not calibration_available(uris):
        raise UserError(f"--data {','.join(uris)}: shards have no beat timing (shard schema < 2); re-run "
                        "`p2es ingest` with this version to get template baselines and the calibrated protocol")
    for folder in uris:
        manifest = json.loads(uri_lib.read_text(uri_lib.join(folder, "manifest.json")))
        stored = ((manifest.get("config") or {}).get("preprocess") or {}).get("calibration_s")
        if protocol == "calibrated" and stored is not None and float(stored) != float(calibration_s):
            raise UserError(f"--calibration-seconds {calibration_s:g}: {folder} was ingested with "
                            f"preprocess.calibration_s={stored}; re-ingest with --set preprocess.calibration_s="
                            f"{calibration_s:g} or pass --calibration-seconds {stored}")


def scored_rows(table: pa.Table, protocol: str) -> pa.Table:
    """The windows a protocol scores: all (zero-shot), or paired windows after the calibration segment."""
    if protocol == "zero-shot":
        return table
    keep = pc.and_(pc.is_valid(table.column("calib_end")),
                   pc.greater_equal(table.column("start"), pc.fill_null(table.column("calib_end"), 0)))
    scored = table.filter(keep)
    if len(scored) == 0:
        raise UserError("--protocol calibrated: no window starts after its record's calibration segment "
                        "(records without PPG + ECG, or shorter than the calibration seconds + one window)")
    return scored


def template_renders(table: pa.Table, population: CalibrationProfile | None, protocol: str) -> dict[str, np.ndarray]:
    """Batch keys (n, 12, L) of each template baseline of `protocol` for these shard rows, in model space."""
    n = len(table)
    upstrokes = table.column("ppg_upstrokes").to_pylist()
    patient_pat = table.column("calib_pat_s").to_numpy(zero_copy_only=False).astype(np.float64)
    out: dict[str, np.ndarray] = {}
    if population is not None:
        beat, mask = population.beat_array()
        hedged = hedged_beat(beat, population.pat_iqr_s, population.fs)
        for name in TEMPLATES[protocol]:
            if name == "template_personal":
                continue
            rendered = np.zeros((n, N_LEADS, WINDOW), dtype=np.float32)
            for i in range(n):
                pat = patient_pat[i] if name == "template_pat" else population.pat_s
                if upstrokes[i] and np.isfinite(pat):
                    rendered[i] = timing.template_from_upstrokes(hedged if name.endswith("_hedged") else beat,
                                                                 np.asarray(upstrokes[i]), pat, WINDOW)
            # The hedged beat keeps the scale it has after blurring: a wide PAT spread should shrink it.
            out[name] = rendered if name.endswith("_hedged") else timing.normalise_template(
                rendered, np.broadcast_to(mask, (n, N_LEADS)))
    return out


class TemplateBaseline(TranslationModel):
    """A 'model' whose output is one of the template renders the evaluation batch carries."""

    name = "template"

    def __init__(self, key: str) -> None:
        super().__init__()
        self.key = key

    @torch.no_grad()
    def generate(self, batch: dict[str, torch.Tensor], options: GenerationOptions | None = None) -> torch.Tensor:
        if self.key == "template_personal":
            return batch["template"].float() * batch["template_mask"][:, :, None].float()
        return batch[self.key].float()


def template_baselines(protocol: str, population: CalibrationProfile | None) -> dict[str, SimpleNamespace]:
    """name -> a loaded-model stand-in (what `evaluate.runner.run_model` needs) for each template."""
    names = [n for n in TEMPLATES[protocol] if population is not None or n == "template_personal"]
    described = {"template_population": "population beat at population PAT",
                 "template_population_hedged": "population beat blurred by the population's PAT spread",
                 "template_pat": "population beat at the patient's calibrated PAT",
                 "template_personal": "the patient's calibrated beat at their calibrated PAT"}
    return {name: SimpleNamespace(name=name, model=TemplateBaseline(name), uri=described[name], kind="template",
                                  digest="", metadata={}) for name in names}


def population_summary(population: CalibrationProfile | None) -> dict | None:
    if population is None:
        return None
    return {"pat_s": population.pat_s, "pat_iqr_s": population.pat_iqr_s, "n_records": population.n_beats,
            "leads": [name for name in LEADS if name in population.beat], "source": "train split of --data"}


def lead_ii_verdict(sections: dict[str, dict], model: str, protocol: str) -> dict | None:
    """Does the model beat the best template of its protocol on lead II Pearson? (None when unscored)."""

    def pearson(name: str) -> float | None:
        leads = sections[name]["spaces"]["window"]["leads"]
        return leads.get("II", {}).get("pearson") if "II" in leads else None

    scored = {name: p for name in TEMPLATES[protocol] if name in sections and (p := pearson(name)) is not None}
    mine = pearson(model)
    if mine is None or not scored:
        return None
    reference = max(scored, key=scored.get)
    return {"template": reference, "model_pearson_ii": mine, "template_pearson_ii": scored[reference],
            "beats_template": bool(mine > scored[reference])}


__all__ = ["PROTOCOLS", "TemplateBaseline", "check_protocol", "lead_ii_verdict", "scored_rows",
           "template_baselines", "template_renders"]
