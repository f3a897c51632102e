"""The client side of a moe_serve call: channel options and raw-bytes multicallables.

`unary_call` sends `wire.serialize` bytes and parses the reply with `wire.parse`, so
tensors skip protobuf's copies both ways.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from moe_serve.transport.wire import parse
from moe_serve.v1 import moe_pb2 as pb

M = TypeVar("M", bound=Message)


def unary_call(
    channel: grpc.Channel | grpc.aio.Channel, service: str, method: str, reply_type: type[M]
) -> Callable[..., Any]:
    """`channel`'s multicallable for moe_serve.v1.`service`/`method`: it takes the request
    as serialized bytes and returns the reply parsed by wire.parse as a trusted reply (its
    routing tensors, nested, go to protobuf; see wire.parse)."""
    return channel.unary_unary(
        f"/{pb.DESCRIPTOR.services_by_name[service].full_name}/{method}",
        request_serializer=None,  # the caller passes wire.serialize's bytes
        response_deserializer=functools.partial(parse, reply_type, trusted=True),
    )


def message_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Channel/server options: message size limits; gRPC compression stays off by default."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]
