"""`p2es evaluate` (README "Evaluation", output `p2es_dist/schemas/metrics.schema.json`): signal fidelity, heart
rate, fd and diagnostic value on window shards.

- `metrics`: pure numpy metric functions (per-window per-lead arrays in, dicts out), DTW, HR, Fréchet, bootstrap
- `diagnostic`: the classifier on recorded, generated and input-only ECGs: AUROC/AUPRC with intervals, and
  sensitivity / specificity / F1 at the validation thresholds of `thresholds` (`p2es thresholds`)
- `windows`: which windows (plain pyarrow read, split filter pushed down) and their model-space batches
- `runner`: one model over those windows, and its metrics.json section
- `pipeline`: model + baselines end to end -> metrics.json, report.md, figures
- `figures`, `report`, `schema`: the outputs (`figures.plot_twelve_lead` is shared with `p2es translate`)

Submodules are imported where used, so importing this package stays light.
"""
