"""The one place where tensors cross between numpy and protobuf.

Framework code never touches protobuf: adapters speak numpy arrays in the canonical layout,
and this package turns them into `weightrelay.v1.Tensor` messages and weight streams, and
back, checking everything a receiver must check before it applies a weight set.

One module per job: `tensors` (dtypes, TensorSpec, one tensor to and from protobuf, the checks
on a tensor), `checksum` (the weight-set checksum), `wire` (the weights stream's bytes, written
and read by hand for the fast path) and `stream` (a weight set rebuilt from a stream). The names
below are what callers use, as `codec.name`.
"""

from weightrelay.codec.checksum import same_bytes, stream_sha256, weights_sha256
from weightrelay.codec.stream import ReceivedStream, assemble_weights, receive_stream, receive_weights
from weightrelay.codec.tensors import (SUPPORTED_DTYPES, TensorError, TensorSpec, WeightSet, all_finite, check_against_manifest, check_finite,
                                       from_proto, native_view, spec_from_proto, spec_to_proto, storage_dtype, tensor_bytes, to_proto)
from weightrelay.codec.wire import (MAX_CHUNK_BYTES, MIN_CHUNK_BYTES, StreamMessage, decode_chunk, encode_weight_chunks, holds_digest,
                                    iter_weight_chunks, sends_transposed, stream_message, until_digest)

__all__ = [
    "MAX_CHUNK_BYTES", "MIN_CHUNK_BYTES", "SUPPORTED_DTYPES", "ReceivedStream", "StreamMessage", "TensorError", "TensorSpec", "WeightSet",
    "all_finite", "assemble_weights", "check_against_manifest", "check_finite", "decode_chunk", "encode_weight_chunks", "from_proto",
    "holds_digest", "iter_weight_chunks", "native_view", "receive_stream", "receive_weights", "same_bytes", "sends_transposed",
    "spec_from_proto", "spec_to_proto", "storage_dtype", "stream_message", "stream_sha256", "tensor_bytes", "to_proto", "until_digest", "weights_sha256",
]
