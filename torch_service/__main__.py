"""`torch-worker` / `python -m torch_service`: serve the PyTorch model over gRPC."""

import sys

from weightrelay.server import worker_main

DEFAULT_PORT = 50051


def main() -> int:
    from torch_service.adapter import TorchAdapter  # torch loads only when a worker really starts

    return worker_main(TorchAdapter, "torch", DEFAULT_PORT)


if __name__ == "__main__":
    sys.exit(main())
