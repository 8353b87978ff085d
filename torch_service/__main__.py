"""`torch-worker` / `python -m torch_service`: serve the PyTorch model over gRPC."""

import os
import sys

from weightrelay.server import worker_main

DEFAULT_PORT = 50051
#: How long torch's OpenMP threads busy-wait for more work after each parallel operation (libgomp's
#: spin count). libgomp's default keeps a core spinning long after every operation: on a small machine
#: that CPU is taken from the peer worker and the gRPC threads, which slows small weight moves, while
#: a shorter spin leaves training's speed as it was (bench/README.md). Set GOMP_SPINCOUNT yourself to
#: choose otherwise.
GOMP_SPINCOUNT = "10000"


def main() -> int:
    os.environ.setdefault("GOMP_SPINCOUNT", GOMP_SPINCOUNT)  # read once, when torch loads libgomp
    from torch_service.adapter import TorchAdapter  # torch loads only when a worker really starts

    return worker_main(TorchAdapter, "torch", DEFAULT_PORT)


if __name__ == "__main__":
    sys.exit(main())
