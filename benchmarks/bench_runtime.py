"""Runtime benchmark of the MM-Rec runtime (mmrec/): speed of prefill and decode, the sequential recurrence
against its memory-bandwidth floor, and loading a multi-GB checkpoint to the GPU.

    PYTHONPATH=. python benchmarks/bench_runtime.py --device cpu
    PYTHONPATH=. python benchmarks/bench_runtime.py --device cuda --out $OUT/runtime_cuda.json

Parts (``--parts``, comma separated, default all that apply to the device):

* ``bandwidth``  — device memory bandwidth from a large device-to-device copy (bytes read + written / time).
* ``model``      — for each size (``DxL``, vocab 32000, F = 4D) and dtype: prefill tokens/s (one call on
  ``--prefill-len`` tokens, batch 1) and per-token decode latency with the carried state
  (``logits, state = model(ids, state)``, one token at a time); on a GPU also the decode floor
  (bytes of the weights / bandwidth).
* ``recurrence`` — the sequential part alone (``mmrec.model.recurrence``) for T steps at D (7B: D=4096) with a
  [2D, D] weight, B=1, against its floor T x bytes([D, 2D]) / bandwidth, per layer and for all L layers (L
  distinct weights, so nothing is served from L2); plus faster variants (fewer ops, torch.compile'd step,
  CUDA graphs of the T-step loop), each checked against a float64 reference.
* ``load``       — save a multi-GB bf16 checkpoint (model built on the device, never on the host), then with a
  cold page cache: raw read of its files (64 MB chunks into one reused buffer) vs
  ``MMRecModel.from_pretrained(dir, device=..., dtype=bf16)``, sampling the process's RssAnon every few ms.

Timings synchronize the device around every measured region; each number is the median of repeats after a
warm-up. Results go to ``--out`` (JSON, written after every part so a time-out keeps what was done) and a
markdown table is printed at the end.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mmrec import MMRecConfig, MMRecModel
from mmrec.model import recurrence as recurrence_current

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --------------------------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int, warmup: int = 1) -> list[float]:
    """Seconds per call of fn(), synchronized, after warm-up calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def cuda_timed(fn, repeats: int, warmup: int = 2) -> list[float]:
    """Seconds per call measured with CUDA events (no host clock), after warm-up calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / 1e3)
    return times


def rss_anon_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class RssAnonSampler:
    """Samples this process's RssAnon every `interval` seconds in a thread; `peak` is the maximum seen."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_anon_bytes())
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self):
        self.peak = rss_anon_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon_bytes())


def machine_info(device: torch.device) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "cpu_threads_torch": torch.get_num_threads()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
        with open("/proc/meminfo") as f:
            info["ram_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_mem_gib=round(props.total_memory / 2**30, 1),
                    gpu_sms=props.multi_processor_count, cuda=torch.version.cuda,
                    gpu_l2_mib=round(getattr(props, "L2_cache_size", 0) / 2**20, 1))
    return info


def parse_sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for item in text.split(","):
        d, _, layers = item.strip().lower().partition("x")
        sizes.append((int(d), int(layers)))
    return sizes


def make_config(dim: int, layers: int, vocab: int) -> MMRecConfig:
    return MMRecConfig(vocab_size=vocab, model_dim=dim, num_layers=layers, num_heads=8, ffn_dim=4 * dim,
                       dropout=0.0)


def build_model(config: MMRecConfig, device: torch.device, dtype: torch.dtype) -> MMRecModel:
    """Built directly on the device in the target dtype: the host never holds a float32 copy."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            model = MMRecModel(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def weight_bytes(model: MMRecModel) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


# --------------------------------------------------------------------------------------------------------------
# part: bandwidth
# --------------------------------------------------------------------------------------------------------------

def bench_bandwidth(device: torch.device, nbytes: int) -> dict:
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    if device.type == "cuda":
        times = cuda_timed(lambda: dst.copy_(src), repeats=20, warmup=3)
    else:
        times = timed(lambda: dst.copy_(src), device, repeats=5, warmup=1)
    best, median = min(times), statistics.median(times)
    del src, dst
    return {"copy_bytes": nbytes, "method": "dst.copy_(src): 2 x bytes / time",
            "bandwidth_GBps_median": 2 * nbytes / median / 1e9, "bandwidth_GBps_best": 2 * nbytes / best / 1e9}


# --------------------------------------------------------------------------------------------------------------
# part: model (prefill, decode)
# --------------------------------------------------------------------------------------------------------------

@torch.inference_mode()
def bench_model(dim: int, layers: int, dtype: torch.dtype, device: torch.device, args, bandwidth: float | None,
                keep: bool = False):
    config = make_config(dim, layers, args.vocab)
    t0 = time.perf_counter()
    model = build_model(config, device, dtype)
    sync(device)
    build_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(1)
    T = args.prefill_len
    ids = torch.randint(0, config.vocab_size, (1, T), generator=gen).to(device)

    prefill = timed(lambda: model(ids), device, repeats=args.prefill_repeats, warmup=1)
    prefill_s = statistics.median(prefill)

    logits, state = model(ids)
    token = logits[:, -1:].argmax(-1)
    for _ in range(3):  # warm-up of the one-token path
        logits, state = model(token, state)
        token = logits[:, -1:].argmax(-1)
    sync(device)
    per_token = []
    for _ in range(args.decode_tokens):
        sync(device)
        start = time.perf_counter()
        logits, state = model(token, state)
        token = logits[:, -1:].argmax(-1)  # greedy, stays on the device
        sync(device)
        per_token.append(time.perf_counter() - start)
    decode_ms = 1e3 * statistics.median(per_token)
    if device.type == "cuda":  # what generate() does on a GPU: the one-token step replayed as a CUDA graph
        from mmrec.decode_graph import DecodeGraph

        step = DecodeGraph(model, state, 1).step
        graph_times = []
        for _ in range(args.decode_tokens):
            sync(device)
            start = time.perf_counter()
            logits, state = step(token, state)
            token = logits[:, -1:].argmax(-1)
            sync(device)
            graph_times.append(time.perf_counter() - start)
        decode_graph_ms = 1e3 * statistics.median(graph_times)
    nbytes = weight_bytes(model)
    result = {"model_dim": dim, "num_layers": layers, "ffn_dim": 4 * dim, "vocab_size": config.vocab_size,
              "dtype": str(dtype).replace("torch.", ""), "parameters": model.num_parameters(),
              "weight_bytes": nbytes, "build_s": build_s, "batch": 1, "prefill_len": T,
              "prefill_s": prefill_s, "prefill_tokens_per_s": T / prefill_s,
              "decode_tokens_timed": args.decode_tokens, "decode_ms_per_token_median": decode_ms,
              "decode_ms_per_token_mean": 1e3 * statistics.fmean(per_token),
              "decode_ms_per_token_min": 1e3 * min(per_token),
              "decode_tokens_per_s": 1e3 / decode_ms}
    if device.type == "cuda":
        result["generate_decode_ms_per_token_graphed"] = decode_graph_ms
    if bandwidth:
        floor_ms = 1e3 * nbytes / (bandwidth * 1e9)
        result.update(decode_floor_ms=floor_ms, decode_ratio_to_floor=decode_ms / floor_ms)
        if device.type == "cuda":
            result["generate_decode_ratio_to_floor"] = decode_graph_ms / floor_ms
    if device.type == "cuda":
        # Each block's forward builds w_h = cat([W_g.weight, mdi.W_g.weight[:, D:]]), a [2D, D] copy, on every
        # call (decode tokens included): time that alone for all layers.
        blocks = list(model.blocks)

        def cats():
            for b in blocks:
                torch.cat([b.W_g.weight, b.mdi.W_g.weight[:, dim:]], dim=0)

        cat_ms = 1e3 * statistics.median(cuda_timed(cats, repeats=10))
        result.update(w_h_cat_ms_per_call_all_layers=cat_ms, w_h_cat_share_of_decode=cat_ms / decode_ms)
    if device.type == "cuda" and not args.no_graphs:
        try:
            result.update(model_with_graphs(model, ids, args))
        except Exception as exc:  # noqa: BLE001
            result["graphs_error"] = repr(exc)[:300]
    if keep:
        return result, model
    del model, logits, state
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result, None


def model_with_graphs(model: MMRecModel, ids: torch.Tensor, args) -> dict:
    """The same model (1) prefilled with recurrence_graphed patched into mmrec.model, (2) decoding with the
    whole one-token step captured as one CUDA graph over a static state; each checked against eager."""
    import mmrec.model as mm

    out = {}
    with torch.inference_mode():
        ref_logits, ref_state = model(ids)
        original = mm.recurrence
        mm.recurrence = recurrence_graphed
        try:
            logits, _ = model(ids)
            torch.cuda.synchronize()
            prefill = timed(lambda: model(ids), ids.device, repeats=args.prefill_repeats, warmup=1)
        finally:
            mm.recurrence = original
        scale = ref_logits.float().abs().max().item()
        out.update(prefill_tokens_per_s_graphed_recurrence=ids.shape[1] / statistics.median(prefill),
                   prefill_graphed_logits_max_abs_diff=(logits.float() - ref_logits.float()).abs().max().item(),
                   prefill_logits_max_abs=scale)

        # Decode: a static token and state; the graph runs the step, copies the new h/acc back into the static
        # state and the greedy next token into the static token. Valid while no memory write falls inside
        # the step (n + 1 < memory_segment_len), as here; a real runtime would run that one step eagerly.
        token0 = ref_logits[:, -1:].argmax(-1)
        static_token = token0.clone()
        static_state = tuple(mm.BlockState(s.h.clone(), s.mem.clone(), s.acc.clone(), s.n) for s in ref_state)
        assert all(s.n + 16 + args.decode_tokens < model.config.memory_segment_len for s in ref_state)

        def step():
            logits, new_state = model(static_token, static_state)
            for st, ns in zip(static_state, new_state):
                st.h.copy_(ns.h)
                st.acc.copy_(ns.acc)
            static_token.copy_(logits[:, -1:].argmax(-1))
            return logits

        def reset():
            static_token.copy_(token0)
            for st, s in zip(static_state, ref_state):
                st.h.copy_(s.h)
                st.acc.copy_(s.acc)
                st.mem.copy_(s.mem)

        graph, static_logits = graphed(step)
        # Agreement over 8 tokens: eager from the prefill state vs graph replays from the same state.
        reset()
        torch.cuda.synchronize()
        graph_logits = []
        for _ in range(8):
            graph.replay()
            graph_logits.append(static_logits.float().clone())
        eager_logits, state, token = [], ref_state, token0
        for _ in range(8):
            logits, state = model(token, state)
            token = logits[:, -1:].argmax(-1)
            eager_logits.append(logits.float())
        diff = max((a - b).abs().max().item() for a, b in zip(graph_logits, eager_logits))
        per_token = []
        for _ in range(args.decode_tokens):
            torch.cuda.synchronize()
            start = time.perf_counter()
            graph.replay()
            torch.cuda.synchronize()
            per_token.append(time.perf_counter() - start)
        out.update(decode_ms_per_token_cudagraph=1e3 * statistics.median(per_token),
                   decode_cudagraph_logits_max_abs_diff=diff)
        del graph, static_logits, static_state
    return out


# --------------------------------------------------------------------------------------------------------------
# part: recurrence, and faster variants of it
# --------------------------------------------------------------------------------------------------------------

def recurrence_lean(z, decay_mix, z_gate, w_h, b_block, h):
    """Same function as mmrec.model.recurrence with 6 kernels per step instead of 11.

    Both gate biases go into one [B, T, 2D] tensor, so one addmm + one sigmoid give s and g; then
    h_t = z (s + 0.1 g) + h (decay_mix - 0.1 g) = h decay_mix + z s + 0.1 g (z - h).
    """
    bias = torch.cat([b_block.expand_as(z_gate), z_gate], dim=-1)  # [B, T, 2D]
    return shipped._recurrence_steps(z, decay_mix, bias, w_h.t(), h)


def recurrence_split(z, decay_mix, z_gate, w_g, w_c, b_block, h):
    """Like recurrence_lean, but the two gate weights stay apart (w_c may be the strided view
    mdi.W_g.weight[:, D:]), so a caller needs no [2D, D] torch.cat per call (7 kernels per step)."""
    D = h.shape[-1]
    w_g_t, w_c_t = w_g.t(), w_c.t()
    outputs = []
    for t in range(z.shape[1]):
        s = torch.sigmoid(torch.addmm(b_block, h, w_g_t))
        g = torch.sigmoid(torch.addmm(z_gate[:, t], h, w_c_t))
        z_t = z[:, t]
        h = torch.addcmul(torch.addcmul(h * decay_mix[:, t], z_t, s), g, z_t - h, value=0.1)
        outputs.append(h)
    return torch.stack(outputs, dim=1)


# The shipped recurrence (mmrec/recurrence.py, first written here): lean steps, CUDA graphs of 64-step chunks.
from mmrec import recurrence as shipped  # noqa: E402

recurrence_graphed = shipped.recurrence


def _step_elementwise(gates, b_block, z_gate_t, z_t, decay_mix_t, h):
    D = h.shape[-1]
    s = torch.sigmoid(gates[:, :D] + b_block)
    g = torch.sigmoid(gates[:, D:] + z_gate_t) * 0.1
    return z_t * (s + g) + h * (decay_mix_t - g)


_compiled_elementwise = None


def recurrence_compiled(z, decay_mix, z_gate, w_h, b_block, h):
    """The current function with the elementwise part of each step fused by torch.compile (one kernel)."""
    global _compiled_elementwise
    if _compiled_elementwise is None:
        _compiled_elementwise = torch.compile(_step_elementwise, dynamic=False, fullgraph=True)
    outputs = []
    for t in range(z.shape[1]):
        h = _compiled_elementwise(F.linear(h, w_h), b_block, z_gate[:, t], z[:, t], decay_mix[:, t], h)
        outputs.append(h)
    return torch.stack(outputs, dim=1)


def graphed(fn):
    """Capture fn() (a whole T-step loop over fixed tensors) as one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def _lean_elementwise(gates, z_t, decay_mix_t, h):
    D = h.shape[-1]
    s, g = gates[:, :D], gates[:, D:]
    return h * decay_mix_t + z_t * s + 0.1 * g * (z_t - h)


_compiled_lean = None


def _recurrence_steps_compiled(z, decay_mix, bias, w_t, h):
    """_recurrence_steps with the 5 elementwise kernels of a step fused into one by torch.compile."""
    global _compiled_lean
    if _compiled_lean is None:
        _compiled_lean = torch.compile(_lean_elementwise, dynamic=False, fullgraph=True)
    outputs = []
    for t in range(z.shape[1]):
        gates = torch.sigmoid(torch.addmm(bias[:, t], h, w_t))
        h = _compiled_lean(gates, z[:, t], decay_mix[:, t], h)
        outputs.append(h)
    return torch.stack(outputs, dim=1)


def recurrence_graphed_compiled(z, decay_mix, z_gate, w_h, b_block, h):
    """recurrence_graphed with the fused (torch.compile) elementwise step inside the chunk graphs."""
    plain = shipped._recurrence_steps
    shipped._recurrence_steps = _recurrence_steps_compiled
    saved = dict(shipped._recurrence_graphs)
    shipped._recurrence_graphs.clear()
    shipped._recurrence_graphs.update(_recurrence_graphs_compiled)
    try:
        return recurrence_graphed(z, decay_mix, z_gate, w_h, b_block, h)
    finally:
        shipped._recurrence_steps = plain
        _recurrence_graphs_compiled.update(shipped._recurrence_graphs)
        shipped._recurrence_graphs.clear()
        shipped._recurrence_graphs.update(saved)


_recurrence_graphs_compiled: dict = {}


def recurrence_inputs(B, T, D, dtype, device, seed):
    """(z, decay_mix, z_gate, w_h, b_block, h0) and, for the split variant, (w_g, w_c) with w_c a strided view
    of a [D, 2D] MDI weight, as in the model."""
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.rand(*shape, generator=gen, dtype=torch.float64) * 2 - 1) * scale

    # Realistic magnitudes: z ~ a linear layer's output, decay_mix = 1.1 gamma + 0.1 with gamma in (0, 0.8),
    # weights and biases U(+-1/sqrt(D)) as PyTorch's default Linear init.
    z = rnd(B, T, D)
    decay_mix = torch.rand(B, T, D, generator=gen, dtype=torch.float64) * 0.8 * 1.1 + 0.1
    z_gate = rnd(B, T, D)
    w_h = rnd(2 * D, D, scale=D ** -0.5)
    b_block = rnd(D, scale=D ** -0.5)
    h0 = rnd(B, D, scale=0.5)
    base = [t.to(device=device, dtype=dtype) for t in (z, decay_mix, z_gate, w_h, b_block, h0)]
    w_h = base[3]
    w_mdi = torch.cat([torch.zeros_like(w_h[D:]), w_h[D:]], dim=1)  # [D, 2D] = [A | C]
    return {"base": base, "w_g": w_h[:D].clone(), "w_c": w_mdi[:, D:]}


def rec_variants(compile_: bool) -> dict:
    """name -> fn(layer inputs) for each recurrence variant."""
    variants = {
        "current": lambda x: recurrence_current(*x["base"]),
        "lean": lambda x: recurrence_lean(*x["base"]),
        "split": lambda x: recurrence_split(*x["base"][:3], x["w_g"], x["w_c"], *x["base"][4:]),
        "graphed_chunks": lambda x: recurrence_graphed(*x["base"]),
    }
    if compile_:
        variants["compiled"] = lambda x: recurrence_compiled(*x["base"])
        variants["graphed_chunks_compiled"] = lambda x: recurrence_graphed_compiled(*x["base"])
    return variants


@torch.inference_mode()
def check_agreement(device, D, T, variants, dtype) -> dict:
    """Max abs diff of each variant vs the current function (same dtype) and vs a float64 reference."""
    inputs64 = recurrence_inputs(1, T, D, torch.float64, device, seed=123)
    ref = variants["current"](inputs64)
    inputs = {"base": [t.to(dtype) for t in inputs64["base"]], "w_g": inputs64["w_g"].to(dtype)}
    inputs["w_c"] = torch.cat([torch.zeros_like(inputs["w_g"]), inputs["base"][3][D:]], dim=1)[:, D:]
    current = variants["current"](inputs).double()
    out = {"dtype": str(dtype).replace("torch.", ""), "D": D, "T": T, "ref_max_abs": ref.abs().max().item(),
           "current_vs_fp64_max_abs": (current - ref).abs().max().item(),
           "current_vs_fp64_rel_norm": ((current - ref).norm() / ref.norm()).item()}
    for name, fn in variants.items():
        if name == "current":
            continue
        y = fn(inputs).double()
        out[f"{name}_vs_current_max_abs"] = (y - current).abs().max().item()
        out[f"{name}_vs_fp64_max_abs"] = (y - ref).abs().max().item()
        out[f"{name}_vs_fp64_rel_norm"] = ((y - ref).norm() / ref.norm()).item()
    return out


@torch.inference_mode()
def bench_recurrence(device: torch.device, args, bandwidth: float) -> dict:
    D, T, L, dtype = args.rec_dim, args.rec_steps, args.rec_layers, DTYPES[args.rec_dtype]
    weight_bytes_ = 2 * D * D * torch.empty((), dtype=dtype).element_size()
    floor_step_s = weight_bytes_ / (bandwidth * 1e9)
    result = {"D": D, "T": T, "B": 1, "layers": L, "dtype": args.rec_dtype, "weight_shape": [2 * D, D],
              "weight_bytes": weight_bytes_, "bandwidth_GBps": bandwidth,
              "floor_us_per_step": 1e6 * floor_step_s, "floor_ms_per_layer": 1e3 * T * floor_step_s,
              "floor_ms_all_layers": 1e3 * L * T * floor_step_s,
              "kernels_per_step": {"current": 11, "lean": 6, "split": 7, "graphed_chunks": 6, "compiled": 2,
                                   "graphed_chunks_compiled": 3},
              "variants": {}}
    variants = rec_variants(not args.no_compile)
    # Numerical agreement first (also warms torch.compile up), on fresh random data; T not a multiple of 64
    # so that graphed_chunks also runs its eager remainder.
    for check_dtype in dict.fromkeys((torch.float32, dtype)):
        try:
            result.setdefault("agreement", []).append(
                check_agreement(device, D, min(T, 200), variants, check_dtype))
        except Exception as exc:  # noqa: BLE001 - report and go on
            result.setdefault("errors", []).append(f"agreement {check_dtype}: {exc!r}")
    print(f"  agreement: {result.get('agreement')}", flush=True)

    # L layers' inputs, each with its own weight (L x 64 MiB at D=4096: nothing lives in L2 across layers).
    layers = [recurrence_inputs(1, T, D, dtype, device, seed=1000 + i) for i in range(L)]
    for name, fn in variants.items():
        try:
            one = statistics.median(timed(lambda: fn(layers[0]), device, repeats=5, warmup=2))

            def all_layers(fn=fn):
                for x in layers:
                    fn(x)
            all_ = statistics.median(timed(all_layers, device, repeats=3, warmup=1))
            result["variants"][name] = _rec_entry(one, all_, T, L, floor_step_s)
        except Exception as exc:  # noqa: BLE001
            result.setdefault("errors", []).append(f"{name}: {exc!r}")
        print(f"  recurrence {name}: {result['variants'].get(name)}", flush=True)

    if device.type == "cuda" and not args.no_graphs:
        for name, fn in variants.items():
            if name.startswith("graphed_chunks"):
                continue
            try:
                graphs = [graphed(lambda x=x, fn=fn: fn(x)) for x in layers]
                graphs[0][0].replay()
                eager_out = fn(layers[0])
                torch.cuda.synchronize()
                graph_diff = (graphs[0][1].float() - eager_out.float()).abs().max().item()
                one = statistics.median(cuda_timed(graphs[0][0].replay, repeats=10))

                def replay_all():
                    for graph, _ in graphs:
                        graph.replay()
                all_ = statistics.median(cuda_timed(replay_all, repeats=5))
                entry = _rec_entry(one, all_, T, L, floor_step_s)
                entry["graph_vs_eager_max_abs"] = graph_diff
                result["variants"][f"{name}+cudagraph"] = entry
                del graphs
            except Exception as exc:  # noqa: BLE001
                result.setdefault("errors", []).append(f"{name}+cudagraph: {exc!r}")
            print(f"  recurrence {name}+cudagraph: {result['variants'].get(name + '+cudagraph')}", flush=True)
        # The bare GEMV alone (T products h @ w_h^T, no elementwise work), graphed: what the matmul reaches.
        w, h = layers[0]["base"][3], layers[0]["base"][5]

        def gemv_loop():
            for _ in range(T):
                F.linear(h, w)
        try:
            graph, _ = graphed(gemv_loop)
            one = statistics.median(cuda_timed(graph.replay, repeats=10))
            result["variants"]["gemv_only+cudagraph"] = _rec_entry(one, None, T, L, floor_step_s)
        except Exception as exc:  # noqa: BLE001
            result.setdefault("errors", []).append(f"gemv_only: {exc!r}")
    del layers
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def _rec_entry(one_layer_s, all_layers_s, T, L, floor_step_s):
    entry = {"us_per_step": 1e6 * one_layer_s / T, "ms_per_layer": 1e3 * one_layer_s,
             "ratio_to_floor_per_layer": one_layer_s / (T * floor_step_s)}
    if all_layers_s is not None:
        entry.update(ms_all_layers=1e3 * all_layers_s, ratio_to_floor_all_layers=all_layers_s / (L * T * floor_step_s))
    return entry


# --------------------------------------------------------------------------------------------------------------
# part: load
# --------------------------------------------------------------------------------------------------------------

def drop_page_cache(files: list[Path], system: bool = True) -> str:
    """Drop the page cache: the whole system's if we may (and system=True), else each file's pages."""
    os.sync()
    if system:
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
            return "drop_caches"
        except OSError:
            pass
    try:
        for path in files:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return "posix_fadvise_dontneed"
    except (OSError, AttributeError):
        return "none (warm cache)"


def raw_read(files: list[Path], chunk: int = 64 * 2**20) -> tuple[float, int]:
    buffer = bytearray(chunk)
    view = memoryview(buffer)
    total = 0
    start = time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while True:
                n = f.readinto(view)
                if not n:
                    break
                total += n
    return time.perf_counter() - start, total


def timed_load(directory: Path, device: torch.device, dtype: torch.dtype):
    gc.collect()
    baseline = rss_anon_bytes()
    with RssAnonSampler(0.002) as sampler:
        start = time.perf_counter()
        model = MMRecModel.from_pretrained(directory, device=device, dtype=dtype)
        sync(device)
        seconds = time.perf_counter() - start
    return model, seconds, sampler.peak - baseline, baseline, sampler.samples


def bench_load(device: torch.device, args, holder: list, config: MMRecConfig) -> dict:
    """holder: [] or [a model of `config` in bf16 on the device], handed over (emptied here)."""
    dtype = torch.bfloat16
    root = Path(args.ckpt_dir) if args.ckpt_dir else Path(tempfile.mkdtemp(prefix="mmrec-bench-"))
    directory = root / "ckpt"
    result = {"checkpoint_dir": str(directory), "max_shard_size": args.max_shard_size}
    try:
        model = holder.pop() if holder else build_model(config, device, dtype)
        result.update(model_dim=config.model_dim, num_layers=config.num_layers, vocab_size=config.vocab_size,
                      ffn_dim=config.ffn_dim, parameters=model.num_parameters(), dtype="bfloat16")
        base = rss_anon_bytes()
        with RssAnonSampler(0.005) as sampler:
            start = time.perf_counter()
            model.save_pretrained(directory, max_shard_size=args.max_shard_size)
            os.sync()
            result["save_s"] = time.perf_counter() - start
        result["save_peak_rss_anon_over_baseline_MiB"] = (sampler.peak - base) / 2**20
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        files = sorted(directory.glob("*.safetensors"))
        total = sum(p.stat().st_size for p in files)
        result.update(files=len(files), total_bytes=total)
        print(f"  saved {len(files)} files, {total / 1e9:.2f} GB in {result['save_s']:.1f} s", flush=True)

        for cache in ("cold", "warm"):
            entry = {}
            if cache == "cold":
                entry["cache_drop"] = drop_page_cache(files, args.cache_drop == "system")
            seconds, nbytes = raw_read(files)
            entry.update(raw_read_s=seconds, raw_read_GBps=nbytes / seconds / 1e9)
            if cache == "cold":
                entry["cache_drop_before_load"] = drop_page_cache(files, args.cache_drop == "system")
            loaded, seconds, peak, baseline, samples = timed_load(directory, device, dtype)
            entry.update(load_s=seconds, load_GBps=total / seconds / 1e9,
                         load_over_raw_read=seconds / entry["raw_read_s"],
                         peak_rss_anon_over_baseline_MiB=peak / 2**20,
                         rss_anon_baseline_MiB=baseline / 2**20, rss_samples=samples)
            if device.type == "cuda":
                entry["gpu_allocated_after_load_GiB"] = torch.cuda.memory_allocated(device) / 2**30
            with torch.inference_mode():  # the loaded model runs
                logits, _ = loaded(torch.tensor([[1, 2, 3]], device=device))
                entry["forward_ok"] = bool(torch.isfinite(logits.float()).all().item())
            del loaded, logits
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            result[cache] = entry
            print(f"  load {cache}: {entry}", flush=True)
    finally:
        if not args.keep_ckpt:
            shutil.rmtree(root if not args.ckpt_dir else directory, ignore_errors=True)
    return result


# --------------------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------------------

def markdown(results: dict) -> str:
    lines = []
    m = results["machine"]
    where = m.get("gpu") or m.get("cpu", "")
    lines.append(f"Machine: {where}; {m.get('cpu_count')} CPU cores; torch {m['torch']}")
    if "bandwidth" in results:
        lines.append(f"\nMeasured memory bandwidth (copy): {results['bandwidth']['bandwidth_GBps_median']:.0f} GB/s")
    if results.get("model"):
        graphs = any("decode_ms_per_token_cudagraph" in r for r in results["model"])
        extra = " prefill tok/s, graphed recurrence | decode ms/token, CUDA graph |" if graphs else ""
        lines.append("\n| D | L | dtype | params | prefill T | prefill tok/s | decode ms/token | decode floor ms | "
                     "ratio |" + extra)
        lines.append("|---|---|---|---|---|---|---|---|---|" + ("---|---|" if graphs else ""))
        for r in results["model"]:
            if "error" in r:
                lines.append(f"| {r['model_dim']} | {r['num_layers']} | {r['dtype']} | error: {r['error']} |")
                continue
            floor = f"{r['decode_floor_ms']:.2f}" if "decode_floor_ms" in r else "–"
            ratio = f"{r['decode_ratio_to_floor']:.1f}x" if "decode_ratio_to_floor" in r else "–"
            row = (f"| {r['model_dim']} | {r['num_layers']} | {r['dtype']} | {r['parameters'] / 1e9:.2f} B | "
                   f"{r['prefill_len']} | {r['prefill_tokens_per_s']:.0f} | "
                   f"{r['decode_ms_per_token_median']:.2f} | {floor} | {ratio} |")
            if graphs:
                row += (f" {r.get('prefill_tokens_per_s_graphed_recurrence', float('nan')):.0f} | "
                        f"{r.get('decode_ms_per_token_cudagraph', float('nan')):.2f} |")
            lines.append(row)
    rec = results.get("recurrence")
    if rec:
        lines.append(f"\nRecurrence D={rec['D']} T={rec['T']} B=1 {rec['dtype']}: floor "
                     f"{rec['floor_us_per_step']:.1f} us/step, {rec['floor_ms_per_layer']:.2f} ms/layer, "
                     f"{rec['floor_ms_all_layers']:.1f} ms for {rec['layers']} layers"
                     + (" (DRAM floor: at this size the weight stays in the CPU caches, so ratios < 1 happen)"
                        if results["device"] == "cpu" else ""))
        lines.append("\n| variant | us/step | ms/layer | ratio (1 layer) | ms, all layers | ratio (all) |")
        lines.append("|---|---|---|---|---|---|")
        for name, v in rec["variants"].items():
            all_ms = f"{v['ms_all_layers']:.1f}" if "ms_all_layers" in v else "–"
            all_r = f"{v['ratio_to_floor_all_layers']:.2f}x" if "ratio_to_floor_all_layers" in v else "–"
            lines.append(f"| {name} | {v['us_per_step']:.1f} | {v['ms_per_layer']:.2f} | "
                         f"{v['ratio_to_floor_per_layer']:.2f}x | {all_ms} | {all_r} |")
    load = results.get("load")
    if load and "cold" in load:
        lines.append(f"\nLoad of {load['total_bytes'] / 1e9:.2f} GB ({load['files']} files, bf16, "
                     f"{load['parameters'] / 1e9:.2f} B params) to {results['device']}; save took {load['save_s']:.1f} s")
        lines.append("\n| cache | raw read s (GB/s) | from_pretrained s (GB/s) | load / raw | peak RssAnon over baseline |")
        lines.append("|---|---|---|---|---|")
        for cache in ("cold", "warm"):
            e = load.get(cache)
            if e:
                lines.append(f"| {cache} ({e.get('cache_drop', 'after cold run')}) | {e['raw_read_s']:.2f} "
                             f"({e['raw_read_GBps']:.2f}) | {e['load_s']:.2f} ({e['load_GBps']:.2f}) | "
                             f"{e['load_over_raw_read']:.2f}x | {e['peak_rss_anon_over_baseline_MiB']:.0f} MiB |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--sizes", default=None,
                        help="comma-separated DxL (F=4D, vocab --vocab); default cpu 512x4,1024x8,2048x12, "
                             "cuda also 4096x24 (the spec's 7B shape)")
    parser.add_argument("--dtypes", default=None, help="default cpu float32,bfloat16; cuda bfloat16")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--prefill-len", type=int, default=None, help="default cpu 64, cuda 512")
    parser.add_argument("--prefill-repeats", type=int, default=None, help="default cpu 2, cuda 3")
    parser.add_argument("--decode-tokens", type=int, default=None, help="default cpu 8, cuda 64")
    parser.add_argument("--parts", default=None, help="bandwidth,model,recurrence,load (default: all; cpu: "
                                                      "bandwidth,model,recurrence)")
    parser.add_argument("--rec-dim", type=int, default=None, help="default cuda 4096, cpu 512")
    parser.add_argument("--rec-steps", type=int, default=None, help="T; default --prefill-len")
    parser.add_argument("--rec-layers", type=int, default=None, help="default cuda 24, cpu 4")
    parser.add_argument("--rec-dtype", default=None, help="default cuda bfloat16, cpu float32")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    parser.add_argument("--no-graphs", action="store_true", help="skip the CUDA graph variants")
    parser.add_argument("--load-size", default="4096x24", help="DxL of the checkpoint for the load part")
    parser.add_argument("--max-shard-size", default="2GB")
    parser.add_argument("--ckpt-dir", default=None, help="where to write it (default: a temp dir, removed)")
    parser.add_argument("--keep-ckpt", action="store_true")
    parser.add_argument("--cache-drop", choices=["system", "file"], default="system",
                        help="cold cache via /proc/sys/vm/drop_caches (needs root; falls back to file) or "
                             "posix_fadvise(DONTNEED) on the checkpoint's files only")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--out", default=None, help="JSON results (default benchmarks/results/runtime_<device>.json)")
    args = parser.parse_args(argv)

    cuda = args.device == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    if cuda and not torch.cuda.is_available():
        print("--device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    sizes = parse_sizes(args.sizes or ("512x4,1024x8,2048x12,4096x24" if cuda else "512x4,1024x8,2048x12"))
    dtypes = [DTYPES[d] for d in (args.dtypes or ("bfloat16" if cuda else "float32,bfloat16")).split(",")]
    args.prefill_len = args.prefill_len or (512 if cuda else 64)
    args.decode_tokens = args.decode_tokens or (64 if cuda else 8)
    args.rec_dim = args.rec_dim or (4096 if cuda else 512)
    args.prefill_repeats = args.prefill_repeats or (3 if cuda else 2)
    args.rec_steps = args.rec_steps or args.prefill_len
    args.rec_layers = args.rec_layers or (24 if cuda else 4)
    args.rec_dtype = args.rec_dtype or ("bfloat16" if cuda else "float32")
    parts = (args.parts or ("bandwidth,model,recurrence,load" if cuda else "bandwidth,model,recurrence")).split(",")
    out = Path(args.out or f"benchmarks/results/runtime_{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)

    results = {"device": args.device, "command": " ".join([Path(sys.executable).name] + sys.argv),
               "started": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine_info(device)}

    def save():
        out.write_text(json.dumps(results, indent=2) + "\n")

    print(json.dumps(results["machine"]), flush=True)
    bandwidth = None
    if "bandwidth" in parts or "recurrence" in parts or cuda:
        results["bandwidth"] = bench_bandwidth(device, (2 if cuda else 1) * 2**30)
        bandwidth = results["bandwidth"]["bandwidth_GBps_median"]
        print(f"bandwidth: {results['bandwidth']}", flush=True)
        save()

    load_config = make_config(*parse_sizes(args.load_size)[0], args.vocab)
    kept = None
    if "model" in parts:
        results["model"] = []
        for dim, layers in sizes:
            for dtype in dtypes:
                keep = ("load" in parts and dtype == torch.bfloat16 and (dim, layers) == (
                    load_config.model_dim, load_config.num_layers))
                t0 = time.perf_counter()
                try:
                    entry, model = bench_model(dim, layers, dtype, device, args,
                                               bandwidth, keep=keep)
                    if model is not None:
                        kept = model
                    del model
                except Exception as exc:  # noqa: BLE001 - e.g. a dtype the CPU cannot do
                    entry = {"model_dim": dim, "num_layers": layers, "dtype": str(dtype).replace("torch.", ""),
                             "error": repr(exc)[:300]}
                entry["bench_s"] = time.perf_counter() - t0
                results["model"].append(entry)
                print(f"model {dim}x{layers} {dtype}: {entry}", flush=True)
                save()

    if "recurrence" in parts:
        t0 = time.perf_counter()
        results["recurrence"] = bench_recurrence(device, args, bandwidth)
        results["recurrence"]["bench_s"] = time.perf_counter() - t0
        save()

    if "load" in parts:
        t0 = time.perf_counter()
        holder = [kept] if kept is not None else []
        kept = None
        results["load"] = bench_load(device, args, holder, load_config)
        results["load"]["bench_s"] = time.perf_counter() - t0
        save()

    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    save()
    print()
    print(markdown(results))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
