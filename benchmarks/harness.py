"""What every benchmark script shares: paths, datasets, seed lists, run overrides, the machine, output.

A script here starts with `sys.path.insert(0, str(Path(__file__).resolve().parent))` and `import harness`
(which puts the repository on sys.path; `benchmarks.x` would find the package opacus installs).
`dataset` resolves `--data ml100k[:PATH] | ml1m-implicit[:PATH] | synthetic`: PATH, else the env var
($TRUSTREC_ML100K, $TRUSTREC_ML1M_IMPLICIT), else ../shared/data/<folder>, read in place (never copied
into the repo); absent files print "skipped: ..." and the script exits 2. `write` adds "command", "date"
and "machine" to the JSON, writes --out (default benchmarks/results/<name>.json, git-ignored scratch)
and, with --record, docs/results/<name>.json (the figure of record) and regenerates docs/RESULTS.md.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"  # scratch (git-ignored)
RECORD = REPO / "docs" / "results"  # figures of record (committed); docs/RESULTS.md is made from them
CONFIGS = REPO / "configs"  # the product's training configs
SHARED = REPO.parent / "shared" / "data"

# ---------------------------------------------------------------- datasets

from features.sources import FORMS, DataSpec, DatasetNotFound, SpecError, parse_spec  # noqa: E402  (pydantic / pyyaml only; the repository is on sys.path now)


@dataclass
class Data:
    name: str  # the dataset's label, safe in file names: ml100k, ml1m-implicit, synthetic, csv-<folder>-<stem>, ...
    path: Path | None = None  # the folder or file named; None for synthetic
    overrides: list[str] = field(default_factory=list)  # config overrides selecting it
    spec: DataSpec | None = field(default=None, compare=False)  # the parsed --data (kind, data block, split protocol)

    @property
    def kind(self) -> str:
        return self.spec.kind if self.spec else self.name

    @property
    def protocol(self) -> str:
        """The split protocol that fits the data: `given` for a dataset shipped with its test part."""
        return self.spec.protocol if self.spec else "stratified"


def dataset(p: argparse.ArgumentParser, spec: str, allowed: Sequence[str] = ("ml100k", "synthetic"), source: bool = False) -> Data | None:
    """`--data` (features.sources: ml100k[:PATH], ml1m-implicit[:PATH], table:CONFIG.yaml, csv:PATH,
    lines:PATH, synthetic) -> Data. A kind not in `allowed` or a bad spec is a parser error (exit 2)
    naming --data; an absent ml100k / ml1m-implicit folder prints "skipped: ..." on stderr and gives
    None. `source`: add data.source= to the overrides of ml100k, ml1m-implicit and synthetic too
    (for configs whose own source is another one; the file kinds always set it)."""
    kind = spec.strip().partition(":")[0]
    if kind not in allowed:
        p.error(f"--data: unknown dataset {kind!r} ({' or '.join(FORMS.get(a, a) if a in ('table', 'csv', 'lines') else a for a in allowed)})")
    try:
        parsed = parse_spec(spec, flag="--data", shared=SHARED)
    except DatasetNotFound as e:
        print(f"skipped: {e}", file=sys.stderr)
        return None
    except SpecError as e:
        p.error(str(e))
    return Data(parsed.label, parsed.path, parsed.overrides(source or parsed.kind in ("table", "csv", "lines")), parsed)


ALL_KINDS = ("ml100k", "ml1m-implicit", "table", "csv", "lines", "synthetic")  # `allowed` of a script that takes any dataset
PROTOCOLS = {  # split.protocol -> how a report describes it
    "stratified": "ms-recommenders stratified per item 75/25 seed 42",
    "leave_last_n": "leave-last-n per user",
    "given": "the dataset's own train/test split",
}


def protocol(p: argparse.ArgumentParser, data: Data, requested: str | None) -> str:
    """`--protocol`, else the one that fits the data (given for a dataset shipped with its test part,
    else stratified); `given` for data without a test part of its own is a parser error."""
    chosen = requested or data.protocol
    if chosen == "given" and data.protocol != "given":
        p.error(f"--protocol given: --data {data.spec.spec if data.spec else data.name} ships no test part of its own (use stratified or leave_last_n)")
    return chosen


def data_report(data: Data, prepared: Any) -> dict:
    """What a report says about the data: the --data spec, its kind, path, overrides, what was detected
    (csv columns), the loaded sizes and the rows of each split part (a training.pipeline.Prepared)."""
    spec, ds, parts = data.spec, prepared.dataset, prepared.split
    rows = {"train": len(parts.train), "val": len(parts.val) if parts.val is not None else 0, "test": len(parts.test)}
    return {"spec": spec.spec if spec else data.name, "kind": data.kind, "path": data.path, "overrides": data.overrides, "notes": spec.notes if spec else [],
            "users": ds.n_users, "items": ds.n_items, "interactions": len(ds.interactions), "rows": rows}  # fmt: skip


def offline(tmp: str | Path, tag: str = "") -> list[str]:
    """Overrides for a training run inside a benchmark: no MLflow, no feature store (nor its privacy
    ledger: a benchmark's private runs release nothing), no progress bar, bundle and checkpoints in
    the scratch folder `tmp` (suffixed with `tag`)."""
    return ["tracking.enabled=false", "store.load=false", "privacy.ledger=false", "trainer.progress=false",
            f"export.output_dir={tmp}/bundle{tag}", f"trainer.checkpoint_dir={tmp}/ckpt{tag}"]  # fmt: skip


def load(config: str | Path, overrides: Sequence[str], error: str, prepare: bool = False) -> Any:
    """training.config.load_config(config, overrides), with `prepare` (config, training.pipeline.prepare of it:
    the data and its split); None after printing "<error>: <why>" on stderr where the config, the data or the
    split is bad (ConfigError, DataFormatError and pydantic's errors are ValueErrors)."""
    from training.config import load_config

    try:
        cfg = load_config(config, overrides)
        if not prepare:
            return cfg
        from training.pipeline import prepare as split

        return cfg, split(cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"{error}: {e}", file=sys.stderr)
        return None


def numbers(p: argparse.ArgumentParser, flag: str, text: str, kind: Callable[[str], Any] = int) -> list:
    """'0,1,2' -> [0, 1, 2] (empty items skipped; order and repeats kept); else a parser error naming `flag`."""
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        p.error(f"{flag}: expected comma-separated {'integers' if kind is int else 'numbers'}, got {text!r}")


def users_with(csr: Any) -> Any:
    """Indices of the users with at least one interaction in a CSR (indptr first): whom a split part evaluates."""
    import numpy as np

    return np.flatnonzero(np.diff(csr[0]) > 0)


def goal(target: Any, value: float, met: bool | None = None) -> dict:
    """A goal's entry in a report: the target, the value (rounded to 4) and whether it is met (default value >= target)."""
    return {"goal": target, "value": round(value, 4), "met": value >= target if met is None else met}


def summarize(per_seed: list[dict[str, float]]) -> dict:
    """Mean of each metric over seeds, `<metric>_std` (population std) and the per-seed figures, rounded to 4."""
    import statistics

    keys = [key for key in per_seed[0] if all(key in r for r in per_seed)]
    out: dict = {}
    for key in keys:
        values = [float(r[key]) for r in per_seed]
        out[key] = round(statistics.fmean(values), 4)
        out[f"{key}_std"] = round(statistics.pstdev(values), 4)
    out["per_seed"] = [{key: round(float(r[key]), 4) for key in keys} for r in per_seed]
    return out


def run_child(cmd: Sequence[str], what: str, env: dict | None = None, tail: int = 4000) -> str:
    """Run `cmd` (a script of this folder re-running itself for one measurement, in a process of its
    own so that its memory figures are its own); its stdout, or RuntimeError with the end of its stderr."""
    done = subprocess.run(list(cmd), env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{done.stderr[-tail:]}")
    return done.stdout


# ---------------------------------------------------------------- the machine


def _proc(path: str, key: str) -> str | None:
    """The value after `key` on its line of a /proc file (None where absent or unreadable)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith(key)), None)


def cpu_model() -> str:
    return _proc("/proc/cpuinfo", "model name") or platform.processor() or platform.machine()


def _ram_gib() -> float | None:
    total = _proc("/proc/meminfo", "MemTotal:")
    return round(int(total.split()[0]) / 2**20, 1) if total else None


def rss_mb() -> float:
    """This process' resident memory now, MiB (NaN without /proc)."""
    now = _proc("/proc/self/status", "VmRSS:")
    return int(now.split()[0]) / 1024 if now else float("nan")


def peak_rss_mb() -> float:
    """This process' peak resident memory (ru_maxrss, KiB on Linux), MiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _gpu() -> str | None:
    """The GPU(s) by name: through torch when the script already imported it, else nvidia-smi; None without one."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) if torch.cuda.is_available() else None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):  # no nvidia-smi, or it hung
        return None
    return ", ".join(line.strip() for line in out.stdout.splitlines() if line.strip()) or None


def version(dist: str) -> str | None:
    """Installed version of a distribution (pip name), None when absent."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine(libraries: Iterable[str] = ()) -> dict:
    """What ran the benchmark: CPU, cores, RAM, GPU, platform, Python, the given libraries' versions
    (absent ones left out; numpy always) and the 1-minute load average (> cores: timings inflated)."""
    libs = {name: version(name) for name in dict.fromkeys(["numpy", *libraries])}
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "ram_gib": _ram_gib(), "gpu": _gpu(), "platform": platform.platform(),
            "python": platform.python_version(), "libraries": {k: v for k, v in libs.items() if v is not None},
            "load_average_1m": round(os.getloadavg()[0], 2)}  # fmt: skip


def describe(m: Any) -> str:
    """One line for a machine description: this module's dict, or the older string / dict shapes."""
    if isinstance(m, str):
        return m
    if not isinstance(m, dict):
        return "not recorded"
    if "cpu" in m:
        ram = f", {m['ram_gib']:g} GiB RAM" if m.get("ram_gib") else ""
        libs = ", ".join(f"{k} {v}" for k, v in m.get("libraries", {}).items())
        return f"{m['cpu']}, {m.get('cores')} cores{ram}, {m.get('gpu') or 'no GPU'}; Python {m.get('python')}" + (f", {libs}" if libs else "")
    parts = [f"{m['cpus']} cores" if "cpus" in m else None, m.get("platform"), f"Python {m['python']}" if "python" in m else None]
    return ", ".join(p for p in parts if p) or "not recorded"


# ---------------------------------------------------------------- output


THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")  # the thread count moves float results


def command(script: str, argv: Sequence[str] | None) -> str:
    """How to rerun: `[OMP_NUM_THREADS=1 ...] python benchmarks/<script> <arguments>` (shell-quoted),
    with the thread variables that are set: the same seeds give other figures on another thread count."""
    env = [f"{k}={os.environ[k]}" for k in THREAD_VARS if os.environ.get(k)]
    return shlex.join([*env, "python", f"benchmarks/{Path(script).name}", *(sys.argv[1:] if argv is None else argv)])


def parser(doc: str | None, name: str | None = None) -> argparse.ArgumentParser:
    """A script's parser with its module doc as the help (line breaks kept) and, given the JSON's
    `name`, --out and --record (output_flags)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if name:
        output_flags(p, name)
    return p


def output_flags(p: argparse.ArgumentParser, name: str) -> None:
    """--out and --record; `name` is the default file name without .json (may name a placeholder, e.g. cold_start_<data>)."""
    p.add_argument("--out", help=f"JSON output path (default benchmarks/results/{name}.json)")
    p.add_argument("--record", action="store_true", help=f"also write docs/results/{name}.json, the figure of record, and regenerate docs/RESULTS.md")


def repo_relative(path: str | Path) -> str:
    """`path` relative to the repository where it lies inside it (configs/x.yaml), else as given."""
    full = Path(path).resolve()
    return str(full.relative_to(REPO)) if full.is_relative_to(REPO) else str(path)


def stats(values: Iterable[float], keys: Sequence[str] = ("p50", "p95", "p99", "max"), suffix: str = "_ms", digits: int | None = 3) -> dict:
    """A sample summarized under `keys`: "pNN" (numpy's percentile, linear interpolation), "max" and
    "mean", each named key + `suffix` and rounded to `digits` (None: not rounded), None for an empty
    sample; "n" (no suffix) the sample size."""
    import numpy as np

    a = np.asarray(list(values), dtype=float)

    def one(key: str) -> float | None:
        if not a.size:
            return None
        v = float(a.max() if key == "max" else a.mean() if key == "mean" else np.percentile(a, float(key.removeprefix("p"))))
        return v if digits is None else round(v, digits)

    return {"n" if k == "n" else k + suffix: int(a.size) if k == "n" else one(k) for k in keys}


def _plain(x: Any) -> Any:
    if hasattr(x, "item"):  # numpy scalars
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serializable: {type(x).__name__}")


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write(report: dict, args: argparse.Namespace, name: str, *, script: str, argv: Sequence[str] | None, libraries: Iterable[str] = (), record: bool | None = None) -> Path:
    """Write `report` with "command", "date" and "machine" first (kept where the report has them) to
    --out (default benchmarks/results/<name>.json); with --record (or `record`, which overrides it)
    also to docs/results/<name>.json, then regenerate docs/RESULTS.md. Returns the --out path."""
    head = {"command": command(script, argv), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(libraries)}
    full = {**head, **report}
    text = json.dumps(full, indent=2, default=_plain) + "\n"
    out = Path(getattr(args, "out", None) or RESULTS / f"{name}.json")
    _write(out, text)
    if getattr(args, "record", False) if record is None else record:
        _write(RECORD / f"{name}.json", text)
        import results_page  # sibling script

        results_page.main(["--records", str(RECORD), "--out", str(RECORD.parent / "RESULTS.md")])
        print(f"recorded docs/results/{name}.json and regenerated docs/RESULTS.md", file=sys.stderr)
    return out


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], digits: int | Sequence[int] = 4, first: int = 14, width: int = 14) -> str:
    """Plain-text table: the first column left-aligned in `first` characters, the others right-aligned
    in `width`; floats with `digits` decimals (one number, or one per column after the first), None and NaN as '-'."""
    places = [digits] * (len(header) - 1) if isinstance(digits, int) else list(digits)

    def cell(v: Any, d: int) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        return f"{v:.{d}f}" if isinstance(v, float) else str(v)

    lines = [f"{header[0]:<{first}}" + "".join(f"{h:>{width}}" for h in header[1:])]
    for row in rows:
        lines.append(f"{cell(row[0], 0):<{first}}" + "".join(f"{cell(v, d):>{width}}" for v, d in zip(row[1:], places)))
    return "\n".join(lines)
