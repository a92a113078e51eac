"""A USCensus1990-like table for SliceLine at scale: 68 coded attributes, 378 one-hot columns.

The UCI USCensus1990 data (2,458,285 people × 68 integer-coded attributes) is what the SliceLine
authors replicated ×1 … ×10 for their scale runs. It is not shipped here, so this module makes a
table of the same shape with the properties that decide SliceLine's work:

- **skew**: most attributes are dominated by one value ("not applicable": not working, not a veteran,
  born in the US …), the rest spread unevenly (a Dirichlet draw per attribute around a Zipf-like base);
- **correlation**: attributes come in blocks driven by one latent variable per person (age × sex,
  household type, immigrant origin, job, military era, income), and whole blocks are gated (the 18
  work attributes are "not applicable" together for people who do not work, the 10 military ones for
  non-veterans, the 9 origin ones for people born in the US);
- **errors**: 0/1 errors of a model that misses a few interactions (immigrant origin × job, old age ×
  low income, …) plus small per-value effects, about 15 % on average.

Rows are made in chunks of ``CHUNK_ROWS``, each from its own seed, so any prefix of a big table is
the smaller table, memory stays at one chunk, and the cost is linear in rows. Attribute names are
the UCI list's; the level counts are close to its and set so that the one-hot width is 378, as the
paper reports for USCensus.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

CHUNK_ROWS = 1 << 20
SEED = 1990

# (name, levels, block); blocks: demographics (age × sex), household, origin (gated: immigrants),
# work (gated: workers), military (gated: veterans), income
ATTRIBUTES = [
    ("dAge", 8, "age"), ("iSex", 2, "sex"), ("iMarital", 5, "demo"), ("iRelat1", 13, "demo"),
    ("iRelat2", 3, "demo"), ("iFertil", 13, "fertility"), ("iSchool", 4, "demo"), ("iYearsch", 17, "demo"),
    ("iDisabl1", 3, "demo"), ("iDisabl2", 3, "demo"), ("iMobility", 3, "demo"), ("iMobillim", 3, "demo"),
    ("iPerscare", 3, "demo"), ("dPwgt1", 4, "none"),
    ("iRagechld", 5, "household"), ("iRownchld", 2, "household"), ("iRrelchld", 2, "household"),
    ("iRspouse", 7, "household"), ("iSubfam1", 4, "household"), ("iSubfam2", 4, "household"),
    ("iRemplpar", 9, "household"),
    ("dPOB", 8, "origin"), ("iRPOB", 7, "origin"), ("iCitizen", 5, "origin"), ("iImmigr", 11, "origin"),
    ("iEnglish", 5, "origin"), ("iLang1", 3, "origin"), ("dHispanic", 10, "origin"), ("dAncstry1", 12, "origin"),
    ("dAncstry2", 12, "origin"),
    ("iClass", 10, "work"), ("dIndustry", 13, "work"), ("dOccup", 9, "work"), ("dHours", 6, "work"),
    ("dHour89", 6, "work"), ("dWeek89", 3, "work"), ("iWork89", 3, "work"), ("iWorklwk", 3, "work"),
    ("iMeans", 12, "work"), ("iRiders", 9, "work"), ("dTravtime", 7, "work"), ("dDepart", 6, "work"),
    ("iYearwrk", 8, "work"), ("iRlabor", 7, "work"), ("dRearning", 6, "work"), ("iLooking", 3, "work"),
    ("iAvail", 5, "work"), ("iTmpabsnt", 4, "work"),
    ("iMilitary", 5, "military"), ("iRvetserv", 12, "military"), ("iFeb55", 2, "military"),
    ("iKorean", 2, "military"), ("iMay75880", 2, "military"), ("iOthrserv", 2, "military"),
    ("iSept80", 2, "military"), ("iVietnam", 2, "military"), ("iWWII", 2, "military"), ("dYrsserv", 3, "military"),
    ("dIncome1", 5, "income"), ("dIncome2", 3, "income"), ("dIncome3", 3, "income"), ("dIncome4", 3, "income"),
    ("dIncome5", 3, "income"), ("dIncome6", 3, "income"), ("dIncome7", 3, "income"), ("dIncome8", 3, "income"),
    ("dRpincome", 5, "income"), ("dPoverty", 3, "income"),
]
NAMES = [name for name, _, _ in ATTRIBUTES]
DOMAINS = np.array([levels for _, levels, _ in ATTRIBUTES], np.int64)
# levels of each block's driving latent variable
DRIVER_LEVELS = {"demo": 16, "fertility": 16, "household": 6, "origin": 5, "work": 6, "military": 4, "income": 5,
                 "none": 1}
GATE_OFF_NOT_APPLICABLE = 0.97  # gated-off people get code 0 ("not applicable") this often
AGE_P = np.array([0.13, 0.14, 0.16, 0.17, 0.13, 0.10, 0.09, 0.08])
WORKS_BY_AGE = np.array([0.02, 0.45, 0.80, 0.82, 0.78, 0.60, 0.20, 0.05])
VETERAN_BY_AGE_MALE = np.array([0.0, 0.01, 0.05, 0.10, 0.20, 0.35, 0.45, 0.40])
IMMIGRANT_P = 0.09
ERROR_EFFECT_ATTRIBUTES = 12
QUANTILES = 4096  # inverse-CDF lookup tables: a code per (driver level, uniform draw in 1/4096 steps)


def _tables(seed: int = SEED) -> dict:
    """Conditional code distributions per attribute and driver level (as inverse-CDF lookup tables
    ``(drivers · QUANTILES,)`` uint8), the small per-value error effects, the latent tables."""
    rng = np.random.default_rng([seed, 0])
    lookup = []
    steps = (np.arange(QUANTILES) + 0.5) / QUANTILES
    for name, levels, block in ATTRIBUTES:
        drivers = DRIVER_LEVELS.get(block, 1)
        gated = block in ("work", "military", "origin", "fertility")
        on_levels = levels - 1 if gated else levels  # gated attributes keep code 0 for "not applicable"
        base = 1.0 / np.arange(1, on_levels + 1) ** 1.3
        base = rng.permutation(base / base.sum())
        probs = 0.6 * base + 0.4 * rng.dirichlet(np.full(on_levels, 0.5), size=drivers)
        probs /= probs.sum(axis=1, keepdims=True)
        cum = np.cumsum(probs, axis=1)
        cum[:, -1] = 1.0
        lookup.append(np.stack([np.searchsorted(c, steps, side="right") for c in cum]).astype(np.uint8).ravel())
    effect_features = rng.choice(len(ATTRIBUTES), ERROR_EFFECT_ATTRIBUTES, replace=False)
    effects = {int(j): rng.normal(0.0, 0.25, DOMAINS[j]) for j in effect_features}
    job_by_sex = rng.dirichlet(np.full(6, 0.8), size=2)
    household_by_age = rng.dirichlet(np.full(6, 0.7), size=8)
    origin = rng.dirichlet(np.full(5, 0.6))
    return dict(lookup=lookup, effects=effects, job_by_sex=np.cumsum(job_by_sex, axis=1),
                household_by_age=np.cumsum(household_by_age, axis=1), origin=np.cumsum(origin))


def _draw(rng, cum, rows):
    """Index of a uniform draw in each row's cumulative distribution ``cum (rows, d)``."""
    u = rng.random(rows)
    return (u[:, None] > cum).sum(axis=1)


def census_chunk(chunk: int, rows: int, tables: dict, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """Chunk number ``chunk`` (``rows`` ≤ CHUNK_ROWS): codes ``(68, rows)`` uint8 (feature-major,
    codes 0 … levels−1) and errors ``(rows,)`` float64 (0/1)."""
    rng = np.random.default_rng([seed, chunk + 1])
    age = np.searchsorted(np.cumsum(AGE_P), rng.random(rows) * AGE_P.sum(), side="right").clip(0, 7)
    male = rng.random(rows) < 0.5
    works = rng.random(rows) < WORKS_BY_AGE[age]
    immigrant = rng.random(rows) < IMMIGRANT_P
    veteran = rng.random(rows) < np.where(male, VETERAN_BY_AGE_MALE[age], 0.01 * (age >= 2))
    fertile = ~male & (age >= 2)
    job = _draw(rng, tables["job_by_sex"][male.astype(np.int64)], rows)
    household = _draw(rng, tables["household_by_age"][age], rows)
    origin = np.searchsorted(tables["origin"], rng.random(rows), side="right").clip(0, 4)
    era = np.clip(age - 4, 0, 3)
    income = np.clip(np.where(works, 1 + (job % 3) + (age >= 3) + (age >= 5), (age >= 6).astype(np.int64))
                     + rng.integers(-1, 2, rows), 0, 4)
    demo = age * 2 + male
    driver = {"demo": demo, "fertility": demo, "household": household, "origin": origin, "work": job,
              "military": era, "income": income, "none": np.zeros(rows, np.int64)}
    gate = {"work": works, "military": veteran, "origin": immigrant, "fertility": fertile}
    codes = np.empty((len(ATTRIBUTES), rows), np.uint8)
    for j, (name, levels, block) in enumerate(ATTRIBUTES):
        if block == "age":
            codes[j] = age
            continue
        if block == "sex":
            codes[j] = male
            continue
        z = driver[block]
        drawn = tables["lookup"][j][z * QUANTILES + rng.integers(0, QUANTILES, rows)]
        if block in gate:
            off_code = np.where(rng.random(rows) < GATE_OFF_NOT_APPLICABLE, 0, drawn + 1)
            codes[j] = np.where(gate[block], drawn + 1, off_code)
        else:
            codes[j] = drawn
    logit = (-3.0 + 1.3 * works * (income >= 2) + 0.5 * ((age >= 3) & (age <= 5))
             + 0.8 * (immigrant & (origin >= 3)) * (job == 2) + 0.6 * (age >= 6) * (income <= 1)
             + 0.4 * works * (job == 4) * male)
    for j, effect in tables["effects"].items():
        logit = logit + effect[codes[j]]
    errors = (rng.random(rows) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float64)
    return codes, errors


def census_codes(rows: int, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """The first ``rows`` rows: codes ``(68, rows)`` uint8 (feature-major) and errors ``(rows,)`` float64,
    written chunk by chunk into preallocated arrays (peak ≈ the result + one chunk)."""
    tables = _tables(seed)
    codes = np.empty((len(ATTRIBUTES), rows), np.uint8)
    errors = np.empty(rows, np.float64)
    for chunk, start in enumerate(range(0, rows, CHUNK_ROWS)):
        n = min(CHUNK_ROWS, rows - start)
        codes[:, start:start + n], errors[start:start + n] = census_chunk(chunk, n, tables, seed)
    return codes, errors


def write_census_parquet(path: str | Path, rows: int, seed: int = SEED, error_column: str = "error") -> Path:
    """The first ``rows`` rows as a Parquet file (one UInt8 column per attribute, 0/1 ``error``),
    written one chunk (one row group) at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    tables = _tables(seed)
    schema = pa.schema([(name, pa.uint8()) for name in NAMES] + [(error_column, pa.uint8())])
    partial = path.with_name(path.name + ".partial")
    with pq.ParquetWriter(partial, schema, compression="zstd") as writer:
        for chunk, start in enumerate(range(0, rows, CHUNK_ROWS)):
            n = min(CHUNK_ROWS, rows - start)
            codes, errors = census_chunk(chunk, n, tables, seed)
            arrays = [pa.array(codes[j]) for j in range(codes.shape[0])] + [pa.array(errors.astype(np.uint8))]
            writer.write_table(pa.Table.from_arrays(arrays, schema=schema))
    partial.replace(path)
    return path
