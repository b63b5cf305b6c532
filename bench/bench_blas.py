"""GFLOP/s of PyTorch's float32 matrix products on the CPU (OpenBLAS in Debian's python3-torch) on
the shapes of one model configuration: the yardstick for bench/bench_matmul.c, same options, same
output.

    python3 bench/bench_blas.py --threads 2 --C 256 --H 256 --V 50257 --E 16 --k 4 --N 2048

forward: out = inp @ weight.T; backward: dinp += dout @ weight and dweight += dout.T @ inp, into
preallocated outputs as the C products do, together and each alone. Each time is the median of
repeated calls.
"""
import argparse
import statistics
import time

import torch


def median_seconds(fn):
    times = []
    start = time.perf_counter()
    while len(times) < 1000 and (len(times) < 5 or time.perf_counter() - start < 0.3):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    for name, val in dict(threads=2, C=256, H=256, V=256, E=16, k=4, N=4096, L=4).items():
        ap.add_argument(f"--{name}", type=int, default=val)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows = a.N * a.k // a.E
    shapes = [("qkv", a.N, a.C, 3 * a.C, a.L), ("attention_out", a.N, a.C, a.C, a.L),
              ("expert_w1_w3", rows, a.C, a.H, 2 * a.L * a.E), ("expert_w2", rows, a.H, a.C, a.L * a.E),
              ("router", a.N, a.C, a.E, a.L), ("output_head", a.N, a.C, a.V, 1)]
    print(f"BLAS (torch {torch.__version__}), {torch.get_num_threads()} threads: "
          "shape rows IC OC calls/step forward-GFLOP/s backward-GFLOP/s dinp-GFLOP/s dweight-GFLOP/s")
    g = torch.Generator().manual_seed(1)
    step_flops = step_seconds = 0.0
    for name, n, ic, oc, calls in shapes:
        inp = torch.rand(n, ic, generator=g) * 0.02 - 0.01
        weight = torch.rand(oc, ic, generator=g) * 0.02 - 0.01
        out = torch.empty(n, oc)
        dinp, dweight = torch.zeros(n, ic), torch.zeros(oc, ic)
        forward = median_seconds(lambda: torch.mm(inp, weight.t(), out=out))

        def backward_dinp():
            dinp.addmm_(out, weight)

        def backward_dweight():
            dweight.addmm_(out.t(), inp)

        def backward():
            backward_dinp()
            backward_dweight()

        backward_s = median_seconds(backward)
        dinp_s, dweight_s = median_seconds(backward_dinp), median_seconds(backward_dweight)
        flops = 2.0 * n * ic * oc
        print(f"{name:14s} {n:6d} {ic:5d} {oc:6d} {calls:4d} {flops / forward * 1e-9:8.1f} "
              f"{2 * flops / backward_s * 1e-9:8.1f} {flops / dinp_s * 1e-9:8.1f} {flops / dweight_s * 1e-9:8.1f}")
        step_flops += calls * 3 * flops
        step_seconds += calls * (forward + backward_s)
    print(f"step products: {step_flops * 1e-9:.1f} GFLOP in {step_seconds * 1e3:.1f} ms: "
          f"{step_flops / step_seconds * 1e-9:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
