"""`p2es translate`: a PPG file (WFDB record or CSV) -> a 12-lead WFDB record, with any translation model.

    from p2es_dist.translate import translate_file
    translate_file(model="bundles/student", input="a103l.hea", out="out/a103l_ecg")

Pieces: `io` (readers and the WFDB writer), `stitch` (windowing and overlap-add), `run` (the pipeline);
`from_leads` (`--condition`): some recorded ECG leads in, 12 leads out, with a lead-conditioned model.
"""

from p2es_dist.translate.run import TranslateConfig, translate_file, translate_signal

__all__ = ["TranslateConfig", "translate_file", "translate_signal"]
