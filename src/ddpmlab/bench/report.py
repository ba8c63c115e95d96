"""From the benchmark's raw numbers to its table: every ratio is ddpmlab's gain over diffusers, higher is better.

Every raw series is a time (s) or a peak memory (MiB), lower is better, one value per side and round. Round i
gives the paired ratio diffusers_i / ddpmlab_i: a speed-up for times, a memory saving for memory. The table
gives the median of the paired ratios with a distribution-free confidence interval of that median, and calls
a ratio whose interval holds 1.0 parity.
"""

import math
import statistics

SIDES = ("ddpmlab", "diffusers")
# where each row's raw series lives in a preset's results: (section, series); the section gives the kind of gain
RAW = {"training throughput": ("raw_seconds", "training_blocks"),
       "training compute": ("raw_seconds", "training_blocks"),
       "model FLOP utilisation": ("raw_seconds", "training_blocks"),  # the name before sampling got its row
       "training FLOP utilisation": ("raw_seconds", "training_blocks"),
       "sampling throughput": ("raw_seconds", "sampling_rounds"),
       "sampling compute": ("raw_seconds", "sampling_rounds"),
       "sampling FLOP utilisation": ("raw_seconds", "sampling_rounds"),
       "full sampler run": ("raw_seconds", "full_sampler"),
       "NLL throughput": ("raw_seconds", "nll_rounds"),
       "training peak memory": ("raw_mib", "training"),
       "sampling peak memory": ("raw_mib", "sampling")}
KIND = {"raw_seconds": "speed-up", "raw_mib": "memory saving"}


def median_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float, float]:
    """(median, low, high, coverage): the median of `values` and the order-statistic confidence interval of the
    population median (Thompson 1936): [x_(k), x_(n+1-k)] covers it with probability 1 - 2 P(Binomial(n, 1/2) < k),
    whatever the distribution. k is the largest with that coverage at least `level`; when none reaches it (fewer
    than 6 values at 95%) k = 1, the range, and the coverage returned is below `level`."""
    x, n = sorted(values), len(values)

    def coverage(k: int) -> float:
        return 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2**n

    k = max((k for k in range(1, (n + 1) // 2 + 1) if coverage(k) >= level), default=1)
    return statistics.median(x), x[k - 1], x[n - k], coverage(k)


def gain(raw: dict[str, list[float]], kind: str) -> dict:
    """ddpmlab's gain over diffusers from the paired rounds of a lower-is-better series (seconds or MiB)."""
    ratios = [peer / ours for ours, peer in zip(raw["ddpmlab"], raw["diffusers"])]
    if len(ratios) == 1:  # one unpaired run per side: no spread to judge it by
        return {"kind": kind, "median": ratios[0], "interval": None, "coverage": None, "rounds": 1,
                "verdict": "single run"}
    median, low, high, coverage = median_interval(ratios)
    verdict = "parity" if low <= 1 <= high else "ddpmlab ahead" if low > 1 else "diffusers ahead"
    return {"kind": kind, "median": median, "interval": [low, high], "coverage": coverage, "rounds": len(ratios),
            "verdict": verdict}


def add_gains(result: dict) -> list[str]:
    """Set each row's `gain` from the preset result's raw series; drop the rows that have none (returned)."""
    kept, dropped = [], []
    for row in result["rows"]:
        section, series = RAW[row["metric"].split(" (")[0]]
        raw = result.get(section, {}).get(series)
        if raw is None:
            dropped.append(row["metric"])
            continue
        row.pop("ratio", None)  # the old ddpmlab / diffusers column, whose direction changed from row to row
        row["gain"] = gain(raw, KIND[section])
        kept.append(row)
    result["rows"] = kept
    return dropped


def table(results: dict) -> str:
    """The results as a Markdown table, one row per metric, the gain with its interval and verdict, then notes; empty
    for a run that timed no peer (--precision-ab, --loader-only)."""
    if not any(result["rows"] for result in results["presets"].values()):
        return ""
    lines = ["| preset | metric | unit | ddpmlab | diffusers | better | ddpmlab's gain (higher is better) | "
             "interval | verdict |", "|---|---|---|---:|---:|---|---:|---|---|"]
    notes = {}
    for preset, result in results["presets"].items():
        for r in result["rows"]:
            g = r["gain"]
            interval = "-" if g["interval"] is None else \
                f"{g['interval'][0]:.2f}-{g['interval'][1]:.2f} ({100 * g['coverage']:.0f}%)"
            lines.append(f"| {preset} | {r['metric']} | {r['unit']} | {r['ddpmlab']:.4g} | {r['diffusers']:.4g} | "
                         f"{r['better']} | {g['median']:.2f}x {g['kind']} | {interval} | {g['verdict']} |")
            notes.setdefault(r["metric"].split(" (")[0], r["note"])
    lines += ["", "- ddpmlab, diffusers: each side's median over rounds; better: which way those values are better",
              "- ddpmlab's gain: the median over rounds of diffusers' time / ddpmlab's time in the same round "
              "(speed-up), or diffusers' peak memory / ddpmlab's (memory saving); above 1 ddpmlab is ahead",
              "- interval (its coverage): the order-statistic confidence interval of that median (Thompson 1936), "
              "distribution-free, the narrowest at 95% or more: the range of the rounds' ratios from 6 to 8 "
              "rounds, narrower from 9; below 6 rounds the range, covering less; parity: the interval holds 1.0; "
              "single run: one unpaired run per side, no interval"]
    lines += [f"- {metric}: {note}" for metric, note in notes.items() if note]
    return "\n".join(lines)
