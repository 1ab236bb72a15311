"""The one table that maps every source's diagnosis codes to the canonical vocabulary (`constants.LABELS`).

Sources and their codes:
- `scp`: PTB-XL SCP-ECG statements. Diagnostic statements map to their `diagnostic_class` in
  `scp_statements.csv` (NORM, MI, STTC, HYP, CD); bundle branch blocks, 1st degree AV block and the
  rhythm/form statements we track add their specific label.
- `snomed`: SNOMED-CT codes of the PhysioNet/CinC Challenges 2020/2021 (names as in the Challenge's
  `dx_mapping_scored.csv` / `dx_mapping_unscored.csv`). Grouped to PTB-XL's superclasses.
- `ludb`: LUDB diagnosis text (header comments or `ludb.csv` cells), matched by regex on lowercase text.
- `code15`: the boolean columns of CODE-15% `exams.csv`.

NORM for SNOMED and LUDB (which have no "normal ECG" statement): a sinus rhythm statement (sinus
rhythm, bradycardia, tachycardia, arrhythmia) gives NORM only when every other statement is also a
sinus rhythm or "neutral" (electrical axis). Any other statement, known or not, rules NORM out. This
mirrors PTB-XL, where NORM co-occurs with SBRAD/STACH/SARRH and the axis lives outside `scp_codes`.
Unknown codes never raise: they are ignored (apart from ruling NORM out).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from p2es_dist.constants import LABEL_INDEX, LABELS

SUPERCLASSES = frozenset({"NORM", "MI", "STTC", "HYP", "CD"})

# How a statement bears on NORM where NORM is derived (snomed, ludb).
ABNORMAL, SINUS, NEUTRAL = "abnormal", "sinus", "neutral"


@dataclass(frozen=True)
class LabelRule:
    source: str  # "scp" | "snomed" | "ludb" | "code15"
    code: str  # SCP code, SNOMED-CT id, LUDB regex (lowercase text), CODE-15 column
    name: str  # the statement's name in the source
    labels: tuple[str, ...]  # canonical labels; () = known but outside the vocabulary
    norm: str = ABNORMAL  # SINUS / NEUTRAL / ABNORMAL, only used where NORM is derived


def _rules(source: str, rows: Iterable[tuple]) -> list[LabelRule]:
    return [LabelRule(source, *row) for row in rows]


LABEL_TABLE: tuple[LabelRule, ...] = tuple(
    # --- PTB-XL SCP statements; the diagnostic ones with their scp_statements.csv diagnostic_class.
    _rules("scp", [
        ("NORM", "normal ECG", ("NORM",)),
        *[(code, name, ("MI",)) for code, name in [
            ("IMI", "inferior myocardial infarction"), ("ASMI", "anteroseptal myocardial infarction"),
            ("ILMI", "inferolateral myocardial infarction"), ("AMI", "anterior myocardial infarction"),
            ("ALMI", "anterolateral myocardial infarction"), ("LMI", "lateral myocardial infarction"),
            ("IPLMI", "inferoposterolateral myocardial infarction"),
            ("IPMI", "inferoposterior myocardial infarction"), ("PMI", "posterior myocardial infarction"),
            ("INJAS", "subendocardial injury in anteroseptal leads"),
            ("INJAL", "subendocardial injury in anterolateral leads"),
            ("INJIN", "subendocardial injury in inferior leads"),
            ("INJLA", "subendocardial injury in lateral leads"),
            ("INJIL", "subendocardial injury in inferolateral leads"),
        ]],
        *[(code, name, ("STTC",)) for code, name in [
            ("NDT", "non-diagnostic T abnormalities"), ("NST_", "non-specific ST changes"),
            ("DIG", "digitalis-effect"), ("LNGQT", "long QT-interval"), ("ISC_", "non-specific ischemic"),
            ("ISCAL", "ischemic in anterolateral leads"), ("ISCIN", "ischemic in inferior leads"),
            ("ISCIL", "ischemic in inferolateral leads"), ("ISCAS", "ischemic in anteroseptal leads"),
            ("ISCLA", "ischemic in lateral leads"), ("ISCAN", "ischemic in anterior leads"),
            ("ANEUR", "ST-T changes compatible with ventricular aneurysm"),
            ("EL", "electrolytic disturbance or drug (former EDIS)"),
        ]],
        *[(code, name, ("HYP",)) for code, name in [
            ("LVH", "left ventricular hypertrophy"), ("RVH", "right ventricular hypertrophy"),
            ("LAO/LAE", "left atrial overload/enlargement"), ("RAO/RAE", "right atrial overload/enlargement"),
            ("SEHYP", "septal hypertrophy"),
        ]],
        ("CLBBB", "complete left bundle branch block", ("CD", "LBBB")),
        ("ILBBB", "incomplete left bundle branch block", ("CD", "LBBB")),
        ("CRBBB", "complete right bundle branch block", ("CD", "RBBB")),
        ("IRBBB", "incomplete right bundle branch block", ("CD", "RBBB")),
        ("1AVB", "first degree AV block", ("CD", "1AVB")),
        *[(code, name, ("CD",)) for code, name in [
            ("2AVB", "second degree AV block"), ("3AVB", "third degree AV block"),
            ("LAFB", "left anterior fascicular block"), ("LPFB", "left posterior fascicular block"),
            ("IVCD", "non-specific intraventricular conduction disturbance (block)"),
            ("WPW", "Wolf-Parkinson-White syndrome"),
        ]],
        # Rhythm and form statements (no diagnostic_class) that have a canonical label.
        ("AFIB", "atrial fibrillation", ("AF",)),
        ("AFLT", "atrial flutter", ("AF",)),
        ("PVC", "ventricular premature complex", ("PVC",)),
        ("SBRAD", "sinus bradycardia", ("SB",)),
        ("STACH", "sinus tachycardia", ("ST",)),
        ("PACE", "normal functioning artificial pacemaker", ("PACE",)),
    ])
    # --- CinC 2020/2021 SNOMED-CT codes.
    + _rules("snomed", [
        ("426783006", "sinus rhythm", (), SINUS),
        ("426177001", "sinus bradycardia", ("SB",), SINUS),
        ("427084000", "sinus tachycardia", ("ST",), SINUS),
        ("427393009", "sinus arrhythmia", (), SINUS),
        ("39732003", "left axis deviation", (), NEUTRAL),
        ("47665007", "right axis deviation", (), NEUTRAL),
        ("251200008", "indeterminate cardiac axis", (), NEUTRAL),
        ("164889003", "atrial fibrillation", ("AF",)),
        ("164890007", "atrial flutter", ("AF",)),
        ("195080001", "atrial fibrillation and flutter", ("AF",)),
        ("426749004", "chronic atrial fibrillation", ("AF",)),
        ("282825002", "paroxysmal atrial fibrillation", ("AF",)),
        ("314208002", "rapid atrial fibrillation", ("AF",)),
        ("164909002", "left bundle branch block", ("CD", "LBBB")),
        ("733534002", "complete left bundle branch block", ("CD", "LBBB")),
        ("251120003", "incomplete left bundle branch block", ("CD", "LBBB")),
        ("59118001", "right bundle branch block", ("CD", "RBBB")),
        ("713427006", "complete right bundle branch block", ("CD", "RBBB")),
        ("713426002", "incomplete right bundle branch block", ("CD", "RBBB")),
        ("270492004", "1st degree av block", ("CD", "1AVB")),
        *[(code, name, ("CD",)) for code, name in [
            ("6374002", "bundle branch block"), ("195042002", "2nd degree av block"),
            ("54016002", "mobitz type i wenckebach atrioventricular block"),
            ("426183003", "mobitz type II atrioventricular block"), ("27885002", "complete heart block"),
            ("204384007", "congenital incomplete atrioventricular heart block"), ("233917008", "av block"),
            ("445118002", "left anterior fascicular block"), ("445211001", "left posterior fascicular block"),
            ("698252002", "nonspecific intraventricular conduction disorder"),
            ("82226007", "diffuse intraventricular block"), ("74390002", "wolff parkinson white pattern"),
            ("195060002", "ventricular pre excitation"), ("65778007", "sinoatrial block"),
        ]],
        *[(code, name, ("PVC",)) for code, name in [
            ("427172004", "premature ventricular contractions"), ("17338001", "ventricular premature beats"),
            ("164884008", "ventricular ectopics"), ("11157007", "ventricular bigeminy"),
            ("251180001", "ventricular trigeminy"), ("251182009", "paired ventricular premature complexes"),
        ]],
        *[(code, name, ("PACE",)) for code, name in [
            ("10370003", "pacing rhythm"), ("251266004", "ventricular pacing pattern"),
            ("251268003", "atrial pacing pattern"),
        ]],
        *[(code, name, ("MI",)) for code, name in [
            ("164865005", "myocardial infarction"), ("57054005", "acute myocardial infarction"),
            ("54329005", "anterior myocardial infarction"), ("164867002", "old myocardial infarction"),
        ]],
        # Ischaemia and ST-T statements: PTB-XL files ISC_/ISCxx, NDT, NST_ and LNGQT under STTC.
        *[(code, name, ("STTC",)) for code, name in [
            ("164861001", "myocardial ischemia"), ("413444003", "acute myocardial ischemia"),
            ("413844008", "chronic myocardial ischemia"), ("426434006", "anterior ischemia"),
            ("425419005", "inferior ischaemia"), ("425623009", "lateral ischaemia"),
            ("164934002", "t wave abnormal"), ("59931005", "t wave inversion"), ("55930002", "s t changes"),
            ("428750005", "nonspecific st t abnormality"), ("429622005", "st depression"),
            ("164931005", "st elevation"), ("164930006", "st interval abnormal"),
            ("704997005", "inferior ST segment depression"), ("111975006", "prolonged qt interval"),
        ]],
        *[(code, name, ("HYP",)) for code, name in [
            ("164873001", "left ventricular hypertrophy"), ("89792004", "right ventricular hypertrophy"),
            ("266249003", "ventricular hypertrophy"), ("195126007", "atrial hypertrophy"),
            ("446813000", "left atrial hypertrophy"), ("446358003", "right atrial hypertrophy"),
            ("67741000119109", "left atrial enlargement"), ("253352002", "left atrial abnormality"),
            ("253339007", "right atrial abnormality"), ("370365005", "left ventricular strain"),
        ]],
        # Scored Challenge classes outside our vocabulary: listed so the decision is visible. Voltage
        # criteria alone are not HYP, as PTB-XL's VCLVH is a form statement without a class.
        *[(code, name, ()) for code, name in [
            ("55827005", "left ventricular high voltage"), ("284470004", "premature atrial contraction"),
            ("63593006", "supraventricular premature beats"), ("164947007", "prolonged pr interval"),
            ("164917005", "qwave abnormal"), ("251146004", "low qrs voltages"),
            ("365413008", "poor R wave Progression"), ("426627000", "bradycardia"),
        ]],
    ])
    # --- LUDB diagnosis text: regex searched in the lowercase line (one statement per line).
    + _rules("ludb", [
        (r"\bsinus rhythm\b", "Sinus rhythm / Irregular sinus rhythm", (), SINUS),
        (r"sinus bradycardia", "Sinus bradycardia", ("SB",), SINUS),
        (r"sinus tachycardia", "Sinus tachycardia", ("ST",), SINUS),
        (r"sinus arrhythmia", "Sinus arrhythmia", (), SINUS),
        (r"electric axis", "Electric axis of the heart: ...", (), NEUTRAL),
        (r"atrial fibrillation", "Atrial fibrillation", ("AF",)),
        (r"atrial flutter", "Atrial flutter, typical", ("AF",)),
        (r"left bundle branch block", "(In)complete left bundle branch block", ("CD", "LBBB")),
        (r"right bundle branch block", "(In)complete right bundle branch block", ("CD", "RBBB")),
        (r"\bi degree av[- ]?block", "I degree AV block", ("CD", "1AVB")),
        (r"\bi{2,3} degree av[- ]?block", "II/III degree AV-block", ("CD",)),
        (r"left (anterior|posterior) hemiblock", "Left anterior hemiblock", ("CD",)),
        (r"intrav[ei]ntricular conduction", "Non-specific intravintricular conduction delay", ("CD",)),
        (r"sinoatrial block", "Sinoatrial blockade, undefined", ("CD",)),
        (r"ventricular extrasystole", "Ventricular extrasystole, ...", ("PVC",)),
        (r"hypertrophy", "Left/Right atrial/ventricular hypertrophy", ("HYP",)),
        (r"(atrial|ventricular) overload", "Left/Right atrial/ventricular overload", ("HYP",)),
        (r"\bstemi\b", "STEMI: <wall>", ("MI",)),
        (r"scar formation", "Scar formation: <wall>", ("MI",)),
        # Also "Undefined ischemia/scar/supp.NSTEMI": ischaemic ST-T changes more often than an infarct.
        (r"ischemia", "Ischemia: <wall>", ("STTC",)),
        (r"repolari[sz]ation abnormalit", "Non-specific repolarization abnormalities: <wall>", ("STTC",)),
        # Not "Wandering atrial pacemaker": a rhythm, no device.
        (r"\bpacing\b|p-synchrony", "UNIpolar/BIpolar/Biventricular pacing, P-synchrony", ("PACE",)),
    ])
    # --- CODE-15% exams.csv boolean columns.
    + _rules("code15", [
        ("1dAVb", "1st degree AV block", ("CD", "1AVB")),
        ("RBBB", "right bundle branch block", ("CD", "RBBB")),
        ("LBBB", "left bundle branch block", ("CD", "LBBB")),
        ("SB", "sinus bradycardia", ("SB",)),
        ("ST", "sinus tachycardia", ("ST",)),
        ("AF", "atrial fibrillation", ("AF",)),
        # The automatic (Glasgow/Minnesota) normal-ECG flag: the only NORM signal CODE-15% gives.
        ("normal_ecg", "normal ECG (automatic annotation)", ("NORM",)),
    ])
)

_unknown = {label for rule in LABEL_TABLE for label in rule.labels} - set(LABELS)
if _unknown:
    raise ValueError(f"LABEL_TABLE uses labels outside p2es_dist.constants.LABELS: {sorted(_unknown)}")

_BY_SOURCE: dict[str, dict[str, LabelRule]] = {}
for _rule in LABEL_TABLE:
    _BY_SOURCE.setdefault(_rule.source, {})[_rule.code] = _rule
_LUDB_PATTERNS = [(re.compile(rule.code), rule) for rule in LABEL_TABLE if rule.source == "ludb"]
_LUDB_SKIP = re.compile(r"^<\w+>:")  # the <age>, <sex>, <diagnoses> header lines


def canonical(labels: Iterable[str]) -> list[str]:
    """Deduplicated, in the order of `p2es_dist.constants.LABELS`."""
    return sorted(set(labels), key=LABEL_INDEX.__getitem__)


def _with_derived_norm(findings: list[LabelRule | None]) -> list[str]:
    """Union of the findings' labels, plus NORM for a sinus rhythm with nothing but neutral statements."""
    labels = {label for rule in findings if rule is not None for label in rule.labels}
    sinus = any(rule is not None and rule.norm == SINUS for rule in findings)
    if sinus and all(rule is not None and rule.norm != ABNORMAL for rule in findings):
        labels.add("NORM")
    return canonical(labels)


def labels_from_scp(scp_codes: Mapping[str, float], *, min_likelihood: float = 0.0) -> list[str]:
    """PTB-XL `scp_codes` ({code: likelihood}) -> canonical labels.

    `min_likelihood` (PTB-XL grades diagnostic statements 15/35/50/80/100) filters diagnostic
    statements only: rhythm and form statements carry 0 in PTB-XL, meaning "not graded", and are kept.
    The default keeps every statement, as the dataset's own superclass aggregation does.
    """
    table = _BY_SOURCE["scp"]
    labels: set[str] = set()
    for code, likelihood in scp_codes.items():
        rule = table.get(code)
        if rule is None:
            continue
        graded = bool(SUPERCLASSES.intersection(rule.labels))
        if graded and float(likelihood or 0.0) < min_likelihood:
            continue
        labels.update(rule.labels)
    return canonical(labels)


def labels_from_snomed(codes: Iterable[str]) -> list[str]:
    """CinC `# Dx` SNOMED-CT codes (strings or ints) -> canonical labels; non-numeric tokens are skipped."""
    table = _BY_SOURCE["snomed"]
    tokens = [str(code).strip() for code in codes]
    return _with_derived_norm([table.get(token) for token in tokens if token.isdigit()])


def labels_from_ludb_text(lines: Iterable[str]) -> list[str]:
    """LUDB diagnosis lines (header comments or `ludb.csv` cells) -> canonical labels."""
    findings: list[LabelRule | None] = []
    for line in lines:
        text = line.strip().lstrip("#").strip().rstrip(".").strip().lower()
        if not text or _LUDB_SKIP.match(text):
            continue
        matched = [rule for pattern, rule in _LUDB_PATTERNS if pattern.search(text)]
        findings.extend(matched or [None])
    return _with_derived_norm(findings)


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in {"true", "1", "1.0", "yes"}
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    return bool(value)


def labels_from_code15(row: Mapping[str, Any]) -> list[str]:
    """A CODE-15% `exams.csv` row (dict or pandas Series) -> canonical labels from its boolean columns."""
    labels: set[str] = set()
    for column, rule in _BY_SOURCE["code15"].items():
        if column in row and _truthy(row[column]):
            labels.update(rule.labels)
    return canonical(labels)
