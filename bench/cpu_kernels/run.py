"""kubetune's CPU kernels against what they replace, in one run.

**Causal attention backward**: kubetune's kernel against torch's flash-attention backward. Both
get the same bf16 inputs in the layout transformers hands sdpa ([batch, tokens, heads,
head_dim] memory viewed as [batch, heads, tokens, head_dim], GQA with half as many KV heads) and
the same forward output and logsumexp (torch's CPU flash-attention forward). Each shape is timed
several times, alternating the two kernels, and the median is reported, with the model TFLOPS of
the causal work (5 matmuls over the lower triangle) and the error of each against fp64.

**RMSNorm**, forward and backward in bf16: kubetune's C++ pass against fused_norm's tensor code
(the same autograd function with the kernel switched off), alternating, medians.

**SwiGLU** (``silu(gate) * up``) and **rotary embedding** (queries and keys), forward and backward in
bf16: kubetune's one-pass ops against torch's op-by-op autograd of transformers' code, on the
shapes of a step at each hidden size (4000 tokens; 8 x 500 for the rotary), alternating, medians.

    PYTHONPATH=trainer-image python bench/cpu_kernels/run.py
    PYTHONPATH=trainer-image python bench/cpu_kernels/run.py --tokens 200 450 1000 --head-dims 32 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _alternating(candidates: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds of each candidate, timed in turns (order flipped every round) after a warm-up."""
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for fn in candidates.values():
        fn()
    order = list(candidates.items())
    for i in range(repeats):
        for name, fn in order if i % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _inputs(batch: int, tokens: int, heads: int, head_dim: int) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(tokens * 100 + head_dim)

    def make(h: int, scale: float) -> torch.Tensor:
        return (torch.randn(batch, tokens, h, head_dim, generator=g) * scale).bfloat16().transpose(1, 2)

    q, k, v, grad = make(heads, 1.5), make(heads // 2, 1.5), make(heads // 2, 1.0), make(heads, 1.0)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)[:2]
    return {"q": q, "k": k, "v": v, "grad": grad, "out": out, "lse": lse, "scale": head_dim**-0.5}


def _error(grads: tuple[Any, ...], x: dict[str, Any]) -> float:
    """Largest relative error (norm) of dQ, dK, dV against fp64."""
    import torch.nn.functional as F

    q, k, v = (x[n].detach().double().requires_grad_() for n in "qkv")
    F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).backward(x["grad"].double())
    return max(
        ((g.double() - r.grad).norm() / r.grad.norm()).item() for g, r in zip(grads, (q, k, v), strict=True)
    )


def measure(batch: int, tokens: int, heads: int, head_dim: int, repeats: int) -> dict[str, Any]:
    import torch

    from kubetune_trainer.kernels import causal_attention_backward_op

    ours = causal_attention_backward_op()
    if ours is None:
        raise SystemExit("kubetune's kernel is not available on this machine (needs AVX-512 BF16 and AMX)")
    x = _inputs(batch, tokens, heads, head_dim)
    flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward

    def torchs() -> tuple[Any, ...]:
        return tuple(
            flash_bwd(x["grad"], x["q"], x["k"], x["v"], x["out"], x["lse"], 0.0, True, scale=x["scale"])
        )

    def kubetunes() -> tuple[Any, ...]:
        return tuple(ours(x["grad"], x["q"], x["k"], x["v"], x["out"], x["lse"], x["scale"]))

    med = _alternating({"torch": torchs, "kubetune": kubetunes}, repeats)
    flops = 5 * 2 * (tokens * (tokens + 1) / 2) * head_dim * batch * heads
    return {
        "tokens": tokens,
        "heads": heads,
        "head_dim": head_dim,
        "torch_ms": med["torch"] * 1e3,
        "kubetune_ms": med["kubetune"] * 1e3,
        "ratio": med["kubetune"] / med["torch"],
        "kubetune_tflops": flops / med["kubetune"] / 1e12,
        "torch_error": _error(torchs(), x),
        "kubetune_error": _error(kubetunes(), x),
    }


def measure_norm(rows: int, hidden: int, repeats: int) -> dict[str, Any]:
    import torch

    from kubetune_trainer import fused_norm

    g = torch.Generator().manual_seed(hidden)
    weight = (torch.randn(hidden, generator=g) * 0.2 + 1).bfloat16()
    x = (torch.randn(rows, hidden, generator=g) * 3).bfloat16()
    grad = torch.randn(rows, hidden, generator=g).bfloat16()

    def step(kernel: bool) -> Callable[[], None]:
        def run() -> None:  # the same autograd function, with the C++ pass switched on or off
            original = fused_norm._kernel_applies
            fused_norm._kernel_applies = lambda x, w: kernel  # type: ignore[assignment]
            try:
                fused_norm.RMSNormFunction.apply(x.clone().requires_grad_(), weight, 1e-5).backward(grad)
            finally:
                fused_norm._kernel_applies = original

        return run

    med = _alternating({"kubetune": step(True), "tensor": step(False)}, repeats)
    return {"rows": rows, "hidden": hidden, **_ms_and_ratio(med, baseline="tensor")}


def measure_swiglu(rows: int, width: int, repeats: int) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from kubetune_trainer.fused_mlp import SwiGLUFunction

    g = torch.Generator().manual_seed(width)
    gate, up, grad = (torch.randn(rows, width, generator=g).bfloat16().requires_grad_() for _ in range(3))

    def torchs() -> None:
        (F.silu(gate) * up).backward(grad.detach())

    def kubetunes() -> None:
        SwiGLUFunction.apply(gate, up).backward(grad.detach())

    med = _alternating({"torch": torchs, "kubetune": kubetunes}, repeats)
    return {"rows": rows, "width": width, **_ms_and_ratio(med)}


def measure_rotary(batch: int, tokens: int, heads: int, head_dim: int, repeats: int) -> dict[str, Any]:
    import torch
    from transformers.models.llama import modeling_llama

    from kubetune_trainer.fused_rotary import _FUSED, RotaryFunction

    g = torch.Generator().manual_seed(tokens + heads)
    # q and k in the projections' layout, as attention makes them; GQA with half as many KV heads
    q = torch.randn(batch, tokens, heads, head_dim, generator=g).bfloat16().transpose(1, 2).requires_grad_()
    k = (
        torch.randn(batch, tokens, heads // 2, head_dim, generator=g)
        .bfloat16()
        .transpose(1, 2)
        .requires_grad_()
    )
    angles = torch.randn(1, tokens, head_dim // 2, generator=g)
    cos, sin = (f(torch.cat([angles, angles], -1)).bfloat16() for f in (torch.cos, torch.sin))
    grads = [torch.randn(t.shape, generator=g).bfloat16() for t in (q, k)]
    transformers_rotary = getattr(
        modeling_llama.apply_rotary_pos_emb, _FUSED, modeling_llama.apply_rotary_pos_emb
    )

    def torchs() -> None:
        torch.autograd.backward(list(transformers_rotary(q, k, cos, sin)), grads)

    def kubetunes() -> None:
        torch.autograd.backward(list(RotaryFunction.apply(q, k, cos, sin)), grads)

    med = _alternating({"torch": torchs, "kubetune": kubetunes}, repeats)
    return {"tokens": batch * tokens, "heads": heads, "head_dim": head_dim, **_ms_and_ratio(med)}


def _ms_and_ratio(med: dict[str, float], baseline: str = "torch") -> dict[str, float]:
    return {
        f"{baseline}_ms": med[baseline] * 1e3,
        "kubetune_ms": med["kubetune"] * 1e3,
        "ratio": med["kubetune"] / med[baseline],
    }


def _section(
    title: str,
    column: str,
    values: list[int],
    measure: Callable[[int], dict[str, Any]],
    baseline: str = "torch",
) -> list[dict[str, Any]]:
    """One element-wise kernel against its baseline at each value: a table printed as it runs."""
    print(f"\n{title}\n{column:>6} {baseline + ' ms':>9} {'kubetune ms':>11} {'ratio':>6}")
    results = []
    for value in values:
        r = measure(value)
        results.append(r)
        print(
            f"{value:>6} {r[baseline + '_ms']:>9.2f} {r['kubetune_ms']:>11.2f} {r['ratio']:>6.2f}", flush=True
        )
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, nargs="+", default=[100, 200, 450, 1000])
    ap.add_argument(
        "--head-dims", type=int, nargs="+", default=[32, 64], help="query heads: hidden 768 / head dim"
    )
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument(
        "--norm-hidden", type=int, nargs="+", default=[768, 2048], help="RMSNorm widths (4000 rows)"
    )
    ap.add_argument(
        "--mlp-widths",
        type=int,
        nargs="+",
        default=[2048, 5472],
        help="SwiGLU widths (4000 rows): hidden 768, 2048",
    )
    ap.add_argument(
        "--rotary-heads",
        type=int,
        nargs="+",
        default=[12, 32],
        help="rotary query heads of 64 (8 x 500 tokens)",
    )
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}", flush=True)
    print(f"{'tokens':>6} {'heads':>5} {'dim':>4} {'torch ms':>9} {'kubetune ms':>11} {'ratio':>6} "
          f"{'TFLOPS':>7} {'err torch':>9} {'err ours':>9}")  # fmt: skip
    rows = []
    for head_dim in args.head_dims:
        for tokens in args.tokens:
            r = measure(args.batch, tokens, 768 // head_dim, head_dim, args.repeats)
            rows.append(r)
            print(f"{r['tokens']:>6} {r['heads']:>5} {r['head_dim']:>4} {r['torch_ms']:>9.1f} {r['kubetune_ms']:>11.1f} "
                  f"{r['ratio']:>6.2f} {r['kubetune_tflops']:>7.3f} {r['torch_error']:>9.1e} {r['kubetune_error']:>9.1e}",
                  flush=True)  # fmt: skip
    norms = _section(
        "RMSNorm forward + backward, bf16, 4000 rows",
        "hidden",
        args.norm_hidden,
        lambda hidden: measure_norm(4000, hidden, args.repeats),
        baseline="tensor",
    )
    swiglus = _section(
        "SwiGLU forward + backward, bf16, 4000 rows",
        "width",
        args.mlp_widths,
        lambda width: measure_swiglu(4000, width, args.repeats),
    )
    rotaries = _section(
        "Rotary embedding forward + backward, bf16, 8 x 500 tokens, head dim 64, half as many KV heads",
        "heads",
        args.rotary_heads,
        lambda heads: measure_rotary(8, 500, heads, 64, args.repeats),
    )
    if args.json:
        out = {
            "torch": torch.__version__,
            "rows": rows,
            "rms_norm": norms,
            "swiglu": swiglus,
            "rotary": rotaries,
        }
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
