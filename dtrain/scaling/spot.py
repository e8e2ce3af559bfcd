"""``dtrain scale spot``: expected goodput and cost per useful token of spot vs on-demand capacity.

The model (Daly 2006, exponential failures): a job does ``tau`` seconds of work, then blocks ``C``
seconds to save; interruptions arrive as a Poisson process with mean time between them ``M``; each
costs a restart ``R`` (detection, teardown, relaunch, restore, first step; on spot also waiting for
capacity) plus the segment in progress. The expected wall time of one segment is
``M e^(R/M) (e^((tau+C)/M) - 1)``, so goodput is ``tau`` over that; ``tau`` is chosen to maximize it
(Young's sqrt(2CM) is close when C << M). A preemption of any node stops the whole job (synchronous
training), so the job's interruption rate is the per-node rate times the number of nodes: what is a
rare event for one node becomes routine for a thousand GPUs.

Cost per useful token = price per GPU-second / (tokens per second per GPU x goodput). Spot saves
``1 - (spot price / on-demand price) x (on-demand goodput / spot goodput)``: the often-quoted 60-90%
is the price discount alone, and holds only while spot goodput stays near on-demand goodput.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from dtrain.config.errors import ArgumentParser, ConfigError

# Llama 3 (Dubey et al. 2024, sec. 3.3.4): 419 unexpected interruptions in 54 days on 16,384 H100s
# (2,048 nodes of 8): 419 / (54 x 24 h x 2,048 nodes) = 1.6e-4 per node-hour on dedicated capacity.
ON_DEMAND_FAILURES_PER_NODE_HOUR = 419 / (54 * 24 * 2048)
CLAIMED_SAVINGS = (0.6, 0.9)


def segment_goodput(interval_s: float, save_s: float, restart_s: float, mtbi_s: float) -> float:
    """Useful share of wall time for work ``interval_s`` between saves of cost ``save_s`` (Daly's model)."""
    if interval_s <= 0:
        return 0.0
    if math.isinf(mtbi_s):
        return interval_s / (interval_s + save_s)
    exponent = (interval_s + save_s) / mtbi_s + restart_s / mtbi_s
    if exponent > 700:
        return 0.0
    expected = mtbi_s * math.exp(restart_s / mtbi_s) * math.expm1((interval_s + save_s) / mtbi_s)
    return interval_s / expected


def best_interval(save_s: float, restart_s: float, mtbi_s: float) -> tuple[float, float]:
    """(interval of work in seconds, goodput) maximizing goodput: ternary search on log(interval)."""
    if math.isinf(mtbi_s):
        return math.inf, 1.0
    low, high = math.log(1e-3), math.log(max(1e4 * mtbi_s, 1.0))
    for _ in range(200):
        a, b = low + (high - low) / 3, high - (high - low) / 3
        if segment_goodput(math.exp(a), save_s, restart_s, mtbi_s) < segment_goodput(math.exp(b), save_s,
                                                                                      restart_s, mtbi_s):
            low = a
        else:
            high = b
    tau = math.exp((low + high) / 2)
    return tau, segment_goodput(tau, save_s, restart_s, mtbi_s)


@dataclass
class Inputs:
    save_s: list[float]  # blocking save cost, per GPU count
    restart_s: list[float]  # failure -> first productive step, per GPU count (without waiting for capacity)
    tokens_per_s_per_gpu: list[float]  # per GPU count
    spot_preemptions_per_node_hour: float
    on_demand_failures_per_node_hour: float
    on_demand_price: float  # per GPU-hour
    spot_price: float
    spot_capacity_wait_s: float  # after a preemption, until replacement nodes run
    gpus: list[int]
    gpus_per_node: int
    provenance: dict[str, str]


def _job_mtbi_s(rate_per_node_hour: float, nodes: int) -> float:
    rate = rate_per_node_hour * nodes
    return 3600.0 / rate if rate > 0 else math.inf


def estimate(inputs: Inputs, index: int, spot_rate: float | None = None) -> dict[str, Any]:
    """Both capacity kinds at ``inputs.gpus[index]``; ``spot_rate`` overrides the spot preemption rate."""
    gpus = inputs.gpus[index]
    nodes = math.ceil(gpus / inputs.gpus_per_node)
    save, restart = inputs.save_s[index], inputs.restart_s[index]
    spot_rate = inputs.spot_preemptions_per_node_hour if spot_rate is None else spot_rate
    od_rate = inputs.on_demand_failures_per_node_hour
    od_mtbi = _job_mtbi_s(od_rate, nodes)
    spot_mtbi = _job_mtbi_s(spot_rate + od_rate, nodes)
    # a preemption also waits for capacity; a hardware failure is assumed to restart on spare nodes
    spot_restart = restart + (inputs.spot_capacity_wait_s * spot_rate / (spot_rate + od_rate)
                              if spot_rate + od_rate > 0 else 0.0)
    od_tau, od_goodput = best_interval(save, restart, od_mtbi)
    spot_tau, spot_goodput = best_interval(save, spot_restart, spot_mtbi)

    def per_million_tokens(price: float, goodput: float) -> float:
        throughput = inputs.tokens_per_s_per_gpu[index]
        return price / 3600.0 / (throughput * goodput) * 1e6 if goodput > 0 else math.inf

    od_cost = per_million_tokens(inputs.on_demand_price, od_goodput)
    spot_cost = per_million_tokens(inputs.spot_price, spot_goodput)
    return {"gpus": gpus, "nodes": nodes, "save_s": save, "restart_s": restart,
            "on_demand": {"mtbi_s": od_mtbi, "interval_s": od_tau, "goodput": od_goodput,
                          "young_interval_s": math.sqrt(2 * save * od_mtbi) if save > 0 else None,
                          "cost_per_million_tokens": od_cost},
            "spot": {"preemptions_per_node_hour": spot_rate, "mtbi_s": spot_mtbi, "restart_s": spot_restart,
                     "interval_s": spot_tau, "goodput": spot_goodput,
                     "young_interval_s": math.sqrt(2 * save * spot_mtbi) if save > 0 else None,
                     "cost_per_million_tokens": spot_cost},
            "savings": 1.0 - spot_cost / od_cost if math.isfinite(spot_cost) else -math.inf}


def max_rate_for_savings(inputs: Inputs, index: int, savings: float) -> float | None:
    """The highest spot preemption rate per node-hour that still saves ``savings``; None: not even at 0."""
    if estimate(inputs, index, 0.0)["savings"] < savings:
        return None
    low, high = 0.0, 1.0
    while estimate(inputs, index, high)["savings"] >= savings and high < 1e4:
        high *= 2
    for _ in range(60):
        middle = (low + high) / 2
        if estimate(inputs, index, middle)["savings"] >= savings:
            low = middle
        else:
            high = middle
    return low


def where_claims_hold(inputs: Inputs, rows: list[dict[str, Any]]) -> list[str]:
    discount = 1 - inputs.spot_price / inputs.on_demand_price
    lines = [f"price discount alone: {discount:.0%} (the ceiling of any saving; the often-quoted 60-90% is this "
             "number)"]
    for index, row in enumerate(rows):
        limits = {s: max_rate_for_savings(inputs, index, s) for s in CLAIMED_SAVINGS}
        row["max_spot_rate_for_savings"] = {f"{s:.0%}": limits[s] for s in CLAIMED_SAVINGS}
        parts = []
        for s, limit in limits.items():
            if limit is None:
                parts.append(f"{s:.0%} never (the discount is smaller)")
            elif limit < 1e-9:
                parts.append(f"{s:.0%} only without a single preemption (the discount is just that)")
            else:
                parts.append(f"{s:.0%} while preemptions stay below {limit:.3g}/node-hour (one per "
                             f"{_hours(1 / limit / row['nodes']) if limit > 0 else 'never'} for the job)")
        nodes = f"{row['nodes']} node" + ("s" if row["nodes"] > 1 else "")
        lines.append(f"{row['gpus']} GPUs ({nodes}): at {inputs.spot_preemptions_per_node_hour:g}/node-"
                     f"hour spot saves {row['savings']:.0%} (goodput {row['spot']['goodput']:.1%} vs on-demand "
                     f"{row['on_demand']['goodput']:.1%}); saves " + "; ".join(parts))
    return lines


def _hours(hours: float) -> str:
    if math.isinf(hours):
        return "never"
    if hours >= 48:
        return f"{hours / 24:.3g} d"
    return f"{hours:.3g} h" if hours >= 1 else f"{hours * 60:.3g} min"


def measured_from_run(run_dir: Path) -> dict[str, tuple[float, str]]:
    """Step time, blocking save cost, restart time and tokens/s per GPU measured by a run's goodput ledger."""
    from dtrain.metrics.goodput import read_ledger, summarize

    records = read_ledger(run_dir)
    summary = summarize(records)
    found: dict[str, tuple[float, str]] = {}
    saves = [r["seconds"] for r in records if r["event"] == "checkpoint" and r.get("kind") == "interval"] or \
        [r["seconds"] for r in records if r["event"] == "checkpoint"]
    if saves:
        found["save_s"] = (statistics.median(saves), f"median of {len(saves)} blocking saves in {run_dir}")
    first_step = {}
    for record in records:
        if record["event"] == "step":
            first_step.setdefault(record["attempt"], record["seconds"])
    restarts, how = [], "failure (last record) -> first step of the next attempt"
    for previous, attempt in zip(summary.attempts, summary.attempts[1:]):
        if attempt.attempt in first_step:
            restarts.append(attempt.process_start - previous.last_t + attempt.startup_s + attempt.restore_s
                            + first_step[attempt.attempt])
    if not restarts:  # no relaunch recorded: a cold start is the best available stand-in
        how = "cold start of the only attempt (no relaunch recorded): start-up + restore + first step"
        restarts = [a.startup_s + a.restore_s + first_step[a.attempt] for a in summary.attempts
                    if a.attempt in first_step]
    if restarts:
        found["restart_s"] = (statistics.median(restarts), f"{how}, median of {len(restarts)} in {run_dir}")
    metrics = Path(run_dir) / "metrics.jsonl"
    world = _world_size(records)
    if metrics.exists():
        rates = [row["tokens_per_s"] for row in map(json.loads, metrics.read_text().splitlines())
                 if "tokens_per_s" in row]
        if rates:
            found["tokens_per_s_per_gpu"] = (statistics.median(rates) / world, f"median tokens/s of {len(rates)} "
                                             f"logged steps in {run_dir} / {world} ranks")
    return found


def _world_size(records: list[dict[str, Any]]) -> int:
    sizes = [r.get("world_size", 1) for r in records if r["event"] == "attempt"]
    return sizes[-1] if sizes else 1


def _numbers(text: str, name: str, count: int, minimum: float = 0.0) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{name}={text} must be a number or one number per --gpus entry") from None
    if len(values) == 1:
        values *= count
    if len(values) != count:
        raise ConfigError(f"{name}={text} has {len(values)} values for {count} GPU counts; give one, or one per "
                          "--gpus entry")
    if any(not (minimum <= v < math.inf) for v in values):
        raise ConfigError(f"{name}={text} must be finite and >= {minimum:g}")
    return values


def _check_rate(name: str, value: float) -> None:
    if not 0 <= value < 3600:
        raise ConfigError(f"{name}={value:g} must be a rate per node-hour within [0, 3600) (e.g. 0.01: one "
                          "preemption per node every 100 hours)")


def _check_price(name: str, value: float) -> None:
    if not 0 < value < math.inf:
        raise ConfigError(f"{name}={value:g} must be a positive price per GPU-hour")


def parse(argv: Sequence[str]) -> tuple[Inputs, Path]:
    parser = ArgumentParser(prog="dtrain scale spot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="run_dir", help="take save, restart, and tokens/s per GPU measured by this "
                        "run directory's goodput ledger (explicit options below override)")
    parser.add_argument("--save-s", help="blocking save cost, seconds: one value, or one per --gpus entry")
    parser.add_argument("--restart-s", help="failure -> first productive step, seconds (one, or one per --gpus)")
    parser.add_argument("--step-s", type=float, help="step time, seconds (with --tokens-per-step and "
                        "--measured-gpus: the throughput)")
    parser.add_argument("--tokens-per-step", type=float, help="tokens per optimizer step of the measured job")
    parser.add_argument("--measured-gpus", type=int, default=1, help="GPUs (ranks) of the measured job")
    parser.add_argument("--tokens-per-s-per-gpu", help="throughput per GPU (instead of the three above): one "
                        "value, or one per --gpus entry")
    parser.add_argument("--spot-preemptions-per-node-hour", type=float, required=True,
                        help="spot preemptions per node per hour (e.g. 0.01)")
    parser.add_argument("--on-demand-failures-per-node-hour", type=float, default=ON_DEMAND_FAILURES_PER_NODE_HOUR,
                        help="interruptions on dedicated capacity (default %(default).2g: Llama 3's 419 in 54 days on "
                             "2,048 nodes), added to spot's too")
    parser.add_argument("--on-demand-price", type=float, required=True, help="price per GPU-hour, on demand")
    parser.add_argument("--spot-price", type=float, required=True, help="price per GPU-hour, spot")
    parser.add_argument("--spot-capacity-wait-s", type=float, default=300.0,
                        help="after a preemption, seconds until replacement nodes run (default %(default)g, assumed)")
    parser.add_argument("--gpus", default="8,128,1024", help="GPU counts (default %(default)s)")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--out", required=True, help="OUT.json; the plot goes beside it as OUT.png")
    args = parser.parse_args(list(argv))

    try:
        gpus = [int(v) for v in args.gpus.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--gpus={args.gpus} must be a comma-separated list of GPU counts, e.g. 8,128,1024") from None
    if not gpus or min(gpus) < 1 or args.gpus_per_node < 1 or args.measured_gpus < 1:
        raise ConfigError("--gpus, --gpus-per-node and --measured-gpus must be positive")
    _check_rate("--spot-preemptions-per-node-hour", args.spot_preemptions_per_node_hour)
    _check_rate("--on-demand-failures-per-node-hour", args.on_demand_failures_per_node_hour)
    _check_price("--on-demand-price", args.on_demand_price)
    _check_price("--spot-price", args.spot_price)
    if not 0 <= args.spot_capacity_wait_s < math.inf:
        raise ConfigError(f"--spot-capacity-wait-s={args.spot_capacity_wait_s:g} must be >= 0")

    measured: dict[str, tuple[float, str]] = {}
    if args.run_dir:
        from dtrain.metrics.goodput import LedgerError

        try:
            measured = measured_from_run(Path(args.run_dir))
        except LedgerError as e:
            raise ConfigError(f"--from {args.run_dir}: {e}") from None
    provenance: dict[str, str] = {}

    def pick(key: str, given: str | None) -> list[float]:
        if given is not None:
            provenance[key] = "given"
            return _numbers(given, f"--{key.replace('_', '-')}", len(gpus))
        if key in measured:
            provenance[key] = measured[key][1]
            return [measured[key][0]] * len(gpus)
        raise ConfigError(f"--{key.replace('_', '-')} is needed (or --from RUN_DIR with a measured value)")

    save_s, restart_s = pick("save_s", args.save_s), pick("restart_s", args.restart_s)
    if args.tokens_per_s_per_gpu is not None:
        throughput = _numbers(args.tokens_per_s_per_gpu, "--tokens-per-s-per-gpu", len(gpus))
        provenance["tokens_per_s_per_gpu"] = "given"
    elif args.step_s is not None and args.tokens_per_step is not None:
        if args.step_s <= 0 or args.tokens_per_step <= 0:
            raise ConfigError("--step-s and --tokens-per-step must be positive")
        throughput = [args.tokens_per_step / args.step_s / args.measured_gpus] * len(gpus)
        provenance["tokens_per_s_per_gpu"] = "--tokens-per-step / --step-s / --measured-gpus, the same at every scale"
    elif "tokens_per_s_per_gpu" in measured:
        throughput = [measured["tokens_per_s_per_gpu"][0]] * len(gpus)
        provenance["tokens_per_s_per_gpu"] = measured["tokens_per_s_per_gpu"][1] + ", the same at every scale"
    else:
        raise ConfigError("the throughput is needed: --tokens-per-s-per-gpu, or --step-s with --tokens-per-step, "
                          "or --from RUN_DIR")
    if not all(0 < t < math.inf for t in throughput):
        raise ConfigError(f"tokens per second per GPU = {throughput} must be positive")
    provenance["savings"] = "the throughput cancels in the saving; it sets the cost per token only"
    inputs = Inputs(save_s, restart_s, throughput, args.spot_preemptions_per_node_hour,
                    args.on_demand_failures_per_node_hour, args.on_demand_price, args.spot_price,
                    args.spot_capacity_wait_s, gpus, args.gpus_per_node, provenance)
    return inputs, Path(args.out)


def plot(inputs: Inputs, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = [10 ** (k / 20) for k in range(-100, 21)]  # 1e-5 .. 10 per node-hour
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 8), sharex=True)
    for index, gpus in enumerate(inputs.gpus):
        rows = [estimate(inputs, index, r) for r in rates]
        line, = top.plot(rates, [max(r["savings"], -1.0) * 100 for r in rows], label=f"{gpus} GPUs")
        bottom.plot(rates, [r["spot"]["goodput"] * 100 for r in rows], color=line.get_color(),
                    label=f"{gpus} GPUs spot")
        bottom.axhline(rows[0]["on_demand"]["goodput"] * 100, color=line.get_color(), linestyle=":", linewidth=1)
    top.axhspan(CLAIMED_SAVINGS[0] * 100, CLAIMED_SAVINGS[1] * 100, color="green", alpha=0.12,
                label="the quoted 60-90%")
    for axis in (top, bottom):
        axis.axvline(inputs.spot_preemptions_per_node_hour, color="gray", linestyle="--", linewidth=1)
        axis.set_xscale("log")
        axis.grid(True, which="both", alpha=0.3)
    top.set_ylim(-100, 100)
    top.set_ylabel("saving vs on-demand per useful token (%)")
    top.set_title(f"spot at {inputs.spot_price:g} vs on-demand at {inputs.on_demand_price:g} per GPU-hour")
    top.legend(loc="lower left", fontsize=8)
    bottom.set_ylabel("goodput (%) (dotted: on-demand)")
    bottom.set_xlabel("spot preemptions per node-hour (dashed: this estimate's rate)")
    bottom.set_ylim(0, 100)
    bottom.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(inputs: Inputs) -> dict[str, Any]:
    rows = [estimate(inputs, index) for index in range(len(inputs.gpus))]
    verdict = where_claims_hold(inputs, rows)
    return {"model": "Daly 2006 exponential failures; a preemption of any node stops the job; interval optimal per "
                     "case", "inputs": asdict(inputs), "rows": rows, "where_60_90_percent_holds": verdict}


def table(result: dict[str, Any]) -> str:
    lines = [f"{'gpus':>6} {'nodes':>5} {'save s':>7} {'restart s':>9} | {'od MTBI':>9} {'od goodput':>10} "
             f"{'od $/Mtok':>9} | {'spot MTBI':>9} {'spot goodput':>12} {'spot $/Mtok':>11} | {'saving':>7}"]
    for row in result["rows"]:
        od, spot = row["on_demand"], row["spot"]
        lines.append(f"{row['gpus']:>6} {row['nodes']:>5} {row['save_s']:>7.3g} {row['restart_s']:>9.3g} | "
                     f"{_hours(od['mtbi_s'] / 3600):>9} {od['goodput']:>10.1%} {od['cost_per_million_tokens']:>9.4g} | "
                     f"{_hours(spot['mtbi_s'] / 3600):>9} {spot['goodput']:>12.1%} "
                     f"{spot['cost_per_million_tokens']:>11.4g} | {row['savings']:>7.1%}")
    return "\n".join(lines + [""] + result["where_60_90_percent_holds"])


def _finite(value: Any) -> Any:
    """JSON has no infinity: an endless MTBI or interval is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def main(argv: Sequence[str]) -> int:
    try:
        inputs, out = parse(argv)
    except ConfigError as e:
        print(e.render(), file=sys.stderr)
        return 2
    result = report(inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_finite(result), indent=2) + "\n")
    plot(inputs, out.with_suffix(".png"))
    print(table(result))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0
