"""`keras-worker` / `python -m keras_service`: serve the Keras model over gRPC."""

import sys

from weightrelay.server import worker_main

DEFAULT_PORT = 50052


def main() -> int:
    from keras_service.adapter import KerasAdapter  # TensorFlow loads only when a worker really starts

    return worker_main(KerasAdapter, "keras", DEFAULT_PORT)


if __name__ == "__main__":
    sys.exit(main())
