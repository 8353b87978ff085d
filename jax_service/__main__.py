"""`jax-worker` / `python -m jax_service`: serve the JAX/Flax model over gRPC."""

import sys

from weightrelay.server import worker_main

DEFAULT_PORT = 50053


def main() -> int:
    from jax_service.adapter import JaxAdapter  # JAX loads only when a worker really starts

    return worker_main(JaxAdapter, "jax", DEFAULT_PORT)


if __name__ == "__main__":
    sys.exit(main())
