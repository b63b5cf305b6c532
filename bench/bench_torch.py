"""PyTorch eager on the GPU, the reference model (reference/dtopp_ref.py) timed by reference/bench.py,
with TF32 allowed or not: the baseline of bench/bench_cuda.sh.

    python3 bench/bench_torch.py --tf32 0|1 [reference/bench.py speed options]
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "reference"))
import bench  # noqa: E402  (reference/bench.py)

if __name__ == "__main__":
    tf32 = "0"
    if "--tf32" in sys.argv:
        i = sys.argv.index("--tf32")
        tf32 = sys.argv[i + 1]
        del sys.argv[i:i + 2]
    # float32 products in PyTorch use TF32 only when allowed (off by default)
    torch.backends.cuda.matmul.allow_tf32 = tf32 == "1"
    torch.backends.cudnn.allow_tf32 = tf32 == "1"
    print(f"torch {torch.__version__}, TF32 {'allowed' if tf32 == '1' else 'off'}")
    bench.main()
