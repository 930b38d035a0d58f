"""`mmrec shard-convert` against baselines on synthetic LLaMA checkpoints of real sizes (1b, 7b, 13b).

    python benchmarks/bench_convert.py --presets 1b 7b 13b [--work DIR] [--cases ...]
    python benchmarks/bench_convert.py --report          # tables + plots from results/convert_*.json

Per preset, on one bf16 Hugging Face source (sharded safetensors, written shard by shard by
mmrec.streaming.synthetic), each case runs cold (sync + drop_caches first) in its own cgroup v1 memory
cgroup, and its wall time includes a final `sync` (data on disk):

  cp          `cp -r SRC DST` (+ sync): the disk's floor for reading and writing the source once
  load_all    load the whole state dict (safetensors.torch.load_file of every shard), build the MM-Rec
              dict in memory (renames + new tensors), one safetensors.torch.save_file
  per_shard   the library path shard by shard: load_file one shard, build its part, save_file it
  ours        .venv/bin/mmrec shard-convert --source SRC --output OUT -q --json; then, cold again, `mmrec
              verify OUT` timed against `cat` of the same output files (the disk's cold read speed)
  ours_guide  the same with --init guide (copies and generated values only; the default init mode also
              computes W_v = 10 · o_proj · v_proj, a float64 matrix product per layer)
  before      the same command run by another engine (--before-engine DIR: a checkout with its own
              .venv), in the same pass: the before/after comparison
  first_byte  ours under `strace -f --seccomp-bpf -e trace=execve,pwrite64`: seconds from exec to the
              first byte written (the run itself is slowed by tracing and not used for anything else)
  workers2    the same with --workers 2 (dask LocalCluster of 2 processes)
  ours_cap    ours inside a cgroup capped at --small-cap-gb (larger-than-RAM run; verify must pass)
  meta        a Meta tensor-parallel copy of the same preset (benchmarks/gen_meta.py), `cp` and ours on it

Baselines that may not fit run under --cap-gb (every case does, for the machine's sake): an OOM kill is
recorded as "did not fit (OOM at N GiB)", never skipped. Peak memory is the summed RssAnon of every
process of the case, sampled every 5 ms (benchmarks/harness.py). Results go to
benchmarks/results/convert_<preset>.json after each case, so partial runs keep what they measured.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from harness import GIB, MIB, drop_caches, free_bytes, machine_info, run_measured, tree_bytes  # noqa: E402

PY = str(ROOT / ".venv" / "bin" / "python")
MMREC = str(ROOT / ".venv" / "bin" / "mmrec")
RESULTS = HERE / "results"
DISK_RESERVE = 10 * GIB
ALL_CASES = ["cp", "load_all", "per_shard", "ours", "ours_guide", "before", "first_byte", "workers2", "ours_cap",
             "meta"]
BEFORE_ENGINE: Path | None = None  # --before-engine


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- the baselines' own code (run as children of this file) -------------------------------------------

def _hf_files(src: Path) -> tuple[list[Path], dict]:
    index = src / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
        return [src / f for f in files], weight_map
    return [src / "model.safetensors"], {}


def _target(src: Path):
    """The MM-Rec target of a HF llama (same defaults as the engine) and target -> source names."""
    from mmrec.config import MMRecConfig
    from mmrec.schema import parameter_specs

    c = json.loads((src / "config.json").read_text())
    config = MMRecConfig(vocab_size=c["vocab_size"], model_dim=c["hidden_size"],
                         num_layers=c["num_hidden_layers"], num_heads=c["num_attention_heads"],
                         ffn_dim=c["intermediate_size"], ffn_act="silu", ffn_gated=True,
                         norm_eps=c["rms_norm_eps"], tie_word_embeddings=False, torch_dtype="bfloat16")
    rename = {"embedding.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
              "lm_head.weight": "lm_head.weight"}
    per_block = {"norm1.weight": "input_layernorm.weight", "norm2.weight": "post_attention_layernorm.weight",
                 "multi_mem_attention.W_q.weight": "self_attn.q_proj.weight",
                 "multi_mem_attention.W_o.weight": "self_attn.o_proj.weight",
                 "ffn.0.weight": "mlp.up_proj.weight", "ffn.3.weight": "mlp.down_proj.weight",
                 "ffn_gate.weight": "mlp.gate_proj.weight"}
    for i in range(config.num_layers):
        rename.update({f"blocks.{i}.{t}": f"model.layers.{i}.{s}" for t, s in per_block.items()})
    return config, parameter_specs(config), rename


def _new_tensor(spec):
    import torch

    t = torch.empty(spec.shape, dtype=torch.bfloat16)
    if spec.init == "xavier_uniform":
        return torch.nn.init.xavier_uniform_(t)
    return t.fill_(1.0 if spec.init == "ones" else 0.0)


def child_load_all(src: Path, out: Path) -> None:
    """The "load everything" script: whole state dict in memory, convert, one save_file."""
    from safetensors.torch import load_file, save_file

    files, _ = _hf_files(src)
    config, specs, rename = _target(src)
    state = {}
    for f in files:
        state.update(load_file(f))
    converted = {s.name: state[rename[s.name]] if s.name in rename else _new_tensor(s) for s in specs}
    out.mkdir(parents=True)
    save_file(converted, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2))


def child_per_shard(src: Path, out: Path) -> None:
    """The library path shard by shard: each output shard holds the converted tensors of one source
    shard plus the new tensors of the layers whose q_proj it holds."""
    import gc

    from safetensors.torch import load_file, save_file

    files, weight_map = _hf_files(src)
    config, specs, rename = _target(src)
    home = {}
    for s in specs:
        if s.name in rename:
            home[s.name] = weight_map.get(rename[s.name], files[0].name)
        else:
            layer = s.name.split(".")[1]
            home[s.name] = weight_map.get(f"model.layers.{layer}.self_attn.q_proj.weight", files[0].name)
    out.mkdir(parents=True)
    out_map = {}
    for k, f in enumerate(files):
        part = load_file(f)
        converted = {s.name: part[rename[s.name]] if s.name in rename else _new_tensor(s)
                     for s in specs if home[s.name] == f.name}
        name = f"model-{k + 1:05d}-of-{len(files):05d}.safetensors"
        save_file(converted, out / name, metadata={"format": "pt"})
        out_map.update({n: name for n in converted})
        del part, converted
        gc.collect()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": out_map}))
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2))


# --- the driver ---------------------------------------------------------------------------------------

def engine_fingerprint() -> dict:
    """Which engine was measured: HEAD plus a hash of uncommitted changes to the code a conversion runs
    (others edit the working tree while benchmarks run)."""
    import hashlib

    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout

    diff = git("diff", "HEAD", "--", "mmrec", "streaming", "cli")
    return {"head": git("rev-parse", "--short", "HEAD").strip(),
            "uncommitted_sha256": hashlib.sha256(diff.encode()).hexdigest()[:12] if diff else None}


def weight_bytes(src: Path) -> int:
    return sum(p.stat().st_size for p in src.iterdir() if p.suffix in (".safetensors", ".pth"))


def planned_output_bytes(src: Path) -> int:
    plan = json.loads(subprocess.run([MMREC, "shard-convert", "--source", str(src), "--output", "/nonexistent/x",
                                      "--dry-run", "--json"], capture_output=True, text=True, check=True).stdout)
    size = {"BF16": 2, "F16": 2, "F32": 4}
    total = 0
    for t in plan["tensors"]:
        n = 1
        for d in t["shape"]:
            n *= d
        total += n * size[t["dtype"]]
    return total


def ensure_source(work: Path, preset: str) -> tuple[Path, float | None]:
    src = work / f"hf-{preset}"
    marker = src / ".complete"
    if marker.exists():
        return src, None
    shutil.rmtree(src, ignore_errors=True)
    log(f"generating {preset} HF source in {src}")
    t = time.perf_counter()
    subprocess.run([PY, "-c", "import sys; from mmrec.streaming.synthetic import write_synthetic_llama as w; "
                    "w(sys.argv[1], sys.argv[2], 'BF16', '5GB')", str(src), preset], check=True)
    seconds = time.perf_counter() - t
    marker.write_text("ok\n")
    return src, seconds


class Bench:
    def __init__(self, preset: str, work: Path, cap: int, small_cap: int, out_dir: Path):
        self.preset, self.work, self.cap, self.small_cap = preset, work, cap, small_cap
        self.path = out_dir / f"convert_{preset}.json"
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.data.update({"benchmark": "convert", "preset": preset, "machine": machine_info(),
                          "cap_bytes": cap, "small_cap_bytes": small_cap})
        self.data.setdefault("cases", {})

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=1) + "\n")

    def room_for(self, need: int) -> bool:
        return free_bytes(self.work) - need >= DISK_RESERVE

    def case(self, name: str, argv: list[str], src: Path, dst: Path, read_bytes: int | None = None,
             cap: int | None = None, verify: bool = False, need: int = 0) -> dict:
        cap = cap or self.cap
        shutil.rmtree(dst, ignore_errors=True)
        if not self.room_for(need):
            result = {"status": "skipped: not enough disk",
                      "free_bytes": free_bytes(self.work), "needed_bytes": need}
            log(f"{self.preset} {name}: {result['status']}")
            self.data["cases"][name] = result
            self.save()
            return result
        log(f"{self.preset} {name}: {' '.join(map(str, argv))} (cap {cap / GIB:.1f} GiB)")
        engine = engine_fingerprint()
        m = run_measured(argv, f"{self.preset}-{name}", cap_bytes=cap, log=log)
        result = m.to_dict()
        result["engine"] = engine
        result["started"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() - m.wall_s))
        written = tree_bytes(dst) if dst.exists() else 0
        read = read_bytes if read_bytes is not None else weight_bytes(src)
        result.update({"source_bytes": weight_bytes(src), "read_bytes": read, "written_bytes": written})
        if m.returncode == 0:
            result["status"] = "ok"
            result["effective_bandwidth_MBps"] = (read + written) / 1e6 / m.wall_s
        elif m.oom_killed:
            result["status"] = f"did not fit (OOM at {cap / GIB:.0f} GiB)"
        else:
            result["status"] = f"failed (exit {m.returncode})"
        if name.startswith(("ours", "workers", "meta_ours", "before")) and m.returncode == 0:
            report = json.loads(m.stdout)
            result["report_timings"] = report["timings"]
            result["read_bytes"] = report["timings"]["bytes_read"]
            result["effective_bandwidth_MBps"] = (result["read_bytes"] + written) / 1e6 / m.wall_s
            if verify:
                result["verify"] = timed_verify(dst)
                log(f"  verify: {result['verify']['tail']}")
        log(f"  -> {result['status']}: {m.wall_s:.1f} s, peak RssAnon {m.peak_rss_anon / MIB:.0f} MiB, "
            f"read {read / 1e9:.2f} GB, wrote {written / 1e9:.2f} GB"
            + (f", {result.get('effective_bandwidth_MBps', 0):.0f} MB/s" if m.returncode == 0 else "")
            + (f"\n  stderr: {m.stderr_tail[-600:]}" if m.returncode else ""))
        shutil.rmtree(dst, ignore_errors=True)
        self.data["cases"][name] = result
        self.save()
        return result


def timed_verify(dst: Path) -> dict:
    """`mmrec verify` from a cold cache, and `cat` of the same files from a cold cache (the disk's read
    speed for these bytes): verify's target is >= 0.8x cat's bandwidth."""
    files = sorted(p for p in dst.iterdir() if p.suffix == ".safetensors")
    drop_caches()
    t = time.perf_counter()
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)
    cat_s = time.perf_counter() - t
    drop_caches()
    t = time.perf_counter()
    v = subprocess.run([MMREC, "verify", str(dst)], capture_output=True, text=True)
    seconds = time.perf_counter() - t
    nbytes = sum(p.stat().st_size for p in files)
    return {"returncode": v.returncode, "seconds": seconds, "cat_seconds": cat_s, "bytes": nbytes,
            "bandwidth_vs_cat": cat_s / seconds, "tail": (v.stdout + v.stderr).strip()[-300:]}


def first_byte_seconds(src: Path, dst: Path) -> dict:
    """Seconds from exec to the first pwrite of a conversion (strace timestamps; cold cache)."""
    shutil.rmtree(dst, ignore_errors=True)
    drop_caches()
    trace = dst.parent / "first_byte.strace"
    subprocess.run(["strace", "-f", "--seccomp-bpf", "-ttt", "-e", "trace=execve,pwrite64", "-o", str(trace),
                    MMREC, "shard-convert", "--source", str(src), "--output", str(dst), "-q"],
                   stdout=subprocess.DEVNULL, check=True)
    stamps = {}
    for line in trace.read_text().splitlines():
        parts = line.split(maxsplit=2)
        if len(parts) == 3 and parts[2].startswith(("execve(", "pwrite64(")):
            stamps.setdefault(parts[2].split("(")[0], float(parts[1]))
    trace.unlink()
    shutil.rmtree(dst, ignore_errors=True)
    return {"status": "ok", "first_byte_seconds": stamps["pwrite64"] - stamps["execve"]}


def run_preset(preset: str, cases: list[str], work: Path, cap: int, small_cap: int, keep_source: bool,
               repeat: int = 1) -> None:
    bench = Bench(preset, work, cap, small_cap, RESULTS)
    src, gen_s = ensure_source(work, preset)
    if gen_s is not None:
        bench.data["generate_seconds"] = gen_s
    bench.data["source_bytes"] = weight_bytes(src)
    out_bytes = planned_output_bytes(src)
    bench.data["planned_output_bytes"] = out_bytes
    bench.save()
    src_bytes = bench.data["source_bytes"]
    dst = work / f"out-{preset}"
    me = str(Path(__file__).resolve())
    for r in range(repeat):
        _run_cases(bench, cases, src, dst, me, out_bytes, src_bytes, work, "" if r == 0 else f"#{r + 1}")
    if not keep_source:
        shutil.rmtree(src, ignore_errors=True)


def _run_cases(bench, cases, src, dst, me, out_bytes, src_bytes, work, tag) -> None:
    """One pass over the cases; `tag` ("#2", ...) names the repeats (noise: compare within one pass)."""
    for base in cases:
        name = base + tag
        if base == "cp":
            bench.case(name, ["cp", "-r", str(src), str(dst)], src, dst, need=src_bytes)
        elif base in ("load_all", "per_shard"):
            bench.case(name, [PY, me, "--child", base, str(src), str(dst)], src, dst, need=out_bytes)
        elif base == "ours":
            bench.case(name, [MMREC, "shard-convert", "--source", str(src), "--output", str(dst), "-q", "--json"],
                       src, dst, verify=not tag, need=out_bytes)
        elif base == "ours_guide":
            bench.case(name, [MMREC, "shard-convert", "--source", str(src), "--output", str(dst), "-q", "--json",
                              "--init", "guide"], src, dst, need=out_bytes)
        elif base == "before":
            if BEFORE_ENGINE is None:
                raise SystemExit("the 'before' case needs --before-engine DIR")
            bench.case(name, [str(BEFORE_ENGINE / ".venv" / "bin" / "mmrec"), "shard-convert", "--source", str(src),
                              "--output", str(dst), "-q", "--json"], src, dst, need=out_bytes)
            bench.data["cases"][name]["before_engine"] = str(BEFORE_ENGINE)
        elif base == "first_byte":
            log(f"{bench.preset} first_byte: strace of ours")
            bench.data["cases"][name] = first_byte_seconds(src, dst)
            log(f"  -> {bench.data['cases'][name]['first_byte_seconds']:.2f} s to the first byte written")
            bench.save()
        elif base == "workers2":
            bench.case(name, [MMREC, "shard-convert", "--source", str(src), "--output", str(dst), "-q",
                                    "--json", "--workers", "2"], src, dst, verify=False, need=out_bytes)
        elif base == "ours_cap":
            bench.case(name, [MMREC, "shard-convert", "--source", str(src), "--output", str(dst), "-q",
                                    "--json"], src, dst, cap=bench.small_cap, verify=True, need=out_bytes)
        elif base == "meta":
            run_meta(bench, work, dst, out_bytes, src_bytes)
        else:
            raise SystemExit(f"unknown case {base}")


def run_meta(bench: Bench, work: Path, dst: Path, out_bytes: int, src_bytes: int) -> None:
    meta = work / f"meta-{bench.preset}"
    shutil.rmtree(meta, ignore_errors=True)
    if not bench.room_for(src_bytes + out_bytes):
        bench.data["cases"]["meta_ours"] = {"status": "skipped: not enough disk"}
        bench.save()
        return
    log(f"generating {bench.preset} Meta source in {meta}")
    t = time.perf_counter()
    subprocess.run([PY, "-W", "ignore", str(HERE / "gen_meta.py"), str(meta), "--preset", bench.preset], check=True)
    bench.data["meta_generate_seconds"] = time.perf_counter() - t
    bench.data["meta_shards"] = len(list(meta.glob("consolidated.*.pth")))
    try:
        bench.case("meta_cp", ["cp", "-r", str(meta), str(dst)], meta, dst, need=src_bytes)
        bench.case("meta_ours", [MMREC, "shard-convert", "--source", str(meta), "--output", str(dst), "-q",
                                 "--json"], meta, dst, verify=True, need=out_bytes)
    finally:
        shutil.rmtree(meta, ignore_errors=True)


# --- report: tables and plots ------------------------------------------------------------------------

PRESET_ORDER = ["tiny", "small", "1b", "7b", "13b"]
LABELS = {"cp": "cp -r + sync", "load_all": "load everything (load_file all, save_file)",
          "per_shard": "per shard (load_file + save_file)", "ours": "mmrec shard-convert",
          "workers2": "mmrec shard-convert --workers 2", "ours_guide": "mmrec shard-convert --init guide",
          "before": "mmrec shard-convert, engine at cd84bed (before the speed-up)", "first_byte": "first byte written (strace)", "ours_cap": "mmrec shard-convert, 2 GiB cgroup cap",
          "meta_cp": "Meta source: cp -r + sync", "meta_ours": "Meta source: mmrec shard-convert"}
def label(name: str) -> str:
    base, _, rep = name.partition("#")
    return LABELS.get(base, base) + (f" (repeat {rep})" if rep else "")


TABLES_START, TABLES_END = "<!-- tables:start -->", "<!-- tables:end -->"


def load_results(results: Path) -> dict[str, dict]:
    found = {p.stem.split("_", 1)[1]: json.loads(p.read_text()) for p in results.glob("convert_*.json")}
    return {k: found[k] for k in sorted(found, key=lambda k: PRESET_ORDER.index(k) if k in PRESET_ORDER else 99)}


def _fmt(x, digits=1):
    return "–" if x is None else f"{x:.{digits}f}"


def preset_table(preset: str, data: dict) -> str:
    cases = data["cases"]
    ours = cases.get("ours", {})
    rows = [f"### {preset}: source {data['source_bytes'] / 1e9:.2f} GB "
            f"(output {data.get('planned_output_bytes', 0) / 1e9:.2f} GB)", "",
            "| case | status | wall s | peak RssAnon MiB | read GB | written GB | eff. MB/s "
            "| ours' time ÷ case's | case's peak ÷ ours' | ours' bandwidth ÷ case's |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for name, c in cases.items():
        if "wall_s" not in c:
            detail = f" ({c['first_byte_seconds']:.2f} s after exec)" if "first_byte_seconds" in c else ""
            rows.append(f"| {label(name)} | {c['status']}{detail} | | | | | | | | |")
            continue
        ok = c["status"] == "ok"
        peak_mib = c["peak_rss_anon"] / MIB
        time_ratio = ours["wall_s"] / c["wall_s"] if ok and ours.get("status") == "ok" else None
        mem_ratio = c["peak_rss_anon"] / ours["peak_rss_anon"] if ours.get("peak_rss_anon") else None
        bw = c.get("effective_bandwidth_MBps")
        bw_ratio = ours["effective_bandwidth_MBps"] / bw if bw and ours.get("effective_bandwidth_MBps") else None
        status = c["status"] + ("" if ok else f" after {c['wall_s']:.0f} s")
        if c.get("verify"):
            status += ", verify " + ("OK" if c["verify"]["returncode"] == 0 else "FAILED")
        rows.append(f"| {label(name)} | {status} | {c['wall_s']:.1f} | "
                    f"{'≥ ' if not ok else ''}{peak_mib:.0f} | {c['read_bytes'] / 1e9:.2f} | "
                    f"{c['written_bytes'] / 1e9:.2f} | {_fmt(bw, 0)} | {_fmt(time_ratio, 2)} | "
                    f"{_fmt(mem_ratio, 1)} | {_fmt(bw_ratio, 2)} |")
    for name, c in cases.items():
        v = c.get("verify") or {}
        if "cat_seconds" in v:
            rows.append(f"\n`mmrec verify` of {label(name)}'s output, cold cache: {v['seconds']:.1f} s for "
                        f"{v['bytes'] / 1e9:.2f} GB; `cat` of the same files, cold: {v['cat_seconds']:.1f} s; "
                        f"verify's bandwidth = **{v['bandwidth_vs_cat']:.2f}×** cat's.")
    return "\n".join(rows) + "\n"


def write_plots(all_data: dict, results: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    for preset in ("7b", "1b"):
        data = all_data.get(preset)
        if not data:
            continue
        fig, ax = plt.subplots(figsize=(9, 5))
        for name, c in data["cases"].items():
            if c.get("timeline"):
                t = [p[0] for p in c["timeline"]]
                v = [p[1] for p in c["timeline"]]
                ax.plot(t, v, label=f"{label(name)} ({c['status']})", lw=1.2)
        ax.set_yscale("symlog", linthresh=100)
        ax.set_xlabel("seconds since start")
        ax.set_ylabel("summed RssAnon of the process tree, MiB")
        ax.set_title(f"Anonymous memory over time, {preset} llama bf16 (cold cache)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        name = f"convert_rss_{preset}.png"
        fig.tight_layout()
        fig.savefig(results / name, dpi=110)
        plt.close(fig)
        made.append(name)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for case in ("cp", "per_shard", "load_all", "ours", "ours_cap", "workers2", "meta_ours"):
        xs, ts, ms = [], [], []
        for preset, data in all_data.items():
            c = data["cases"].get(case)
            if c and c.get("status") == "ok":
                xs.append(data["source_bytes"] / 1e9)
                ts.append(c["wall_s"])
                ms.append(c["peak_rss_anon"] / MIB)
        if xs:
            ax1.plot(xs, ts, "o-", label=LABELS[case])
            ax2.plot(xs, ms, "o-", label=LABELS[case])
    ax1.set_xlabel("source size, GB")
    ax1.set_ylabel("wall time incl. sync, s")
    ax1.set_title("Time vs model size")
    ax2.set_xlabel("source size, GB")
    ax2.set_ylabel("peak summed RssAnon, MiB")
    ax2.set_yscale("log")
    ax2.set_title("Peak anonymous memory vs model size (completed runs)")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(results / "convert_scaling.png", dpi=110)
    plt.close(fig)
    made.append("convert_scaling.png")
    return made


def write_report(results: Path, results_md: Path) -> None:
    all_data = load_results(results)
    tables = "\n".join(preset_table(p, d) for p, d in all_data.items())
    plots = write_plots(all_data, results)
    block = f"{TABLES_START}\n{tables}\n" + "".join(f"![{p}](results/{p})\n" for p in plots) + TABLES_END
    text = results_md.read_text() if results_md.exists() else f"# Conversion benchmarks\n\n{TABLES_START}\n{TABLES_END}\n"
    head, _, rest = text.partition(TABLES_START)
    _, _, tail = rest.partition(TABLES_END)
    results_md.write_text(head + block + tail)
    print(tables)
    print(f"wrote {results_md} and {', '.join(plots)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["1b"])
    ap.add_argument("--cases", nargs="+", default=["cp", "load_all", "per_shard", "ours"], choices=ALL_CASES)
    ap.add_argument("--work", type=Path, default=Path("/tmp/mmrec-bench-convert"))
    ap.add_argument("--cap-gb", type=float, default=20.0, help="cgroup cap (GiB) every case runs under")
    ap.add_argument("--small-cap-gb", type=float, default=2.0, help="cap (GiB) of the ours_cap case")
    ap.add_argument("--keep-source", action="store_true")
    ap.add_argument("--repeat", type=int, default=1, help="run the case list N times (repeats named case#k)")
    ap.add_argument("--report", action="store_true", help="write tables and plots from the JSON results")
    ap.add_argument("--before-engine", type=Path, help="a checkout with its own .venv: the 'before' case runs it")
    ap.add_argument("--child", nargs=3, metavar=("MODE", "SRC", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    global BEFORE_ENGINE
    BEFORE_ENGINE = args.before_engine
    if args.child:
        warnings.filterwarnings("ignore")
        mode, src, out = args.child
        return {"load_all": child_load_all, "per_shard": child_per_shard}[mode](Path(src), Path(out))
    if args.report:
        return write_report(RESULTS, HERE / "RESULTS.md")
    args.work.mkdir(parents=True, exist_ok=True)
    for preset in args.presets:
        run_preset(preset, args.cases, args.work, int(args.cap_gb * GIB), int(args.small_cap_gb * GIB),
                   args.keep_source, args.repeat)


if __name__ == "__main__":
    main()
